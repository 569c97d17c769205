"""Stand-in container images: small busybox images under the real names, answering like the real services.

Registries are out of reach on the test machines, so the tests serve, from a registry on loopback (registry.py),
one stand-in for every image compose/*/compose.yaml names. A stand-in opens the ports the real service opens,
answers the health endpoints its clients and healthchecks ask for, and carries the executables the stack's
healthchecks run (curl, immich-healthcheck, valkey-cli, ...) as small sh scripts that really ask the stand-in's
own port: a stand-in whose server is down is reported unhealthy. The real compose files run unchanged on them.

Each image is a docker-archive tarball written here by hand (manifest.json, the config JSON, two layer tars:
a busybox rootfs shared by all, then the stand-in's own files), reproducibly (fixed mtimes and owners), from
Debian's busybox-static. Inside an image:

- `/standin/run` (the entrypoint): checks what the real service refuses to start without (`required_env`,
  `required_files`), waits for what it waits for (`waits_for`), then serves each port in the background and
  waits, stopping them on SIGTERM. The real image's command (compose `command:`) arrives as arguments and is
  ignored. HTTP ports: busybox httpd serving `/standin/www/PORT` (each path a file: the body; a path ending in
  `/` is its `index.html`); other ports: `nc -ll` running `/standin/tcp/PORT`, which greets and answers lines.
- `/standin/lib.sh`: `standin_get URL`, `standin_ask HOST PORT TEXT`, `standin_wait HOST PORT [SECONDS]`.
- `/standin/image`: the real name it stands in for (also the label `homelab.standin`).

Limits, on purpose: HTTP bodies are static (GET and HEAD; no POST), sent without a content type; port 443 of
Nginx Proxy Manager answers plain HTTP (busybox has no TLS server); nothing persists data in its volumes.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shlex
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from builder.lock import LockEntry, resolve
from builder.runner import run

from .registry import LoopbackRegistry

# Every file's mtime (2026-01-01T00:00:00Z) and the configs' `created`: archives and digests are reproducible.
EPOCH = 1767225600
CREATED = "2026-01-01T00:00:00Z"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
# busybox applets linked into /bin: what the stand-in scripts and the stacks' healthchecks run (wget is the real
# prometheus and grafana images' own busybox applet). tests/integration checks busybox has each one.
APPLETS = (
    "[", "ash", "cat", "cut", "date", "echo", "env", "false", "grep", "head", "hostname", "httpd", "id", "ip",
    "kill", "ls", "mkdir", "nc", "printf", "ps", "rm", "sed", "sh", "sleep", "sort", "tail", "test", "timeout",
    "tr", "true", "uname", "wc", "wget",
)
SECOND = 1_000_000_000  # image config durations are nanoseconds


# --- what a stand-in is ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Http:
    """An HTTP port: each path (from `/`) answers 200 with its body. A path ending in `/` is a directory index."""

    paths: Mapping[str, str]


@dataclass(frozen=True)
class Tcp:
    """A port speaking a line protocol: `greeting` on connect, then each line matching a glob gets its reply.

    Replies are printf formats (`+PONG\\r\\n`); a line matching no pattern gets no reply.
    """

    greeting: str = ""
    answers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class StandIn:
    image: str  # the real name, as compose/*/compose.yaml gives it
    service: str  # what it stands in for, one line
    ports: Mapping[int, Http | Tcp]
    # Absolute path in the image -> sh script body (run after `#!/bin/sh` and `. /standin/lib.sh`): at least the
    # executables the stack's healthchecks run.
    tools: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)  # the real image's own (PATH is always set)
    cmd: tuple[str, ...] = ()  # the real image's command: informational, the entrypoint ignores its arguments
    healthcheck: tuple[str, ...] = ()  # the real image's HEALTHCHECK test, if it has one
    required_env: tuple[str, ...] = ()  # the real service refuses to start without these
    required_files: tuple[str, ...] = ()  # ... or without these (e.g. its configuration, bind-mounted by compose)
    waits_for: tuple[tuple[str, str], ...] = ()  # (host, port) as sh words: what it waits for before serving
    working_dir: str = "/"

    def config_env(self) -> dict[str, str]:
        return {"PATH": PATH, **self.env}


# --- the scripts -----------------------------------------------------------------------------------------------

LIB = r"""# Shared by the stand-in's scripts (sourced).
STANDIN_TIMEOUT=${STANDIN_TIMEOUT:-5}

# standin_get URL: the body on stdout; fails unless the server answers 2xx. Never through a proxy. (Debian's
# busybox wget has no -T: it crashes on it.)
standin_get() {
    timeout "$STANDIN_TIMEOUT" wget -q -Y off -O - "$1"
}

# standin_ask HOST PORT TEXT: send TEXT (a printf format), the answer on stdout; fails if nothing listens.
standin_ask() {
    # shellcheck disable=SC2059
    printf "$3" | nc -w "$STANDIN_TIMEOUT" "$1" "$2"
}

# standin_wait HOST PORT [SECONDS]: until something accepts connections there, as long as the real service waits.
standin_wait() {
    _tries=0
    until nc -w 2 "$1" "$2" </dev/null >/dev/null 2>&1; do
        _tries=$((_tries + 1))
        if [ "$_tries" -ge "${3:-120}" ]; then
            echo "stand-in: nothing answers on $1:$2" >&2
            return 1
        fi
        sleep 1
    done
}
"""

CURL = r"""# curl as the stacks' healthchecks call it: [-fsSLk] [--noproxy HOSTS] [-m SECONDS] [-o FILE] URL (GET).
url= out=-
while [ $# -gt 0 ]; do
    case "$1" in
        --noproxy) shift 2 ;;
        -m|--max-time|--connect-timeout) STANDIN_TIMEOUT=$2; shift 2 ;;
        -o|--output) out=$2; shift 2 ;;
        --fail|--silent|--show-error|--location|--insecure|-[fsSLk]*) shift ;;
        -*) echo "curl (stand-in): unsupported option $1" >&2; exit 2 ;;
        *) url=$1; shift ;;
    esac
done
[ -n "$url" ] || { echo "curl (stand-in): no URL" >&2; exit 2; }
if [ "$out" = - ]; then
    standin_get "$url" || exit 22
else
    standin_get "$url" >"$out" || exit 22
fi
"""

IMMICH_HEALTHCHECK = r"""# Immich's own check: the API must answer its ping with pong.
result=$(standin_get "http://${IMMICH_HOST:-localhost}:${IMMICH_PORT:-2283}/api/server/ping") || {
    echo "Fail: the API does not answer"; exit 1; }
[ "$result" = '{"res":"pong"}' ] || { echo "Fail: didn't reply with pong"; exit 1; }
"""

# The image's check: pg_isready, then no data-checksum failures.
POSTGRES_HEALTHCHECK = r"""# The stand-in asks its own port.
answer=$(standin_ask 127.0.0.1 5432 '') || { echo "127.0.0.1:5432 - no response"; exit 2; }
case "$answer" in
    *"accepting connections"*) echo "127.0.0.1:5432 - accepting connections" ;;
    *) echo "127.0.0.1:5432 - rejecting connections"; exit 1 ;;
esac
"""

VALKEY_CLI = r"""# valkey-cli [-h HOST] [-p PORT] [ping]: PING only, what the healthcheck asks.
host=127.0.0.1 port=6379
while [ $# -gt 0 ]; do
    case "$1" in
        -h) host=$2; shift 2 ;;
        -p) port=$2; shift 2 ;;
        -*) echo "valkey-cli (stand-in): unsupported option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done
command=$(echo "${*:-ping}" | tr '[:lower:]' '[:upper:]')
[ "$command" = PING ] || { echo "(error) the stand-in valkey-cli sends PING only" >&2; exit 2; }
reply=$(standin_ask "$host" "$port" 'PING\r\n') && [ -n "$reply" ] || {
    echo "Could not connect to Valkey at $host:$port: Connection refused" >&2; exit 1; }
reply=$(echo "$reply" | head -n 1 | tr -d '\r')
echo "${reply#+}"
case "$reply" in +PONG) ;; *) exit 1 ;; esac
"""

NPM_CHECK_HEALTH = r"""# Nginx Proxy Manager's check: its admin API answers status OK.
answer=$(standin_get http://127.0.0.1:81/api/) || { echo "NOT OK"; exit 1; }
case "$answer" in
    *'"status":"OK"'*) echo "OK" ;;
    *) echo "NOT OK"; exit 1 ;;
esac
"""

# --- the catalog: one stand-in per image of compose/*/compose.yaml ---------------------------------------------

JELLYFIN = "docker.io/jellyfin/jellyfin:10.11.11"
IMMICH = "ghcr.io/immich-app/immich-server:v3.4.0"
POSTGRES = "ghcr.io/immich-app/postgres:14-vectorchord0.4.3-pgvectors0.2.0"
VALKEY = "docker.io/valkey/valkey:9.0.3"
PROMETHEUS = "docker.io/prom/prometheus:v3.10.0"
GRAFANA = "docker.io/grafana/grafana:12.4.0"
NPM = "docker.io/jc21/nginx-proxy-manager:2.13.7"


def _catalog(*standins: StandIn) -> dict[str, StandIn]:
    return {standin.image: standin for standin in standins}


CATALOG: Mapping[str, StandIn] = _catalog(
    StandIn(
        JELLYFIN, "Jellyfin 10.11.11 (media server)",
        # /health is Jellyfin's health endpoint ("Healthy"); /System/Info/Public its unauthenticated server info.
        ports={8096: Http({
            "/health": "Healthy",
            "/System/Info/Public": json.dumps({
                "LocalAddress": "http://localhost:8096", "ServerName": "jellyfin", "Version": "10.11.11",
                "ProductName": "Jellyfin Server", "OperatingSystem": "", "Id": "0" * 32,
                "StartupWizardCompleted": False}, separators=(",", ":")),
            "/web/": "<!DOCTYPE html><title>Jellyfin (stand-in)</title>",
        })},
        tools={"/usr/bin/curl": CURL},
        env={"JELLYFIN_DATA_DIR": "/config", "JELLYFIN_CACHE_DIR": "/cache", "JELLYFIN_CONFIG_DIR": "/config/config",
             "JELLYFIN_LOG_DIR": "/config/log", "JELLYFIN_WEB_DIR": "/jellyfin/jellyfin-web",
             "HEALTHCHECK_URL": "http://localhost:8096/health"},
        cmd=("/jellyfin/jellyfin",),
        healthcheck=("CMD-SHELL",
                     'curl --noproxy localhost -Lk -fsS "${HEALTHCHECK_URL:-http://localhost:8096/health}" || exit 1'),
    ),
    StandIn(
        IMMICH, "Immich server v3.4.0 (photos; API and web on 2283)",
        # /api/server/ping is what immich-healthcheck asks; /api/server/version the API's version.
        ports={2283: Http({
            "/api/server/ping": '{"res":"pong"}',
            "/api/server/version": '{"major":3,"minor":4,"patch":0}',
            "/": "<!DOCTYPE html><title>Immich (stand-in)</title>",
        })},
        tools={"/usr/src/app/bin/immich-healthcheck": IMMICH_HEALTHCHECK, "/usr/bin/curl": CURL},
        env={"PATH": f"{PATH}:/usr/src/app/bin", "NODE_ENV": "production", "IMMICH_PORT": "2283"},
        cmd=("start.sh",),
        healthcheck=("CMD", "immich-healthcheck"),
        # Immich needs its database password (the default "postgres" fails against ours), and does not serve until
        # it has reached its database and Redis/Valkey.
        required_env=("DB_PASSWORD",),
        waits_for=(("${DB_HOSTNAME:-database}", "${DB_PORT:-5432}"),
                   ("${REDIS_HOSTNAME:-redis}", "${REDIS_PORT:-6379}")),
        working_dir="/usr/src/app",
    ),
    StandIn(
        POSTGRES, "Immich's PostgreSQL 14 with VectorChord (never published)",
        ports={5432: Tcp(greeting="stand-in postgres 14: accepting connections\\n")},
        tools={"/usr/local/bin/healthcheck.sh": POSTGRES_HEALTHCHECK},
        env={"PATH": f"{PATH}:/usr/lib/postgresql/14/bin", "PG_MAJOR": "14", "PGDATA": "/var/lib/postgresql/data",
             "LANG": "en_US.utf8"},
        cmd=("postgres",),
        healthcheck=("CMD", "/usr/local/bin/healthcheck.sh"),
        # The postgres image refuses to initialise a cluster without a superuser password.
        required_env=("POSTGRES_PASSWORD",),
    ),
    StandIn(
        VALKEY, "Valkey 9.0.3 (Immich's Redis; never published)",
        ports={6379: Tcp(answers=(("[Pp][Ii][Nn][Gg]*", "+PONG\\r\\n"), ("[Qq][Uu][Ii][Tt]*", "+OK\\r\\n")))},
        tools={"/usr/local/bin/valkey-cli": VALKEY_CLI},
        cmd=("valkey-server",),
        working_dir="/data",
    ),
    StandIn(
        PROMETHEUS, "Prometheus v3.10.0",
        # Prometheus' management endpoints, with its own bodies.
        ports={9090: Http({
            "/-/healthy": "Prometheus Server is Healthy.\n",
            "/-/ready": "Prometheus Server is Ready.\n",
            "/api/v1/status/buildinfo": '{"status":"success","data":{"version":"3.10.0"}}',
        })},
        cmd=("--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"),
        # Prometheus exits without its configuration (bind-mounted by the stack).
        required_files=("/etc/prometheus/prometheus.yml",),
        working_dir="/prometheus",
    ),
    StandIn(
        GRAFANA, "Grafana 12.4.0",
        # /api/health is Grafana's unauthenticated health endpoint.
        ports={3000: Http({
            "/api/health": '{"database":"ok","version":"12.4.0","commit":"stand-in"}',
            "/login": "<!DOCTYPE html><title>Grafana (stand-in)</title>",
        })},
        env={"GF_PATHS_CONFIG": "/etc/grafana/grafana.ini", "GF_PATHS_DATA": "/var/lib/grafana",
             "GF_PATHS_HOME": "/usr/share/grafana", "GF_PATHS_LOGS": "/var/log/grafana",
             "GF_PATHS_PLUGINS": "/var/lib/grafana/plugins", "GF_PATHS_PROVISIONING": "/etc/grafana/provisioning"},
        working_dir="/usr/share/grafana",
    ),
    StandIn(
        NPM, "Nginx Proxy Manager 2.13.7 (proxy on 80/443, admin UI and API on 81)",
        # The admin API's root answers its status (what check-health reads); 80 is nginx's default site.
        ports={
            80: Http({"/": "<!DOCTYPE html><title>Congratulations! (stand-in)</title>"}),
            81: Http({
                "/api/": '{"status":"OK","setup":true,"version":{"major":2,"minor":13,"revision":7}}',
                "/": "<!DOCTYPE html><title>Nginx Proxy Manager (stand-in)</title>",
            }),
            443: Http({"/": "<!DOCTYPE html><title>Congratulations! (stand-in, plain HTTP)</title>"}),
        },
        tools={"/usr/bin/check-health": NPM_CHECK_HEALTH, "/usr/bin/curl": CURL},
        env={"SUPPRESS_NO_CONFIG_WARNING": "1"},
        healthcheck=("CMD", "/usr/bin/check-health"),
        working_dir="/app",
    ),
)


# --- the rootfs and the image ----------------------------------------------------------------------------------


def find_busybox() -> Path:
    for candidate in BUSYBOX_CANDIDATES:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("busybox not found: install the Debian package busybox-static (./setup.sh)")


def is_static_elf(data: bytes) -> bool:
    """A 64-bit little-endian ELF without PT_INTERP (runs in an image with no libc)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    for index in range(phnum):
        start = phoff + index * phentsize
        if int.from_bytes(data[start:start + 4], "little") == 3:  # PT_INTERP: a dynamic executable
            return False
    return True


@dataclass
class Tree:
    """Files of a layer, written to a tar reproducibly: sorted, root-owned, fixed mtime; parents implied."""

    files: dict[str, tuple[bytes, int]] = field(default_factory=dict)  # path -> (content, mode)
    links: dict[str, str] = field(default_factory=dict)  # path -> symlink target
    dirs: dict[str, int] = field(default_factory=dict)  # path -> mode

    def file(self, path: str, content: str | bytes, mode: int = 0o644) -> None:
        self.files[path.strip("/")] = (content.encode() if isinstance(content, str) else content, mode)

    def script(self, path: str, body: str) -> None:
        self.file(path, body if body.startswith("#!") else "#!/bin/sh\n" + body, 0o755)

    def tar(self) -> bytes:
        dirs = dict(self.dirs)
        for path in [*self.files, *self.links, *self.dirs]:
            parts = path.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                dirs.setdefault("/".join(parts[:depth]), 0o755)
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for path in sorted({*dirs, *self.files, *self.links}):
                info = tarfile.TarInfo(path)
                info.mtime, info.uid, info.gid, info.uname, info.gname = EPOCH, 0, 0, "root", "root"
                if path in self.files:
                    content, info.mode = self.files[path]
                    info.size = len(content)
                    tar.addfile(info, io.BytesIO(content))
                elif path in self.links:
                    info.type, info.linkname, info.mode = tarfile.SYMTYPE, self.links[path], 0o777
                    tar.addfile(info)
                else:
                    info.type, info.mode = tarfile.DIRTYPE, dirs[path]
                    tar.addfile(info)
        return out.getvalue()


def base_layer(busybox: bytes) -> Tree:
    """The rootfs every stand-in shares: static busybox, its applets, passwd/group/hosts."""
    if not is_static_elf(busybox):
        raise ValueError("busybox is not a static x86-64 executable: install busybox-static, not busybox")
    tree = Tree()
    tree.file("bin/busybox", busybox, 0o755)
    for applet in APPLETS:
        tree.links[f"bin/{applet}"] = "busybox"
    tree.links["usr/bin/env"] = "../../bin/busybox"
    tree.file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    tree.file("etc/group", "root:x:0:\nnogroup:x:65534:\n")
    tree.file("etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    tree.file("etc/nsswitch.conf", "hosts: files dns\n")
    tree.dirs.update({"tmp": 0o1777, "root": 0o700, "dev": 0o755, "proc": 0o755, "sys": 0o755,
                      "usr/local/bin": 0o755, "usr/sbin": 0o755, "sbin": 0o755, "var": 0o755})
    return tree


def http_files(port: int, http: Http) -> dict[str, str]:
    """Files under /standin/www/PORT for each path: a path ending in / is its index.html."""
    files: dict[str, str] = {}
    for path, body in http.paths.items():
        if not path.startswith("/") or ".." in path.split("/"):
            raise ValueError(f"port {port}: bad path {path!r}")
        name = path.lstrip("/") + ("index.html" if path.endswith("/") else "")
        files[f"standin/www/{port}/{name}"] = body
    names = sorted(files)
    for name in names:  # a file cannot also be a directory of another path
        clash = [other for other in names if other.startswith(name + "/")]
        if clash:
            raise ValueError(f"port {port}: {name} is both a file and a directory of {clash[0]}")
    return files


def tcp_script(port: int, tcp: Tcp) -> str:
    lines = [f"# Port {port}: one client on stdin/stdout (nc -ll -e)."]
    if tcp.greeting:
        lines.append(f"printf {shlex.quote(tcp.greeting)}")
    if tcp.answers:
        lines += ["while IFS= read -r line; do", "    line=$(printf '%s' \"$line\" | tr -d '\\r')",
                  '    case "$line" in']
        lines += [f"        {pattern}) printf {shlex.quote(reply)} ;;" for pattern, reply in tcp.answers]
        lines += ["    esac", "done"]
    return "\n".join(lines) + "\n"


def run_script(standin: StandIn) -> str:
    """/standin/run: check, wait, serve every port, stay in the foreground until SIGTERM."""
    image = shlex.quote(standin.image)
    lines = [
        "#!/bin/sh",
        f"# Stand-in for {standin.image}: {standin.service}.",
        "# The real image's command arrives as arguments and is ignored.",
        ". /standin/lib.sh",
        f'echo "stand-in for {standin.image} starting (arguments ignored: $*)"',
    ]
    for name in standin.required_env:
        lines.append(f'[ -n "${{{name}:-}}" ] || {{ echo "stand-in for "{image}": {name} is not set" >&2; exit 1; }}')
    for path in standin.required_files:
        lines.append(f'[ -e {shlex.quote(path)} ] || {{ echo "stand-in for "{image}": {path} is missing" >&2; '
                     "exit 1; }")
    for host, port_word in standin.waits_for:
        lines.append(f'standin_wait "{host}" "{port_word}" || exit 1')
    lines.append("pids=")
    for port, kind in sorted(standin.ports.items()):
        if isinstance(kind, Http):
            lines.append(f"httpd -f -p {port} -h /standin/www/{port} -c /standin/httpd.conf & pids=\"$pids $!\"")
        else:
            lines.append(f"nc -ll -p {port} -e /standin/tcp/{port} & pids=\"$pids $!\"")
    lines += [
        "# docker stop: stop the servers, reap them (this is PID 1), done.",
        "trap 'kill $pids 2>/dev/null; wait; exit 0' TERM INT",
        f'echo "stand-in for {standin.image} serving {" ".join(str(p) for p in sorted(standin.ports))}"',
        "wait",
    ]
    return "\n".join(lines) + "\n"


def standin_layer(standin: StandIn) -> Tree:
    tree = Tree()
    tree.file("standin/image", standin.image + "\n")
    tree.script("standin/run", run_script(standin))
    tree.file("standin/lib.sh", LIB)
    tree.file("standin/httpd.conf", ".json:application/json\n")
    for port, kind in sorted(standin.ports.items()):
        if isinstance(kind, Http):
            for name, body in http_files(port, kind).items():
                tree.file(name, body)
            tree.dirs[f"standin/www/{port}"] = 0o755
        else:
            tree.script(f"standin/tcp/{port}", tcp_script(port, kind))
    for path, body in standin.tools.items():
        if not path.startswith("/"):
            raise ValueError(f"{standin.image}: tool {path!r} is not an absolute path")
        tree.script(path, "#!/bin/sh\n. /standin/lib.sh\n" + body)
    if standin.working_dir != "/":
        tree.dirs[standin.working_dir.strip("/")] = 0o755
    return tree


def _healthcheck(test: tuple[str, ...]) -> dict[str, object]:
    return {"Test": list(test), "Interval": 30 * SECOND, "Timeout": 10 * SECOND, "StartPeriod": 30 * SECOND,
            "Retries": 3}


def image_config(standin: StandIn, diff_ids: list[str]) -> dict[str, object]:
    config: dict[str, object] = {
        "Env": [f"{key}={value}" for key, value in standin.config_env().items()],
        "Entrypoint": ["/standin/run"],
        "Cmd": list(standin.cmd) or None,
        "ExposedPorts": {f"{port}/tcp": {} for port in sorted(standin.ports)},
        "WorkingDir": standin.working_dir,
        "Labels": {"homelab.standin": standin.image,
                   "org.opencontainers.image.description": f"stand-in for {standin.service}"},
    }
    if standin.healthcheck:
        config["Healthcheck"] = _healthcheck(standin.healthcheck)
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": CREATED,
        "config": {key: value for key, value in config.items() if value is not None},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": CREATED, "created_by": "tests/standins: busybox-static rootfs"},
            {"created": CREATED, "created_by": f"tests/standins: stand-in for {standin.image}"},
        ],
    }


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Archive:
    image: str
    path: Path
    config_digest: str  # the image ID `docker load` gives


def write_archive(standin: StandIn, path: Path, busybox: bytes) -> Archive:
    """The stand-in as a docker-archive tarball (what `docker save` writes), atomically."""
    layers = [base_layer(busybox).tar(), standin_layer(standin).tar()]
    diff_ids = [sha256(layer) for layer in layers]
    config = json.dumps(image_config(standin, diff_ids), sort_keys=True, separators=(",", ":")).encode()
    config_digest = sha256(config)
    config_name = config_digest.removeprefix("sha256:") + ".json"
    layer_names = [f"{diff_id.removeprefix('sha256:')}/layer.tar" for diff_id in diff_ids]
    manifest = [{"Config": config_name, "RepoTags": [standin.image], "Layers": layer_names}]
    members = [(config_name, config), *zip(layer_names, layers, strict=True),
               ("manifest.json", json.dumps(manifest, separators=(",", ":")).encode())]
    partial = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(partial, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), EPOCH, 0o644
            tar.addfile(info, io.BytesIO(data))
    partial.replace(path)
    return Archive(standin.image, path, config_digest)


def archive_name(image: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", image) + ".tar"


def build_standins(out_dir: Path, images: Iterable[str] | None = None, busybox: Path | None = None
                   ) -> dict[str, Archive]:
    """Write the stand-in of each image (default: the whole CATALOG) under out_dir; image -> Archive."""
    data = (busybox or find_busybox()).read_bytes()
    wanted = sorted(CATALOG) if images is None else sorted(set(images))
    unknown = [image for image in wanted if image not in CATALOG]
    if unknown:
        raise KeyError(f"no stand-in for {', '.join(unknown)}: add it to tests/standins/images.py CATALOG")
    return {image: write_archive(CATALOG[image], out_dir / archive_name(image), data) for image in wanted}


# --- the registry ----------------------------------------------------------------------------------------------


def push_standins(registry: LoopbackRegistry, archives: Mapping[str, Archive]) -> dict[str, LockEntry]:
    """Push each archive to where the registries.conf sends its real name, then lock the real name through it.

    The lock entries come from builder.lock.resolve + skopeo_inspect with the registry's registries.conf: the
    code path of `homelab lock --registries-conf FILE`.
    """
    for image, archive in sorted(archives.items()):
        run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"docker-archive:{archive.path}",
             f"docker://{registry.location(image)}"], timeout=120)
    return {image: resolve(image, registry.inspect) for image in sorted(archives)}


def archive_config_digest(archive: Path) -> str:
    """The image ID a docker-archive loads as: the sha256 of its config blob."""
    with tarfile.open(archive) as tar:
        handle = tar.extractfile("manifest.json")
        assert handle is not None
        config = tar.extractfile(json.load(handle)[0]["Config"])
        assert config is not None
        return sha256(config.read())


def extract_rootfs(archive: Path, dest: Path) -> None:
    """Unpack a docker-archive's layers in order into dest (no whiteouts: stand-ins have none)."""
    with tarfile.open(archive) as outer:
        handle = outer.extractfile("manifest.json")
        assert handle is not None
        manifest = json.load(handle)
        for layer_name in manifest[0]["Layers"]:
            layer = outer.extractfile(layer_name)
            assert layer is not None
            with tarfile.open(fileobj=io.BytesIO(layer.read())) as tar:
                tar.extractall(dest, filter="tar")
