"""Request checking against the real PVE 8.4 API schema (pve-docs' apidata, see ../shared/pve-api/README.md).

PVE checks every call's parameters with PVE::JSONSchema before the handler runs: unknown or missing
parameters, wrong types, enums, ranges, lengths and patterns are refused with HTTP 400 "Parameter
verification failed." and a body `{"data": null, "errors": {PARAM: REASON}}`. The reasons below are PVE's
own wording (PVE/JSONSchema.pm), so a test can assert on them as it would against a real node.
"""

from __future__ import annotations

import json
import logging
import os
import re
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROJECT = Path(__file__).resolve().parents[2]
DEFAULT_SCHEMA = PROJECT.parent / "shared" / "pve-api" / "pve-8.4-apidata.json"

# PVE::JSONSchema messages.
NOT_IN_SCHEMA = "property is not defined in schema and the schema does not allow additional properties"
MISSING = "property is missing and it is not optional"

# Parameters PVE's REST handler (not the client) sets; proxmoxer never sends them.
TRUE_WORDS = {"1", "on", "yes", "true"}
FALSE_WORDS = {"0", "off", "no", "false"}


def schema_path() -> Path:
    """The apidata file: $HOMELAB_PVE_SCHEMA, else ../shared/pve-api/ beside the project (CI clones sit there too)."""
    return Path(os.environ.get("HOMELAB_PVE_SCHEMA") or DEFAULT_SCHEMA)


class ApiError(Exception):
    """An HTTP error as PVE sends it: the message is the status line's reason, `errors` the body's errors."""

    def __init__(self, status: int, message: str, errors: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message
        self.errors = dict(errors) if errors else None


class ParamError(ApiError):
    """HTTP 400 "Parameter verification failed." (PVE::Exception::raise_param_exc)."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        super().__init__(400, "Parameter verification failed.", errors)


@dataclass(frozen=True)
class Endpoint:
    """One method of one API path, with the values of its templated segments ({node}, {vmid} ...)."""

    template: str
    method: str
    info: Mapping[str, Any]
    path_params: Mapping[str, str] = field(default_factory=dict)

    @property
    def properties(self) -> Mapping[str, Any]:
        return self.info.get("parameters", {}).get("properties", {})  # type: ignore[no-any-return]

    @property
    def permissions(self) -> Mapping[str, Any]:
        return self.info.get("permissions") or {}  # type: ignore[no-any-return]


class Schema:
    """The API tree, indexed by path template for resolving and checking requests."""

    def __init__(self, tree: list[dict[str, Any]]) -> None:
        self.paths: dict[str, dict[str, Any]] = {node["path"]: node.get("info", {}) for node in _walk(tree)}

    @classmethod
    def load(cls, path: Path | None = None) -> Schema:
        return _load(str(path or schema_path()))

    def resolve(self, method: str, path: str) -> Endpoint:
        """The endpoint for a request path ("/nodes/pve/qemu/100/config", segments percent-encoded or not),
        or PVE's 501 for an unknown one.

        pve-http-server answers any path or method the API does not define with
        "501 Method 'GET /x' not implemented".
        """
        path = "/" + path.strip("/")
        for template, info in self.paths.items():
            values = match_template(template, path)
            if values is not None and method in info:
                return Endpoint(template, method, info[method], values)
        raise ApiError(501, f"Method '{method} {path}' not implemented")

    def check(self, endpoint: Endpoint, params: Mapping[str, list[str]]) -> dict[str, Any]:
        """The checked parameters (path values included, arrays as lists); ParamError naming every bad one."""
        merged: dict[str, list[str]] = {k: list(v) for k, v in params.items()}
        errors: dict[str, str] = {}
        for name, value in endpoint.path_params.items():
            if merged.setdefault(name, [value]) != [value]:  # PVE::HTTPServer::rest_handler
                errors[name] = "duplicate parameter (already defined in URI)"
        values: dict[str, Any] = {}
        for name, given in merged.items():
            prop = property_schema(endpoint.properties, name)
            if prop is None:
                errors[name] = NOT_IN_SCHEMA
                continue
            if prop.get("type") == "array":
                values[name] = given
                continue
            if len(given) > 1 and str(prop.get("format", "")).endswith("-list"):
                given = [",".join(given)]  # RESTHandler's normalize_legacy_param_formats
            if len(given) > 1:
                errors[name] = f"type check ('{prop.get('type', 'string')}') failed - got ARRAY"
                continue
            reason = check_value(prop, given[0])
            if reason:
                errors[name] = reason
            else:
                values[name] = given[0]
        errors.update(missing_parameters(endpoint.properties, merged))
        if errors:
            raise ParamError(errors)
        return values


@cache
def _load(path: str) -> Schema:
    if not Path(path).is_file():
        raise FileNotFoundError(f"PVE API schema {path} not found: set HOMELAB_PVE_SCHEMA to pve-8.4-apidata.json "
                                "(../shared/pve-api/ beside the project by default)")
    with open(path, encoding="utf-8") as f:
        return Schema(json.load(f))


def _walk(nodes: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for node in nodes:
        yield node
        yield from _walk(node.get("children", []))


# Paths whose last segment takes the rest of the URI: pve-storage registers .../content with
# `fragmentDelimiter => ''` "because volume IDs may contain a slash" (local:iso/x.iso).
WHOLE_REST = {"/nodes/{node}/storage/{storage}/content/{volume}"}


def match_template(template: str, path: str) -> dict[str, str] | None:
    """{name: value} of the templated segments when `path` matches `template` segment by segment
    (PVE::RESTHandler::map_path_to_methods; each segment percent-decoded)."""
    want = template.strip("/").split("/")
    got = [urllib.parse.unquote(segment) for segment in path.strip("/").split("/")]
    if template in WHOLE_REST and len(got) > len(want):
        got = [*got[: len(want) - 1], "/".join(got[len(want) - 1 :])]
    if len(want) != len(got):
        return None
    values: dict[str, str] = {}
    for w, g in zip(want, got, strict=True):
        if w.startswith("{") and w.endswith("}"):
            if not g:
                return None
            values[w[1:-1]] = g
        elif w != g:
            return None
    return values


NUMBERED = re.compile(r"^(?P<base>[a-z_-]+?)(?P<n>\d+)$")


def property_schema(properties: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    """The schema of a parameter; numbered keys (scsi0, net1, ide2) come from `scsi[n]` within its range.

    The apidata names them `scsi[n]` with the range in the description ("n is 0 to 30"), which is
    how PVE generates them (PVE::QemuServer's MAX_SCSI_DISKS ...).
    """
    if name in properties:
        return properties[name]  # type: ignore[no-any-return]
    m = NUMBERED.match(name)
    if not m:
        return None
    prop = properties.get(m["base"] + "[n]")
    if prop is None:
        return None
    highest = numbered_max(prop.get("description", ""))
    if highest is not None and int(m["n"]) > highest:
        return None
    return prop  # type: ignore[no-any-return]


def numbered_max(description: str) -> int | None:
    """The largest n of "(n is 0 to 30)" / "(n is 0 to 4, ... n can be up to 14)"; None if not stated."""
    m = re.search(r"\(n is ([^)]*)\)", description)
    if not m:
        return None
    return max(int(x) for x in re.findall(r"\d+", m[1]))


def missing_parameters(properties: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, str]:
    """Required parameters not given, and `requires` partners (checksum needs checksum-algorithm)."""
    errors = {}
    for name, prop in properties.items():
        if name.endswith("[n]"):
            continue
        if not prop.get("optional") and name not in given:
            errors[name] = MISSING
        partner = prop.get("requires")
        if name in given and isinstance(partner, str) and partner not in given:
            errors[partner] = f"missing property - '{name}' requires this property"
    return errors


def check_value(prop: Mapping[str, Any], value: str) -> str | None:
    """PVE::JSONSchema::check_type and friends for one scalar value given as text; the reason or None."""
    kind = prop.get("type", "string")
    if kind == "boolean":
        if value.lower() not in TRUE_WORDS | FALSE_WORDS:
            return f"type check ('boolean') failed - got '{value}'"
        return None
    if kind == "integer":
        if not re.fullmatch(r"[+-]?\d+", value):
            return f"type check ('integer') failed - got '{value}'"
        return check_range(prop, int(value))
    if kind == "number":
        if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", value):
            return f"type check ('number') failed - got '{value}'"
        return check_range(prop, float(value))
    return check_string(prop, value)


def check_range(prop: Mapping[str, Any], number: float) -> str | None:
    if "minimum" in prop and number < float(prop["minimum"]):
        return f"value must have a minimum value of {prop['minimum']}"
    if "maximum" in prop and number > float(prop["maximum"]):
        return f"value must have a maximum value of {prop['maximum']}"
    return None


def check_string(prop: Mapping[str, Any], value: str) -> str | None:
    if "maxLength" in prop and len(value) > int(prop["maxLength"]):
        return f"value may only be {prop['maxLength']} characters long"
    if "minLength" in prop and len(value) < int(prop["minLength"]):
        return f"value must be at least {prop['minLength']} characters long"
    if "enum" in prop and value not in prop["enum"]:
        return f"value '{value}' does not have a value in the enumeration '{', '.join(prop['enum'])}'"
    pattern = perl_regex(prop.get("pattern"))
    if pattern is not None and not pattern.fullmatch(value):
        return "value does not match the regex pattern"
    fmt = prop.get("format")
    if isinstance(fmt, dict):
        return check_property_string(fmt, value)
    if isinstance(fmt, str) and fmt in STRING_FORMATS:
        pattern, message = STRING_FORMATS[fmt]
        items = re.split(r"[;,\s]+", value) if fmt.endswith("-list") else [value]
        bad = next((item for item in items if item and not re.fullmatch(pattern, item)), None)
        if bad is not None:
            return "invalid format - " + message.format(bad)
    return None


# A few of PVE's named string formats (PVE::JSONSchema::register_format and pve-storage), with their errors;
# the others are not checked.
STRING_FORMATS: dict[str, tuple[str, str]] = {
    "pve-configid": (r"(?i)[a-z][a-z0-9_-]+", "invalid configuration ID '{}'"),
    "pve-configid-list": (r"(?i)[a-z][a-z0-9_-]+", "invalid configuration ID '{}'"),
    "pve-storage-id": (r"(?i)[a-z][a-z0-9\-_.]*[a-z0-9]", "storage ID '{}' contains illegal characters"),
    "pve-node": (r"[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?", "value does not look like a valid node name"),
    "pve-tag-list": (r"(?i)[a-z0-9_][a-z0-9_\-+.]*", "invalid tag '{}'"),
    "pve-volume-id": (r"[a-z][a-z0-9\-_.]*[a-z0-9]:.+", "unable to parse volume ID '{}'"),
}


@cache
def perl_regex(pattern: str | None) -> re.Pattern[str] | None:
    """A PVE pattern (Perl, matched as ^pattern$) in Python; None when absent or not translatable (logged)."""
    if not pattern:
        return None
    text = re.sub(r"\(\?\^(\w*):", lambda m: f"(?{m[1]}:" if m[1] else "(?:", pattern)
    try:
        return re.compile(text)
    except re.error:
        log.warning("PVE pattern not checked (not a Python regex): %s", pattern)
        return None


def check_property_string(fmt: Mapping[str, Any], value: str) -> str | None:
    """A property string ("local-zfs:0,import-from=local:import/x.qcow2") against its format.

    PVE::JSONSchema::parse_property_string: comma-separated key=value pairs, one bare value for the
    `default_key`, aliases, every key known, non-optional keys present, each value checked by type.
    """
    keys: dict[str, str] = {}
    errors: list[str] = []
    for part in split_property_string(value):
        key, sep, text = part.partition("=")
        if not sep:
            key, text = default_key(fmt), part
            if key is None:
                return "invalid format - value without key, but schema does not define a default key"
        alias = fmt.get(key, {})
        if "alias" in alias:  # net0: virtio=MAC is model=virtio,macaddr=MAC (an alias with a keyAlias)
            if "keyAlias" in alias:
                keys[alias["keyAlias"]] = key
            key = alias["alias"]
        sub = fmt.get(key)
        if sub is None:
            errors.append(f"{key}: {NOT_IN_SCHEMA}")
            continue
        if key in keys:
            errors.append(f"{key}: duplicate key in comma-separated list property")
            continue
        keys[key] = text
        reason = check_value(sub, text)
        if reason:
            errors.append(f"{key}: {reason}")
    for key, sub in fmt.items():
        if not sub.get("optional") and "alias" not in sub and "keyAlias" not in sub and key not in keys:
            errors.append(f"{key}: {MISSING}")
    if errors:
        return "invalid format - " + "; ".join(errors)
    return None


def default_key(fmt: Mapping[str, Any]) -> str | None:
    """The key a bare value stands for (`file` of a drive, `model` of a NIC, `enabled` of agent)."""
    return next((key for key, sub in fmt.items() if sub.get("default_key")), None)


def split_property_string(value: str) -> list[str]:
    """Split on commas, except inside double quotes (PVE allows quoted values)."""
    parts, current, quoted = [], "", False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current:
        parts.append(current)
    return parts
