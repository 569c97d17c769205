"""Permission checks: the schema's `permissions.check` expressions and the checks PVE makes in code.

PVE::RPCEnvironment::check_api2_permissions evaluates `check` before the handler runs:
["perm", PATH, [PRIVS], "any", 1] (all privileges, or any with "any"), ["and", ...], ["or", ...];
PATH may name parameters ("/vms/{vmid}"). A failure is HTTP 403 "Permission check failed (PATH, PRIV)".
Calls documented with only a `description` or `user: all` check in the handler's code; CODE_CHECKS
mirrors those for the calls the emulator implements.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

from .schema import ApiError

log = logging.getLogger(__name__)

Privileges = Callable[[str], set[str]]


class Forbidden(ApiError):
    """PVE::Exception::raise_perm_exc: "Permission check failed (PATH, PRIVS)", or bare without a path."""

    def __init__(self, path: str | None, privs: list[str]) -> None:
        detail = f" ({path}, {'|'.join(privs)})" if path else ""
        super().__init__(403, f"Permission check failed{detail}")


def check_expression(expr: Any, params: Mapping[str, Any], privileges: Privileges) -> None:
    """Evaluate a `permissions.check` expression; Forbidden when it fails. Unknown forms pass (logged)."""
    kind = expr[0]
    if kind == "perm":
        check_perm(expr, params, privileges)
    elif kind == "and":
        for sub in expr[1:]:
            check_expression(sub, params, privileges)
    elif kind == "or":
        failure: Forbidden | None = None
        for sub in expr[1:]:
            try:
                check_expression(sub, params, privileges)
                return
            except Forbidden as e:
                failure = failure or e
        if failure:
            raise failure
    else:
        log.warning("permission check form not emulated, allowed: %r", expr)


def check_perm(expr: list[Any], params: Mapping[str, Any], privileges: Privileges) -> None:
    """["perm", PATH, [PRIVS], ("any", 1)?, ("require_param", NAME)?]."""
    path = substitute(expr[1], params)
    wanted = list(expr[2])
    options = dict(zip(expr[3::2], expr[4::2], strict=False))
    if "require_param" in options and options["require_param"] not in params:
        raise Forbidden(path, wanted)
    require(privileges, path, wanted, any_of=bool(options.get("any")))


def require(privileges: Privileges, path: str, wanted: list[str], any_of: bool = False) -> None:
    have = privileges(path)
    ok = any(p in have for p in wanted) if any_of else all(p in have for p in wanted)
    if not ok:
        missing = wanted if any_of else [p for p in wanted if p not in have]
        raise Forbidden(path, missing)


def substitute(path: str, params: Mapping[str, Any]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: str(params.get(m[1], m[0])), path)
