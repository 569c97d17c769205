"""`homelab build image <role>`: a plan (printable with --dry-run), then named steps over one context.

Outputs land in build/<role>/ as <role>-<version>.qcow2 and <role>-<version>.manifest.json. Everything is
produced under a temporary directory beside them and renamed into place last, so a failed or
interrupted build never leaves a file at a final path. The version is a hash of every input.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from . import __version__
from .compose import check_stack
from .definition import ImageDefinition, load_role
from .errors import BuildError, CommandFailedError, HomelabError, NotRootError
from .firewall import RULESET_DEST, ruleset
from .localvolumes import VOLUMES_DEST, volumes_json
from .lock import Lock, LockEntry, repository, skopeo_argv
from .progress import Reporter, Silent
from .runner import describe, require_tool, run, run_streaming
from .settings import Settings

ELEMENTS_DIR = Path(__file__).resolve().parent / "elements"
COMPOSE_DEST = "/opt/homelab/compose"
IMAGE_INFO_DEST = "/etc/homelab/image.json"
# What this image baked, so that a build from a cached layer can drop what an older build baked.
BAKED_LIST_DEST = "/etc/homelab/baked.list"
# Container images baked into the image (docker-archive tarballs) and their index, loaded at boot by
# homelab-load-images before the stack starts: a booted VM never pulls.
IMAGES_DEST = "/var/lib/homelab/images"
# Free space a build needs where DIB works and where the image lands (root fs in tmpfs/TMP_DIR,
# the raw image, the qcow2 conversion).
MIN_FREE_BYTES = 6 * 1024**3
# DIB prints this line as each phase (root, install, finalise...) starts: the progress shown.
_PHASE_RE = re.compile(r"Running (?:hooks from )?\S*?/(?:hooks|in_target\.d)/([a-z-]+)\.d(?:/(\S+))?")


@dataclass(frozen=True)
class BuildPlan:
    role: str
    version: str
    inputs_hash: str
    qcow2: Path
    manifest: Path
    argv: list[str]
    env: dict[str, str]
    baked: dict[str, str]  # destination path in the image -> sha256 of its content
    definition: ImageDefinition = field(repr=False, compare=False)
    # "full": debootstrap + packages, leaving a package layer in the cache; "incremental": from that layer.
    mode: str = "full"
    layer: Path = Path()
    lock: Lock | None = field(default=None, repr=False, compare=False)  # the stack's, as checked while planning

    def describe(self) -> str:
        lines = [
            f"role:     {self.role}",
            f"version:  {self.version}",
            f"mode:     {self.mode} (package layer: {self.layer})",
            f"output:   {self.qcow2}",
            f"manifest: {self.manifest}",
            "environment:",
            *[f"  {k}={v}" for k, v in sorted(self.env.items())],
            "command:",
            f"  {describe(self.argv)}",
            "baked files:",
            *[f"  {dest}  sha256:{digest[:16]}" for dest, digest in sorted(self.baked.items())],
        ]
        return "\n".join(lines)


@dataclass
class BuildContext:
    settings: Settings
    plan: BuildPlan
    reporter: Reporter
    workdir: Path = Path()
    stage: Path = Path()
    packages: dict[str, str] = field(default_factory=dict)
    container_images: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildResult:
    qcow2: Path
    manifest: Path
    version: str
    skipped: bool


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def baked_sources(definition: ImageDefinition, project: Path) -> dict[str, tuple[Path, str]]:
    """Destination in the image -> (source file, mode) for everything the definition bakes."""
    baked: dict[str, tuple[Path, str]] = {}
    for entry in definition["files"]:
        baked[entry["dest"]] = (project / entry["src"], entry["mode"])
    if definition["compose"]:
        compose_root = project / definition["compose"]
        for rel in _tree_hashes(compose_root):
            baked[f"{COMPOSE_DEST}/{rel}"] = (compose_root / rel, "0644")
    return baked


def generated_files(definition: ImageDefinition) -> dict[str, tuple[bytes, str]]:
    """Destination in the image -> (content, mode) for what the build writes from the definition itself: the
    firewall's ruleset and the data volumes homelab-volumes.service mounts (images/files/common/homelab-volumes)."""
    files = {RULESET_DEST: (ruleset(definition).encode(), "0644")}
    if definition["volumes"]:
        files[VOLUMES_DEST] = (volumes_json(definition).encode(), "0644")
    return files


def baked_hashes(definition: ImageDefinition, project: Path) -> dict[str, str]:
    """Destination -> sha256 of everything baked: project files and generated files alike."""
    hashes = {dest: sha256_file(src) for dest, (src, _mode) in baked_sources(definition, project).items()}
    hashes.update({dest: hashlib.sha256(content).hexdigest()
                   for dest, (content, _mode) in generated_files(definition).items()})
    return hashes


def _dib_version() -> str:
    from importlib.metadata import version

    return version("diskimage-builder")


def inputs_hash(definition: ImageDefinition, settings: Settings, baked: dict[str, str]) -> str:
    """Hash of everything that decides the image: definition, baked content, elements, DIB, mirrors."""
    inputs: dict[str, Any] = {
        "definition": definition.values,
        "baked": baked,
        "elements": _tree_hashes(ELEMENTS_DIR),
        "dib": _dib_version(),
        "mirrors": [settings.mirror, settings.security_mirror],
        "builder": __version__,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def dib_environment(
    definition: ImageDefinition, settings: Settings, workdir: Path, version: str, layer: Path | None = None
) -> dict[str, str]:
    dib = definition.dib_args()
    env = {
        "ELEMENTS_PATH": str(ELEMENTS_DIR),
        "DIB_DISTRIBUTION_MIRROR": settings.mirror,
        "DIB_DEBIAN_SECURITY_MIRROR": settings.security_mirror,
        "DIB_CLOUD_INIT_DATASOURCES": "NoCloud, ConfigDrive, None",
        # net.ifnames=0: the NIC is eth0 under QEMU and on Proxmox alike, so one network-config fits.
        # No `nomodeset` (DIB's default): it stops every DRM driver, so the intranet's passed-through Intel GPU
        # (i915) would give Jellyfin no /dev/dri render node.
        "DIB_BOOTLOADER_DEFAULT_CMDLINE": "nofb gfxpayload=text net.ifnames=0",
        "DIB_BOOTLOADER_SERIAL_CONSOLE": "ttyS0,115200",
        # An immutable image has nothing to choose at the boot menu; every second counts at a swap.
        "DIB_GRUB_TIMEOUT": "1",
        "DIB_IMAGE_CACHE": str(settings.cache_dir / "dib"),
        # DIB's scratch space; TMPDIR would leak into the chroot and break package scripts.
        "TMP_DIR": str(workdir / "tmp"),
        "HOMELAB_BAKE_DIR": str(workdir / "stage"),
        "HOMELAB_IMAGE_VERSION": version,
    }
    env.update(dib.env)
    if layer is not None:
        env["HOMELAB_LAYER_TAR"] = str(layer)
    return env


# Elements of an incremental build: the layer replaces debian-minimal and every package install.
INCREMENTAL_ELEMENTS = ["homelab-layer", "vm", "homelab-base", "homelab-bake"]
# A layer older than this is rebuilt, so that security updates reach the images at least daily.
LAYER_MAX_AGE_SECONDS = 24 * 3600


def layer_key(definition: ImageDefinition, settings: Settings) -> str:
    """What the package layer depends on: packages, elements, kernel, units, mirrors, DIB, homelab-base."""
    dib = definition.dib_args()
    inputs = {
        "packages": dib.packages,
        "elements": [e for e in dib.elements if e != "homelab-bake"],
        "env": {k: v for k, v in dib.env.items()},
        "homelab-base": _tree_hashes(ELEMENTS_DIR / "homelab-base"),
        "dib": _dib_version(),
        "mirrors": [settings.mirror, settings.security_mirror],
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def layer_path(settings: Settings, role: str, key: str) -> Path:
    return settings.cache_dir / "layers" / f"{role}-{key}.tar"


def layer_is_fresh(layer: Path, now: float | None = None) -> bool:
    try:
        age = (now if now is not None else time.time()) - layer.stat().st_mtime
    except OSError:
        return False
    return age < LAYER_MAX_AGE_SECONDS


def dib_argv(definition: ImageDefinition, output_base: Path, mode: str = "full") -> list[str]:
    dib = definition.dib_args()
    # A full build also writes the root as a tarball: the package layer later builds start from.
    types = "qcow2,tar" if mode == "full" else "qcow2"
    argv = ["disk-image-create", "-a", "amd64", "-t", types, "-u", "--image-size", str(dib.image_size_gb)]
    argv += ["-o", str(output_base)]
    if mode == "incremental":
        return argv + INCREMENTAL_ELEMENTS + [e for e in dib.elements if e not in BASE_AND_OS_ELEMENTS]
    if dib.packages:
        argv += ["-p", ",".join(dib.packages)]
    return argv + dib.elements


# Elements whose work is already in a package layer (the OS and DIB's own VM elements).
BASE_AND_OS_ELEMENTS = {"debian-minimal", "vm", "cloud-init", "cloud-init-datasources", "openssh-server",
                        "homelab-base", "homelab-bake"}


def plan_build(settings: Settings, role: str, refresh: bool = False) -> BuildPlan:
    """What a build will do. Incremental when a fresh package layer for this package set is cached."""
    definition = load_role(settings.project, role)
    # The stack must be valid and locked before anything is built (ports, pins, digests); the build fetches what
    # this lock says, read once.
    lock = check_stack(settings.project, definition, None, None)
    layer = layer_path(settings, role, layer_key(definition, settings))
    mode = "incremental" if not refresh and layer_is_fresh(layer) else "full"
    baked = baked_hashes(definition, settings.project)
    digest = inputs_hash(definition, settings, baked)
    version = digest[:12]
    out_dir = settings.role_dir(role)
    workdir = out_dir / f".build-{version}"
    return BuildPlan(
        role=role,
        version=version,
        inputs_hash=digest,
        qcow2=out_dir / f"{role}-{version}.qcow2",
        manifest=out_dir / f"{role}-{version}.manifest.json",
        argv=dib_argv(definition, workdir / "out" / role, mode),
        env=dib_environment(definition, settings, workdir, version, layer if mode == "incremental" else None),
        baked=baked,
        definition=definition,
        mode=mode,
        layer=layer,
        lock=lock,
    )


# --- steps -------------------------------------------------------------------------------------


def check_prerequisites(ctx: BuildContext) -> None:
    if os.geteuid() != 0:
        raise NotRootError("building an image needs root (loop devices, chroot, mounts): run as root")
    for tool in ("qemu-img", "debootstrap", "sudo", "sgdisk", "kpartx", "dmsetup"):
        require_tool(tool)
    out_dir = ctx.plan.qcow2.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out_dir).free
    if free < MIN_FREE_BYTES:
        raise BuildError(
            f"not enough free space in {out_dir}: {free / 1024**3:.1f} GiB free, a build needs "
            f"{MIN_FREE_BYTES / 1024**3:.0f} GiB"
        )


def prepare_workdir(ctx: BuildContext) -> None:
    out_dir = ctx.plan.qcow2.parent
    ctx.workdir = Path(tempfile.mkdtemp(prefix=f".build-{ctx.plan.version}-", dir=out_dir))
    (ctx.workdir / "tmp").mkdir()
    (ctx.workdir / "out").mkdir()
    # The plan named a predictable workdir for --dry-run; the real one is unique per run.
    env = dict(ctx.plan.env)
    env["TMP_DIR"] = str(ctx.workdir / "tmp")
    env["HOMELAB_BAKE_DIR"] = str(ctx.workdir / "stage")
    argv = list(ctx.plan.argv)
    argv[argv.index("-o") + 1] = str(ctx.workdir / "out" / ctx.plan.role)
    ctx.plan = _replace(ctx.plan, env=env, argv=argv)


def _replace(plan: BuildPlan, **changes: Any) -> BuildPlan:
    from dataclasses import replace

    return replace(plan, **changes)


def stage_baked_files(ctx: BuildContext) -> None:
    stage = ctx.workdir / "stage"
    stage.mkdir(mode=0o755)
    # The stage's root becomes the image's / (cp -a .../. /): mkdir's mode is cut by the umask.
    os.chmod(stage, 0o755)
    for dest, (src, mode) in baked_sources(ctx.plan.definition, ctx.settings.project).items():
        target = stage / dest.lstrip("/")
        _mkdirs(stage, target.parent)
        try:
            shutil.copyfile(src, target)
        except OSError as exc:
            raise BuildError(f"{src} cannot be baked ({exc.strerror}): did it change after the build was planned? "
                             "run the build again") from None
        os.chmod(target, int(mode, 8))
        # The version (and the manifest) were computed from the files as planned: bake exactly those.
        if ctx.plan.baked.get(dest) != sha256_file(target):
            raise BuildError(f"{src} changed after the build was planned (an edit or `homelab lock` meanwhile): "
                             "run the build again")
    for dest, (content, mode) in generated_files(ctx.plan.definition).items():
        target = stage / dest.lstrip("/")
        _mkdirs(stage, target.parent)
        target.write_bytes(content)
        os.chmod(target, int(mode, 8))
    listing = stage / BAKED_LIST_DEST.lstrip("/")
    _mkdirs(stage, listing.parent)
    listing.write_text("".join(f"{dest}\n" for dest in sorted(ctx.plan.baked)))
    os.chmod(listing, 0o644)
    info = {"role": ctx.plan.role, "version": ctx.plan.version, "inputs_hash": ctx.plan.inputs_hash}
    target = stage / IMAGE_INFO_DEST.lstrip("/")
    _mkdirs(stage, target.parent)
    target.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    os.chmod(target, 0o644)
    ctx.stage = stage


def _mkdirs(stage: Path, directory: Path) -> None:
    # Every staged directory is 0755: the tree is copied over the image root, modes included.
    missing = []
    while directory != stage and not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        d.mkdir(mode=0o755)
        os.chmod(d, 0o755)


def archive_config_digest(archive: Path) -> str:
    """The image ID a docker-archive tarball loads as: sha256 of its config blob."""
    with tarfile.open(archive) as tar:
        manifest = json.load(_member(tar, archive, "manifest.json"))
        config = _member(tar, archive, manifest[0]["Config"]).read()
    return "sha256:" + hashlib.sha256(config).hexdigest()


def _member(tar: tarfile.TarFile, archive: Path, name: str) -> IO[bytes]:
    handle = tar.extractfile(name)
    if handle is None:
        raise BuildError(f"{archive}: {name} is not a file")
    return handle


def fetch_image(settings: Settings, image: str, entry: LockEntry) -> Path:
    """The image as a docker-archive in the cache, fetched by digest once and checked against the lock."""
    cached = settings.cache_dir / "images" / f"{entry.config_digest.removeprefix('sha256:')}.tar"
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(f".{os.getpid()}.partial")
    partial.unlink(missing_ok=True)
    try:
        run(skopeo_argv("copy", "--quiet", f"docker://{repository(image)}@{entry.digest}",
                        f"docker-archive:{partial}:{image}", registries_conf=settings.registries_conf), timeout=1800)
        try:
            got = archive_config_digest(partial)
        except (tarfile.TarError, KeyError, ValueError, IndexError) as exc:
            raise BuildError(f"{image}@{entry.digest}: skopeo wrote an unreadable archive: {exc}") from None
        if got != entry.config_digest:
            raise BuildError(f"{image}@{entry.digest} loads as {got}, but the lock says {entry.config_digest}")
        os.replace(partial, cached)
    finally:
        partial.unlink(missing_ok=True)
    return cached


def fetch_container_images(ctx: BuildContext) -> None:
    """Every image of the stack, by digest, into the staged tree with an index the VM's loader reads."""
    lock = ctx.plan.lock
    if lock is None:
        return
    target = ctx.stage / IMAGES_DEST.lstrip("/")
    _mkdirs(ctx.stage, target)
    index: dict[str, dict[str, str]] = {}
    for number, (image, entry) in enumerate(sorted(lock.images.items())):
        ctx.reporter.update(image)
        cached = fetch_image(ctx.settings, image, entry)
        name = f"{number:02d}-{re.sub(r'[^A-Za-z0-9.-]+', '_', image)}.tar"
        shutil.copyfile(cached, target / name)
        os.chmod(target / name, 0o600)
        index[image] = {"file": name, "digest": entry.digest, "config_digest": entry.config_digest}
    (target / "images.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    os.chmod(target / "images.json", 0o644)
    ctx.container_images = index


def dib_command(ctx: BuildContext) -> tuple[list[str], dict[str, str]]:
    """disk-image-create's argv and environment for this build (after the work directory is prepared)."""
    env = {k: v for k, v in os.environ.items() if k != "TMPDIR"}
    # DIB's helpers (dib-run-parts, element-info) live beside our interpreter in a virtualenv.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(ctx.plan.env)
    Path(env["DIB_IMAGE_CACHE"]).mkdir(parents=True, exist_ok=True)
    argv = list(ctx.plan.argv)
    argv[0] = str(Path(sys.executable).parent / "disk-image-create") if _venv_has_dib() else require_tool(argv[0])
    return argv, env


def run_diskimage_builder(ctx: BuildContext) -> None:
    argv, env = dib_command(ctx)

    def on_line(line: str) -> None:
        match = _PHASE_RE.search(line)
        if match:
            phase, script = match.groups()
            ctx.reporter.update(f"{phase}" + (f" ({script})" if script else ""))

    log_file = ctx.plan.qcow2.parent / f"{ctx.plan.role}-{ctx.plan.version}.build.log"
    try:
        run_streaming(argv, log_file=log_file, on_line=on_line, env=env)
    except CommandFailedError as exc:
        if "No space left on device" in exc.stderr_tail or _log_mentions(log_file, "No space left on device"):
            raise BuildError(f"disk full during the build (see {log_file})") from exc
        raise


def _venv_has_dib() -> bool:
    return (Path(sys.executable).parent / "disk-image-create").exists()


def _log_mentions(log_file: Path, text: str) -> bool:
    try:
        return text in log_file.read_text(errors="replace")[-20000:]
    except OSError:
        return False


def read_package_list(ctx: BuildContext) -> None:
    """Package names and versions as dpkg reported them inside the image (DIB's dpkg manifest)."""
    role = ctx.plan.role
    manifest = ctx.workdir / "out" / f"{role}.d" / "dib-manifests" / f"dib-manifest-dpkg-{role}"
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError) as exc:
        raise BuildError(f"diskimage-builder wrote no readable package list at {manifest}: {exc}") from None
    ctx.packages = {p["package"].split(":")[0]: p["version"] for p in data["packages"]}


def publish(ctx: BuildContext) -> None:
    plan = ctx.plan
    produced = ctx.workdir / "out" / f"{plan.role}.qcow2"
    if not produced.is_file():
        raise BuildError(f"diskimage-builder finished but wrote no image at {produced}")
    manifest = {
        "role": plan.role,
        "version": plan.version,
        "inputs_hash": plan.inputs_hash,
        "image": plan.qcow2.name,
        "sha256": sha256_file(produced),
        "size": produced.stat().st_size,
        "dib_version": _dib_version(),
        "builder_version": __version__,
        "base": plan.definition["base"],
        "kernel": plan.definition["kernel"],
        "vm": plan.definition["vm"],
        "volumes": plan.definition["volumes"],
        "ports": plan.definition["ports"],
        "build_mode": plan.mode,
        "package_layer": plan.layer.name,
        "packages": dict(sorted(ctx.packages.items())),
        "container_images": {image: {k: v for k, v in entry.items() if k != "file"}
                             for image, entry in sorted(ctx.container_images.items())},
        "baked_files": dict(sorted(plan.baked.items())),
    }
    tmp_manifest = ctx.workdir / plan.manifest.name
    tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    # The image first, the manifest last: a manifest at its final path always names a complete image.
    os.replace(produced, plan.qcow2)
    os.replace(tmp_manifest, plan.manifest)


def keep_package_layer(ctx: BuildContext) -> None:
    """After a full build: its root tarball becomes the role's package layer (older layers go)."""
    if ctx.plan.mode != "full":
        return
    produced = ctx.workdir / "out" / f"{ctx.plan.role}.tar"
    if not produced.is_file():
        raise BuildError(f"diskimage-builder wrote no root tarball at {produced}")
    layer = ctx.plan.layer
    layer.parent.mkdir(parents=True, exist_ok=True)
    # A name of this build's own: two builds of one role never write the same temporary file.
    tmp = layer.with_name(f".{layer.name}.{os.getpid()}.tmp")
    try:
        shutil.move(produced, tmp)
        os.replace(tmp, layer)
    finally:
        tmp.unlink(missing_ok=True)
    own_layer = re.compile(rf"{re.escape(ctx.plan.role)}-[0-9a-f]{{16}}\.tar")
    for old in layer.parent.glob(f"{ctx.plan.role}-*.tar"):
        # Only this role's layers: role "web" must not take "web-proxy"'s.
        if old != layer and own_layer.fullmatch(old.name):
            old.unlink(missing_ok=True)


BUILD_STEPS: list[tuple[str, Callable[[BuildContext], None]]] = [
    ("Check prerequisites", check_prerequisites),
    ("Prepare work directory", prepare_workdir),
    ("Stage baked files", stage_baked_files),
    ("Fetch container images", fetch_container_images),
    ("Run diskimage-builder", run_diskimage_builder),
    ("Read package list", read_package_list),
    # The layer before the image: a build that published always left its layer for the next one.
    ("Keep the package layer", keep_package_layer),
    ("Publish image and manifest", publish),
]


def is_built(plan: BuildPlan) -> bool:
    if not (plan.qcow2.is_file() and plan.manifest.is_file()):
        return False
    try:
        return read_manifest(plan.manifest).get("version") == plan.version
    except BuildError:
        return False


def execute_build(
    settings: Settings, plan: BuildPlan, reporter: Reporter | None = None, force: bool = False
) -> BuildResult:
    reporter = reporter or Silent()
    if is_built(plan) and not force:
        reporter.info(f"{plan.qcow2.name} is up to date (inputs unchanged); --force rebuilds it")
        # It is the build of the current inputs again: the one boot and verify take as the latest.
        os.utime(plan.manifest)
        return BuildResult(plan.qcow2, plan.manifest, plan.version, skipped=True)
    ctx = BuildContext(settings=settings, plan=plan, reporter=reporter)
    try:
        for name, step in BUILD_STEPS:
            with reporter.step(name):
                step(ctx)
    except BaseException:
        _remove_quietly(ctx.workdir)
        raise
    _remove_quietly(ctx.workdir, raise_errors=True)
    return BuildResult(plan.qcow2, plan.manifest, plan.version, skipped=False)


def _remove_quietly(workdir: Path, raise_errors: bool = False) -> None:
    """Remove the work directory; after a failed build a cleanup problem is logged, never hiding the failure."""
    if workdir == Path() or not workdir.exists():
        return
    try:
        remove_workdir(workdir)
    except BuildError:
        if raise_errors:
            raise
        logging.getLogger("homelab.build").warning("could not remove %s", workdir, exc_info=True)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        points = [line.split()[1].replace("\\040", " ") for line in mounts]
    return sorted((p for p in points if p.startswith(prefix)), reverse=True)


def remove_workdir(workdir: Path) -> None:
    """Delete a build's work directory, never through a mount a killed DIB left behind (/dev, /proc)."""
    for point in _mounts_under(workdir):
        run(["umount", "-l", point], check=False)
    leftover = _mounts_under(workdir)
    if leftover:
        raise BuildError(f"{workdir} still has mounts ({leftover[0]}...): unmount them, then delete it")
    shutil.rmtree(workdir, ignore_errors=True)


def build_image(
    settings: Settings, role: str, reporter: Reporter | None = None, force: bool = False, refresh: bool = False
) -> BuildResult:
    """`homelab build image ROLE`: plan, then build unless up to date (--refresh: full build, always)."""
    plan = plan_build(settings, role, refresh=refresh)
    return execute_build(settings, plan, reporter, force=force or refresh)


def manifest_of(image: Path) -> Path:
    """ROLE-VERSION.qcow2 -> ROLE-VERSION.manifest.json beside it."""
    return image.with_name(image.name.removesuffix(".qcow2") + ".manifest.json")


def read_manifest(path: Path, error: type[HomelabError] = BuildError) -> dict[str, Any]:
    """A build's manifest (JSON object); a missing, unreadable or damaged one raised as `error`, naming the file."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise error(f"cannot read the image manifest {path}: {exc}") from None
    if not isinstance(manifest, dict):
        raise error(f"cannot read the image manifest {path}: not a JSON object")
    return manifest


def latest_build(settings: Settings, role: str) -> dict[str, Any] | None:
    """The newest complete build of a role (its manifest, with 'path' to the qcow2), or None."""
    role_dir = settings.role_dir(role)
    manifests = sorted(role_dir.glob(f"{role}-*.manifest.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for manifest_path in manifests:
        try:
            manifest = read_manifest(manifest_path)
        except BuildError:
            continue  # a build that did not finish writing it is not a build
        image = role_dir / str(manifest.get("image", ""))
        if manifest.get("image") and image.is_file():
            manifest["path"] = str(image)
            manifest["manifest_path"] = str(manifest_path)
            return manifest
    return None


def built_image(settings: Settings, role: str, image: Path | None,
                error: type[HomelabError] = BuildError) -> tuple[Path, dict[str, Any]]:
    """The image to boot or deploy and its manifest: the given qcow2, or the role's newest complete build."""
    if image is None:
        latest = latest_build(settings, role)
        if latest is None:
            raise error(f"no image of {role} is built in {settings.role_dir(role)}: run `homelab build image {role}`")
        return Path(latest["path"]), latest
    manifest_path = manifest_of(image)
    if not image.is_file() or not manifest_path.is_file():
        raise error(f"{image}: not a built image (needs the qcow2 and its {manifest_path.name}): "
                    f"run `homelab build image {role}`")
    return image, read_manifest(manifest_path, error)
