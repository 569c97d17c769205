"""PveEmulator: the Proxmox VE 8.4 API over HTTPS on loopback, stateful, checked against the real schema.

    with PveEmulator() as pve:
        api = proxmoxer.ProxmoxAPI(**pve.proxmoxer_kwargs())
        api.version.get()

A request goes through the steps PVE's API server takes, in its order: API token (401), path and method
(501), fault injection, the schema's permission check (403), parameter verification (400), then the
handler (handlers.py) under the state's lock. Runs in a thread of the test process: it starts no process.

`python -m tests.pve.emulator` runs one in a process of its own (a bench, a manual session): it prints one JSON
line (url, token as PVE_TOKEN takes it, fingerprint, ca_file) and serves until its stdin closes.
"""

from __future__ import annotations

import json
import logging
import ssl
import sys
import tempfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .call import Call, Upload
from .faults import Fault, Faults, Request
from .handlers import ROUTES
from .multipart import MultipartError, read_form
from .permissions import check_expression
from .schema import ApiError, Schema
from .state import PveState
from .tls import make_certificates

log = logging.getLogger(__name__)

PREFIX = "/api2/json"


class PveEmulator:
    """A running emulated node. `.url`, `.fingerprint`, `.ca_file`, `.state`, `.requests`; faults via
    `fail`, `hang`, `fail_task`. Use as a context manager, or `start()` and `close()`."""

    def __init__(self, state: PveState | None = None, schema: Schema | None = None, host: str = "127.0.0.1") -> None:
        self.state = state or PveState()
        self.schema = schema or Schema.load()
        self.host = host
        self.faults = Faults()
        self.auth_failure_delay = 0.0  # seconds; PVE waits 3 before answering a 401
        self.requests: list[Request] = []
        self._closing = threading.Event()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- life cycle

    def start(self) -> PveEmulator:
        self._tmp = tempfile.TemporaryDirectory(prefix="pve-emulator-")
        self.workdir = Path(self._tmp.name)
        certs = make_certificates(self.workdir, self.host)
        self.ca_file, self.fingerprint = certs.ca_file, certs.fingerprint
        self.state.fingerprint = certs.fingerprint
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs.cert_file, certs.key_file)
        self._server = _Server((self.host, 0), _Handler, context, self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="pve-emulator",
                                        daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> PveEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- what a test uses

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}{PREFIX}"

    @property
    def token(self) -> tuple[str, str]:
        """(token id "user@realm!name", secret) of the first configured token."""
        return next(iter(self.state.tokens.items()))

    def proxmoxer_kwargs(self, verify_ssl: bool | str = False, timeout: float = 5) -> dict[str, Any]:
        tokenid, secret = self.token
        user, name = tokenid.split("!")
        return {"host": self.host, "port": self.port, "user": user, "token_name": name, "token_value": secret,
                "verify_ssl": verify_ssl, "timeout": timeout}

    def fail(self, method: str, path: str, nth: int = 1, status: int = 500, message: str = "injected failure") -> Fault:
        """The Nth `method` request whose API path matches the regex `path` answers HTTP `status`."""
        return self.faults.add(Fault(method, path, "error", nth, status=status, message=message))

    def hang(self, method: str, path: str, nth: int = 1, seconds: float = 30.0) -> Fault:
        """The Nth matching request gets no answer for `seconds` (or until the emulator closes)."""
        return self.faults.add(Fault(method, path, "hang", nth, seconds=seconds))

    def fail_task(self, method: str, path: str, nth: int = 1, exitstatus: str = "injected task failure") -> Fault:
        """The Nth matching request succeeds, but the task it starts ends with this exitstatus."""
        return self.faults.add(Fault(method, path, "task", nth, message=exitstatus))

    def calls(self, method: str | None = None, path: str | None = None) -> list[Request]:
        """The request log, optionally only one method and paths matching a regex."""
        import re

        return [r for r in self.requests
                if (method is None or r.method == method) and (path is None or re.search(path, r.path))]

    # --- one request

    def handle(self, request: _Handler) -> None:
        parsed = urllib.parse.urlsplit(request.path)
        path = parsed.path[len(PREFIX):] if parsed.path.startswith(PREFIX + "/") else parsed.path
        entry = Request(request.command, path, {})
        self.requests.append(entry)
        upload: Upload | None = None
        try:
            if not parsed.path.startswith(PREFIX + "/"):
                raise ApiError(501, f"Method '{request.command} {parsed.path}' not implemented")
            user = self._authenticate(request)
            endpoint = self.schema.resolve(request.command, path)
            params, upload = self._read_params(request, parsed.query)
            entry.params = {k: v if len(v) > 1 else v[0] for k, v in params.items()}
            with self.state.lock:  # the Nth match stays the Nth under concurrent requests
                fault = self.faults.take(request.command, path)
            if fault is not None and fault.kind == "error":
                raise ApiError(fault.status, fault.message)
            if fault is not None and fault.kind == "hang":
                self._closing.wait(fault.seconds)
                raise ApiError(500, "hung request answered after all")
            raw = {k: v[0] for k, v in params.items()} | dict(endpoint.path_params)
            self._check_permissions(endpoint.permissions, raw, user)
            checked = self.schema.check(endpoint, params)
            data = self._dispatch(endpoint, checked, user, upload, fault)
            entry.status = 200
            request.answer(200, "OK", {"data": data})
        except ApiError as e:
            entry.status = e.status
            body: dict[str, Any] = {"data": None, "message": e.message + "\n"}
            if e.errors:
                body["errors"] = e.errors
            request.answer(e.status, e.message, body)
        except Exception as e:  # an emulator bug: answered like a PVE handler's die, and logged
            log.exception("emulator failed on %s %s", request.command, path)
            entry.status = 500
            request.answer(500, f"emulator error: {e!r}", {"data": None})
        finally:
            if upload is not None and upload.path.exists():
                upload.path.unlink()

    def _authenticate(self, request: _Handler) -> str:
        """`Authorization: PVEAPIToken=user@realm!tokenid=secret`, else 401 with pve-http-server's reason:
        "No ticket" without credentials, PVE::AccessControl's message for an unknown token or a wrong secret.
        (PVE also delays every 401 by 3 seconds; `auth_failure_delay` does that when set.)"""
        header = request.headers.get("Authorization", "")
        if not header.startswith("PVEAPIToken="):
            raise ApiError(401, "No ticket")
        tokenid, sep, secret = header[len("PVEAPIToken="):].rpartition("=")
        user, _, name = tokenid.partition("!")
        if not sep or tokenid not in self.state.tokens:
            self._closing.wait(self.auth_failure_delay)
            raise ApiError(401, f"no such token '{name}' for user '{user}'")
        if self.state.tokens[tokenid] != secret:
            self._closing.wait(self.auth_failure_delay)
            raise ApiError(401, "invalid token value!")
        return tokenid

    def _read_params(self, request: _Handler, query: str) -> tuple[dict[str, list[str]], Upload | None]:
        """Query parameters (any method, as PVE merges them) plus the body: form-encoded, JSON or multipart."""
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        length = int(request.headers.get("Content-Length") or 0)
        kind = request.headers.get("Content-Type", "")
        upload = None
        if kind.startswith("multipart/form-data"):
            try:
                form = read_form(request.rfile, length, kind, self.workdir)
            except MultipartError as e:
                raise ApiError(400, f"multipart error: {e}") from e
            for key, values in form.fields.items():
                params.setdefault(key, []).extend(values)
            if form.path is not None and form.file_field is not None:
                upload = Upload(form.path, form.filename or "", form.size)
                params.setdefault(form.file_field, []).append(form.filename or "")
        elif length:
            body = request.rfile.read(length)
            if kind.startswith("application/json"):
                decoded = json.loads(body or b"{}")
                for key, value in decoded.items():
                    params.setdefault(key, []).extend(value if isinstance(value, list) else [_text(value)])
            else:
                for key, values in urllib.parse.parse_qs(body.decode(), keep_blank_values=True).items():
                    params.setdefault(key, []).extend(values)
        return params, upload

    def _check_permissions(self, permissions: dict[str, Any], params: dict[str, str], user: str) -> None:
        check = permissions.get("check")
        if check:
            check_expression(check, params, lambda path: self.state.privileges(user, path))

    def _dispatch(self, endpoint: Any, params: dict[str, Any], user: str, upload: Upload | None,
                  fault: Fault | None) -> Any:
        handler = ROUTES.get((endpoint.method, endpoint.template))
        if handler is None:
            raise ApiError(501, f"Method '{endpoint.method} {endpoint.template}' not implemented by the emulator")
        call = Call(self.state, endpoint, params, user, self.workdir, upload=upload,
                    task_error=fault.message if fault is not None and fault.kind == "task" else None)
        with self.state.lock:
            return handler(call)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], context: ssl.SSLContext,
                 emulator: PveEmulator) -> None:
        super().__init__(address, handler)
        self.context = context
        self.emulator = emulator

    def finish_request(self, request: Any, client_address: Any) -> None:
        """TLS handshake in the connection's own thread, so a stalled client never blocks accept()."""
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log.debug("TLS handshake failed: %s", e)
            return
        super().finish_request(tls, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two TLS writes: without this, 40 ms per answer
    server: _Server

    def do_GET(self) -> None:
        self.server.emulator.handle(self)

    do_POST = do_PUT = do_DELETE = do_GET

    def answer(self, status: int, message: str, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        try:
            self.send_response(status, message.replace("\n", " ").strip())
            self.send_header("Content-Type", "application/json;charset=UTF-8")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Cache-Control", "max-age=0")
            self.send_header("Server", "pve-api-daemon/3.0")
            if status >= 400:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(payload)
        except (TimeoutError, BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


def main() -> None:
    with PveEmulator() as pve:
        tokenid, secret = pve.token
        print(json.dumps({"url": f"https://{pve.host}:{pve.port}", "token": f"{tokenid}={secret}",
                          "fingerprint": pve.fingerprint, "ca_file": str(pve.ca_file)}), flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
