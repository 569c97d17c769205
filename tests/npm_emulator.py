"""A small stateful stand-in for Nginx Proxy Manager's REST API, for the applier's host test.

It exists only because NPM's container image cannot be fetched on this machine (no registry access in the
test environment): the real NPM 2.13.7 is what the applier talks to on the extranet VM. What it reproduces is
what the applier relies on, taken from NPM's source (github.com/NginxProxyManager/nginx-proxy-manager):

- every request body is validated against NPM's own request schemas (tests/fixtures/npm-api/requests.json,
  transcribed from backend/schema/paths/...): an unknown or missing field, a wrong type -> 400 with NPM's error
  shape {"error": {"code", "message"}};
- POST /api/tokens {identity, secret} -> {token, expires}, a wrong login -> 401; every /api/nginx call needs the
  Bearer token;
- access lists carry their clients and items only when asked (?expand=clients,items), as NPM's list endpoint
  does; proxy hosts come back with NPM's defaults for the fields a request left out, and with NPM's own status
  keys in meta (nginx_online, nginx_err);
- NPM refuses a second proxy host for a domain already in use (400; NPM also counts redirection and dead hosts,
  which the emulator does not have) (backend/internal/proxy-host.js);
- an update replaces meta whole, then NPM sets its status keys (backend/internal/proxy-host.js: `.patch(data)`,
  then internalNginx.configure);
- like NPM's `nginx -t` after writing a host's config, which checks the whole configuration, a save while the
  saved host or any online one names a limit_req zone that <data>/nginx/custom/http_top.conf does not declare
  puts the saved host offline (meta.nginx_online false, nginx_err; NPM sets its config aside as .err).

It is not NPM: it renders no nginx configuration and checks nothing else of advanced_config.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema

REQUESTS = json.loads((Path(__file__).resolve().parent / "fixtures" / "npm-api" / "requests.json").read_text())
# The fields of a proxy host NPM returns, with its defaults for those a create leaves out
# (backend/schema/components/proxy-host-object.json "required").
HOST_DEFAULTS: dict[str, Any] = {
    "access_list_id": 0, "certificate_id": 0, "ssl_forced": False, "caching_enabled": False, "block_exploits": False,
    "advanced_config": "", "meta": {}, "allow_websocket_upgrade": False, "http2_support": False,
    "forward_scheme": "http", "enabled": True, "locations": [], "hsts_enabled": False, "hsts_subdomains": False,
}

ZONE_DECLARED = re.compile(r"^limit_req_zone .*\bzone=([A-Za-z0-9_]+):", re.MULTILINE)
ZONE_USED = re.compile(r"^limit_req zone=([A-Za-z0-9_]+)", re.MULTILINE)


class ApiError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class NpmEmulator:
    """State plus a log of every request: (method, path, body)."""

    def __init__(self, email: str, password: str, data_dir: Path, not_ready_for: int = 0) -> None:
        self.email, self.password = email, password
        self.data_dir = data_dir  # NPM's /data
        self.not_ready_for = not_ready_for  # GET /api/ answers 502 this many times, as while NPM starts
        self.tokens: set[str] = set()
        self.access_lists: dict[int, dict[str, Any]] = {}
        self.proxy_hosts: dict[int, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, Any]] = []
        self._next_id = 1
        self._lock = threading.Lock()

    # --- what the tests look at --------------------------------------------------------------------------------

    def writes(self) -> list[tuple[str, str]]:
        """Requests that change state (a login is not one)."""
        return [(m, p) for m, p, _ in self.requests if m != "GET" and p != "/api/tokens"]

    def host(self, domain: str) -> dict[str, Any]:
        return next(h for h in self.proxy_hosts.values() if domain in h["domain_names"])

    def add_host(self, **fields: Any) -> dict[str, Any]:
        """A host made by hand in NPM's UI."""
        return self._create_host(fields)

    # --- the API ------------------------------------------------------------------------------------------------

    def handle(self, method: str, path: str, token: str | None, body: Any) -> tuple[int, Any]:
        with self._lock:
            self.requests.append((method, path.split("?")[0], body))
            try:
                return self._route(method, path, token, body)
            except ApiError as exc:
                return exc.code, {"error": {"code": exc.code, "message": exc.message}}

    def _route(self, method: str, path: str, token: str | None, body: Any) -> tuple[int, Any]:
        route, _, query = path.partition("?")
        if (method, route) == ("GET", "/api/"):
            if self.not_ready_for > 0:
                self.not_ready_for -= 1
                raise ApiError(502, "Bad Gateway")
            return 200, {"status": "OK", "setup": True, "version": {"major": 2, "minor": 13, "revision": 7}}
        if (method, route) == ("POST", "/api/tokens"):
            return self._login(body)
        if token not in self.tokens:
            raise ApiError(401, "Permission Denied")
        expand = set(re.findall(r"[a-z_]+", query.partition("expand=")[2])) if "expand=" in query else set()
        kind, ident = self._parse(route)
        if kind == "access-lists":
            return self._access_lists(method, ident, body, expand)
        if kind == "proxy-hosts":
            return self._proxy_hosts(method, ident, body)
        raise ApiError(404, f"Not Found - {route}")

    @staticmethod
    def _parse(route: str) -> tuple[str, int | None]:
        match = re.fullmatch(r"/api/nginx/(access-lists|proxy-hosts)(?:/(\d+))?", route)
        if not match:
            raise ApiError(404, f"Not Found - {route}")
        return match.group(1), int(match.group(2)) if match.group(2) else None

    def _validate(self, operation: str, body: Any) -> None:
        error = jsonschema.exceptions.best_match(jsonschema.Draft7Validator(REQUESTS[operation]).iter_errors(body))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path)
            raise ApiError(400, f"data{'/' + where if where else ''} {error.message}")

    def _login(self, body: Any) -> tuple[int, Any]:
        self._validate("POST /tokens", body)
        if body["identity"] != self.email or body["secret"] != self.password:
            raise ApiError(401, "Invalid email or password")
        token = secrets.token_hex(16)
        self.tokens.add(token)
        return 200, {"token": token, "expires": "2099-01-01T00:00:00.000Z"}

    def _stamp(self) -> dict[str, Any]:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        ident, self._next_id = self._next_id, self._next_id + 1
        return {"id": ident, "created_on": now, "modified_on": now, "owner_user_id": 1}

    # --- access lists -------------------------------------------------------------------------------------------

    def _access_lists(self, method: str, ident: int | None, body: Any, expand: set[str]) -> tuple[int, Any]:
        if method == "GET" and ident is None:
            return 200, [self._list_view(a, expand) for a in self.access_lists.values()]
        if method == "POST" and ident is None:
            self._validate("POST /nginx/access-lists", body)
            new = {**self._stamp(), "name": body["name"], "meta": body.get("meta", {}),
                   "satisfy_any": body.get("satisfy_any", False), "pass_auth": body.get("pass_auth", False),
                   "clients": body.get("clients", []), "items": body.get("items", [])}
            self.access_lists[new["id"]] = new
            return 201, self._list_view(new, {"clients", "items"})
        row = self.access_lists.get(ident or 0)
        if row is None:
            raise ApiError(404, f"Access list {ident} not found")
        if method == "PUT":
            self._validate("PUT /nginx/access-lists/{id}", body)
            row.update(body)
            return 200, self._list_view(row, {"clients", "items"})
        if method == "DELETE":
            del self.access_lists[row["id"]]
            for host in self.proxy_hosts.values():
                if host["access_list_id"] == row["id"]:
                    host["access_list_id"] = 0
            return 200, True
        raise ApiError(404, "Not Found")

    def _list_view(self, row: dict[str, Any], expand: set[str]) -> dict[str, Any]:
        view = {k: v for k, v in row.items() if k not in ("clients", "items")}
        view["proxy_host_count"] = sum(h["access_list_id"] == row["id"] for h in self.proxy_hosts.values())
        if "clients" in expand:
            view["clients"] = [{"id": i + 1, "access_list_id": row["id"], "meta": {}, **c}
                               for i, c in enumerate(row["clients"])]
        if "items" in expand:
            view["items"] = [{"id": i + 1, "access_list_id": row["id"], "username": item.get("username", ""),
                              "password": "", "hint": "*****", "meta": {}} for i, item in enumerate(row["items"])]
        return view

    # --- proxy hosts --------------------------------------------------------------------------------------------

    def _proxy_hosts(self, method: str, ident: int | None, body: Any) -> tuple[int, Any]:
        if method == "GET" and ident is None:
            return 200, list(self.proxy_hosts.values())
        if method == "POST" and ident is None:
            self._validate("POST /nginx/proxy-hosts", body)
            return 201, self._create_host(body)
        row = self.proxy_hosts.get(ident or 0)
        if row is None:
            raise ApiError(404, f"Proxy host {ident} not found")
        if method == "PUT":
            self._validate("PUT /nginx/proxy-hosts/{id}", body)
            self._check_host(body, row["id"])
            row.update(body)
            self._configure(row)
            return 200, row
        if method == "DELETE":
            del self.proxy_hosts[row["id"]]
            return 200, True
        raise ApiError(404, "Not Found")

    def _check_host(self, body: dict[str, Any], ident: int | None) -> None:
        for other in self.proxy_hosts.values():
            used = set(other["domain_names"]) & set(body.get("domain_names", []))
            if other["id"] != ident and used:
                raise ApiError(400, f"{sorted(used)[0]} is already in use")
        if body.get("access_list_id", 0) and body["access_list_id"] not in self.access_lists:
            raise ApiError(400, f"Access list {body['access_list_id']} not found")

    def _create_host(self, body: dict[str, Any]) -> dict[str, Any]:
        self._check_host(body, None)
        row = {**self._stamp(), **json.loads(json.dumps(HOST_DEFAULTS)), **body}
        self.proxy_hosts[row["id"]] = row
        self._configure(row)
        return row

    def _configure(self, row: dict[str, Any]) -> None:
        """NPM's status keys after its `nginx -t`: every limit_req zone a host names must be declared."""
        try:
            declared = set(ZONE_DECLARED.findall((self.data_dir / "nginx" / "custom" / "http_top.conf").read_text()))
        except FileNotFoundError:
            declared = set()
        # NPM renames an offline host's config aside (.err), so only the saved host and the online ones count.
        loaded = [h for h in self.proxy_hosts.values() if h is row or (h.get("meta") or {}).get("nginx_online", True)]
        used = {zone for host in loaded for zone in ZONE_USED.findall(host["advanced_config"])}
        unknown = sorted(used - declared)
        error = f'nginx: [emerg] zone "{unknown[0]}" is unknown' if unknown else None
        row["meta"] = {**row.get("meta", {}), "nginx_online": not unknown, "nginx_err": error}


def _handler(emulator: NpmEmulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                status, answer = 400, {"error": {"code": 400, "message": "Unexpected token in JSON"}}
            else:
                auth = self.headers.get("Authorization", "")
                token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
                status, answer = emulator.handle(self.command, self.path, token, body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:  # quiet: the request log is emulator.requests
            pass

    return Handler


@contextmanager
def running(emulator: NpmEmulator) -> Iterator[str]:
    """Serve the emulator on 127.0.0.1 (a free port) in a thread; yields the API's base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(emulator))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
