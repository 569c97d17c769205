"""Declarative field tables: one table yields validation, help text and (for images) DIB arguments.

Modelled on diskimage-builder's PROPERTIES and mkosi's SETTINGS: every key a file may hold is a row
here, so an unknown key is an error naming it, and `homelab fields` prints the same rows as help.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import DefinitionError
from .yamlload import KeyPath, Located, dotted


class Kind:
    """How a value is checked and converted; `describe` is its name in help and errors."""

    describe = "value"

    def check(self, value: Any, keypath: KeyPath, doc: Located) -> Any:
        raise NotImplementedError

    def fail(self, value: Any, keypath: KeyPath, doc: Located, expected: str | None = None) -> DefinitionError:
        wanted = expected or self.describe
        return DefinitionError(f"{doc.where(keypath)}: {dotted(keypath)}: expected {wanted}, got {value!r}")


class Str(Kind):
    def __init__(self, choices: Sequence[str] = (), pattern: str | None = None, what: str | None = None) -> None:
        self.choices = tuple(choices)
        self.pattern = re.compile(pattern) if pattern else None
        if self.choices:
            self.describe = "one of " + ", ".join(self.choices)
        else:
            self.describe = what or "a string"

    def check(self, value: Any, keypath: KeyPath, doc: Located) -> str:
        if not isinstance(value, str):
            raise self.fail(value, keypath, doc)
        if self.choices and value not in self.choices:
            raise self.fail(value, keypath, doc)
        if self.pattern and not self.pattern.fullmatch(value):
            raise self.fail(value, keypath, doc)
        return value


class Int(Kind):
    def __init__(self, minimum: int | None = None, maximum: int | None = None) -> None:
        self.minimum, self.maximum = minimum, maximum
        bounds = [f">= {minimum}" if minimum is not None else "", f"<= {maximum}" if maximum is not None else ""]
        self.describe = " ".join(["an integer", *[b for b in bounds if b]])

    def check(self, value: Any, keypath: KeyPath, doc: Located) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(value, keypath, doc)
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
            raise self.fail(value, keypath, doc)
        return value


class Bool(Kind):
    describe = "true or false"

    def check(self, value: Any, keypath: KeyPath, doc: Located) -> bool:
        if not isinstance(value, bool):
            raise self.fail(value, keypath, doc)
        return value


class ListOf(Kind):
    def __init__(self, item: Kind, unique: bool = True) -> None:
        self.item = item
        self.unique = unique
        self.describe = f"a list of {item.describe}"

    def check(self, value: Any, keypath: KeyPath, doc: Located) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(value, keypath, doc)
        items = [self.item.check(v, (*keypath, i), doc) for i, v in enumerate(value)]
        if self.unique:
            seen: set[str] = set()
            for i, item in enumerate(items):
                marker = repr(item)
                if marker in seen:
                    raise DefinitionError(f"{doc.where((*keypath, i))}: {dotted((*keypath, i))}: duplicate {item!r}")
                seen.add(marker)
        return items


class Record(Kind):
    """A mapping with its own table of fields; unknown keys are rejected by name."""

    def __init__(self, fields: Sequence[Field], what: str = "a mapping") -> None:
        self.fields = tuple(fields)
        self.describe = what

    def check(self, value: Any, keypath: KeyPath, doc: Located) -> dict[str, Any]:
        if value is None and not any(f.required for f in self.fields):
            value = {}
        if not isinstance(value, dict):
            raise self.fail(value, keypath, doc)
        return check_mapping(value, self.fields, keypath, doc)


class MapOf(Kind):
    """A mapping from free-form names (e.g. role names) to values of one kind."""

    def __init__(self, value: Kind, key_pattern: str = r"[a-z][a-z0-9-]*", what: str = "a mapping") -> None:
        self.value = value
        self.key_pattern = re.compile(key_pattern)
        self.describe = what

    def check(self, value: Any, keypath: KeyPath, doc: Located) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(value, keypath, doc)
        result = {}
        for key, item in value.items():
            if not isinstance(key, str) or not self.key_pattern.fullmatch(key):
                raise DefinitionError(f"{doc.where((*keypath, key))}: {dotted((*keypath, key))}: invalid name {key!r}")
            result[key] = self.value.check(item, (*keypath, key), doc)
        return result


@dataclass(frozen=True)
class Field:
    name: str
    kind: Kind
    help: str
    required: bool = False
    default: Any = None
    # For image definitions: adds this field's value to the DIB arguments (elements, packages, env).
    dib: Callable[[Any, Any], None] | None = field(default=None, compare=False)


def check_mapping(value: dict[Any, Any], fields: Sequence[Field], keypath: KeyPath, doc: Located) -> dict[str, Any]:
    by_name = {f.name: f for f in fields}
    for key in value:
        if key not in by_name:
            known = ", ".join(sorted(by_name))
            raise DefinitionError(
                f"{doc.where((*keypath, key))}: unknown key {dotted((*keypath, key))!r} (known: {known})"
            )
    result: dict[str, Any] = {}
    for f in fields:
        if f.name in value and value[f.name] is not None:
            result[f.name] = f.kind.check(value[f.name], (*keypath, f.name), doc)
        elif f.required:
            raise DefinitionError(f"{doc.where(keypath)}: missing required key {dotted((*keypath, f.name))!r}")
        else:
            result[f.name] = f.default() if callable(f.default) else f.default
    return result


def help_rows(fields: Sequence[Field], prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, type, help) rows for every field, nested records flattened with dotted names."""
    rows = []
    for f in fields:
        name = f"{prefix}{f.name}"
        kind = f.kind
        required = " (required)" if f.required else ""
        rows.append((name, kind.describe + required, f.help))
        inner = kind.item if isinstance(kind, ListOf) else kind
        inner = inner.value if isinstance(inner, MapOf) else inner
        if isinstance(inner, Record):
            suffix = "[]." if isinstance(kind, ListOf) else ".<name>." if isinstance(kind, MapOf) else "."
            rows.extend(help_rows(inner.fields, name + suffix))
    return rows
