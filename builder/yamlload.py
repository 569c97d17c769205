"""YAML loading that remembers where every key stood, so errors can say file:line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import DefinitionError

# A path into a document: ("vm", "cores") or ("volumes", 0, "name").
KeyPath = tuple[Any, ...]


class Located:
    """Parsed YAML data plus the line (1-based) of every key path in it."""

    def __init__(self, path: Path, data: Any, lines: dict[KeyPath, int]) -> None:
        self.path = path
        self.data = data
        self.lines = lines

    def where(self, keypath: KeyPath) -> str:
        """'file:line' of the nearest enclosing key that has a known line."""
        probe = tuple(keypath)
        while probe and probe not in self.lines:
            probe = probe[:-1]
        line = self.lines.get(probe)
        return f"{self.path}:{line}" if line else str(self.path)


def _construct(node: yaml.Node, keypath: KeyPath, lines: dict[KeyPath, int], file: Path) -> Any:
    lines.setdefault(keypath, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = yaml.safe_load(yaml.serialize(key_node))
            if key in result:
                line = key_node.start_mark.line + 1
                raise DefinitionError(f"{file}:{line}: duplicate key {_dotted((*keypath, key))!r}")
            lines[(*keypath, key)] = key_node.start_mark.line + 1
            result[key] = _construct(value_node, (*keypath, key), lines, file)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, (*keypath, i), lines, file) for i, item in enumerate(node.value)]
    return yaml.safe_load(yaml.serialize(node))


def _dotted(keypath: KeyPath) -> str:
    text = ""
    for part in keypath:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def dotted(keypath: KeyPath) -> str:
    """('volumes', 0, 'name') -> 'volumes[0].name'."""
    return _dotted(keypath)


def read_input(path: Path, shown: str | None = None) -> str:
    """A project or user file's text; missing or unreadable is one DefinitionError line naming it (as `shown`)."""
    name = shown if shown is not None else str(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DefinitionError(f"{name}: file not found") from None
    except OSError as exc:
        raise DefinitionError(f"{name}: cannot read: {exc.strerror}") from None


def load_located(path: Path) -> Located:
    """Parse a YAML file; a syntax error or a missing file becomes one DefinitionError line."""
    text = read_input(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise DefinitionError(f"{where}: invalid YAML: {problem}") from None
    lines: dict[KeyPath, int] = {}
    data = {} if node is None else _construct(node, (), lines, path)
    return Located(path, data, lines)
