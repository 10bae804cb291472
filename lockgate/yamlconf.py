"""YAML loading that remembers where every value came from.

Validation code walks plain Python data (dicts, lists, scalars) and reports problems by *field path*
(``models[0].versions.v2.endpoints[1]``); :class:`SourceMap` turns a path back into the file line and
column, so every error names the file, the line and the field. Validators collect all problems
(:class:`ErrorCollector`) instead of stopping at the first, and raise one :class:`ConfigError` at the
end: a bad file is reported whole, and nothing is applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

PathPart = str | int


def format_path(path: tuple[PathPart, ...]) -> str:
    """``("models", 0, "name")`` → ``models[0].name``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a file: where (path, line, column) and what."""

    path: str
    message: str
    line: int | None = None
    column: int | None = None

    def render(self, source: str) -> str:
        where = source
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.path}: {self.message}"


class ConfigError(Exception):
    """A configuration or spec file is invalid. ``problems`` lists every problem found."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(p.render(source) for p in problems))


class SourceMap:
    """Maps field paths of a loaded YAML document to (line, column), both 1-based."""

    def __init__(self) -> None:
        self._marks: dict[tuple[PathPart, ...], tuple[int, int]] = {}

    def add(self, path: tuple[PathPart, ...], node: yaml.Node) -> None:
        self._marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)

    def locate(self, path: tuple[PathPart, ...]) -> tuple[int | None, int | None]:
        """Position of ``path``, or of its nearest ancestor that exists in the file."""
        while True:
            if path in self._marks:
                return self._marks[path]
            if not path:
                return None, None
            path = path[:-1]


def _construct(node: yaml.Node, path: tuple[PathPart, ...], smap: SourceMap, source: str) -> Any:
    smap.add(path, node)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = yaml.SafeLoader(" ").construct_object(key_node)  # scalar keys only
            if not isinstance(key, (str, int, float, bool)):
                raise ConfigError(source, [Problem(format_path(path), "mapping keys must be plain scalars",
                                                   key_node.start_mark.line + 1, key_node.start_mark.column + 1)])
            key = str(key)
            if key in out:
                raise ConfigError(source, [Problem(format_path(path + (key,)), "duplicate key",
                                                   key_node.start_mark.line + 1, key_node.start_mark.column + 1)])
            out[key] = _construct(value_node, path + (key,), smap, source)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, path + (i,), smap, source) for i, item in enumerate(node.value)]
    loader = yaml.SafeLoader(" ")
    return loader.construct_object(node)


def load_yaml(text: str, source: str) -> tuple[Any, SourceMap]:
    """Parse one YAML document; returns (data, source map). Raises :class:`ConfigError`."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        col = mark.column + 1 if mark is not None else None
        msg = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [Problem("<root>", f"invalid YAML: {msg}", line, col)]) from None
    smap = SourceMap()
    if node is None:
        return None, smap
    return _construct(node, (), smap, source), smap


def load_yaml_file(path: str | Path) -> tuple[Any, SourceMap, str]:
    """Read and parse ``path``; returns (data, source map, source name for messages)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [Problem("<root>", f"cannot read file: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError:
        raise ConfigError(source, [Problem("<root>", "file is not UTF-8 text")]) from None
    data, smap = load_yaml(text, source)
    return data, smap, source


@dataclass
class ErrorCollector:
    """Collects problems while validating; ``raise_if_any`` raises one ConfigError with all of them."""

    source: str
    smap: SourceMap
    problems: list[Problem] = field(default_factory=list)

    def add(self, path: tuple[PathPart, ...], message: str) -> None:
        line, col = self.smap.locate(path)
        self.problems.append(Problem(format_path(path), message, line, col))

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError(self.source, sorted(self.problems, key=lambda p: (p.line or 0, p.column or 0)))


class Fields:
    """Typed access to one mapping while validating; unknown keys are reported as errors.

    Each getter returns a default (and records a problem) when the value is missing or of the
    wrong type, so validation can go on and report everything in one pass.
    """

    def __init__(self, data: Any, path: tuple[PathPart, ...], errors: ErrorCollector):
        self.path = path
        self.errors = errors
        if data is None:
            data = {}
        if not isinstance(data, dict):
            errors.add(path, f"must be a mapping, got {type_name(data)}")
            data = {}
        self.data: dict[str, Any] = data
        self._seen: set[str] = set()

    def _get(self, key: str, required: bool) -> Any:
        self._seen.add(key)
        if key not in self.data:
            if required:
                self.errors.add(self.path + (key,), "is required")
            return None
        if self.data[key] is None and required:
            self.errors.add(self.path + (key,), "is required but empty")
        return self.data[key]

    def str(self, key: str, default: str | None = None, required: bool = False) -> str | None:
        value = self._get(key, required)
        if value is None:
            return default
        if not isinstance(value, str):
            self.errors.add(self.path + (key,), f"must be a string, got {type_name(value)}")
            return default
        return value

    def int(self, key: str, default: int | None = None, *, min: int | None = None, max: int | None = None,
            required: bool = False) -> int | None:
        value = self._get(key, required)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.errors.add(self.path + (key,), f"must be an integer, got {type_name(value)}")
            return default
        if (min is not None and value < min) or (max is not None and value > max):
            self.errors.add(self.path + (key,), f"must be between {min} and {max}, got {value}")
            return default
        return value

    def float(self, key: str, default: float | None = None, *, min: float | None = None,
              max: float | None = None, required: bool = False) -> float | None:
        value = self._get(key, required)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.errors.add(self.path + (key,), f"must be a number, got {type_name(value)}")
            return default
        if (min is not None and value < min) or (max is not None and value > max):
            self.errors.add(self.path + (key,), f"must be between {min} and {max}, got {value}")
            return default
        return float(value)

    def bool(self, key: str, default: bool = False) -> bool:
        value = self._get(key, False)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.errors.add(self.path + (key,), f"must be true or false, got {type_name(value)}")
            return default
        return value

    def raw(self, key: str, required: bool = False) -> Any:
        return self._get(key, required)

    def sub(self, key: str, required: bool = False) -> "Fields":
        return Fields(self._get(key, required), self.path + (key,), self.errors)

    def list(self, key: str, required: bool = False) -> Iterator[tuple[tuple[PathPart, ...], Any]]:
        value = self._get(key, required)
        if value is None:
            return iter(())
        if not isinstance(value, list):
            self.errors.add(self.path + (key,), f"must be a list, got {type_name(value)}")
            return iter(())
        return (((self.path + (key, i)), item) for i, item in enumerate(value))

    def finish(self) -> None:
        """Report keys that no getter asked for (typos such as ``stabel``)."""
        for key in self.data:
            if key not in self._seen:
                known = ", ".join(sorted(self._seen))
                self.errors.add(self.path + (key,), f"unknown field (known: {known})")


def type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "nothing"}.get(type(value), type(value).__name__)
