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


#: Limits on any YAML lockgate reads (lockgate.yaml, rollout specs, specs posted to the controller):
#: the text's size in bytes (UTF-8), how deep collections nest, and how many values (scalars,
#: lists, mappings) one document holds. Aliases (``*name``) are refused altogether: expanding them
#: is how a few hundred bytes become billions of values (a "billion laughs" alias bomb).
MAX_YAML_BYTES = 1024 * 1024
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000

_MERGE_TAG = "tag:yaml.org,2002:merge"
_SCALAR_KEY_TYPES = (str, int, float, bool)
_COLLECTION_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


def _mark_problem(path: tuple[PathPart, ...], message: str, mark: Any) -> Problem:
    if mark is None:
        return Problem(format_path(path), message)
    return Problem(format_path(path), message, mark.line + 1, mark.column + 1)


def _line_col(text: str, index: int) -> tuple[int, int]:
    """1-based line and column of character ``index`` of ``text``."""
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def _events(text: str):
    """The YAML event stream, from libyaml when PyYAML has it (several times faster), else pure Python."""
    loader = getattr(yaml, "CSafeLoader", None) or yaml.SafeLoader
    return yaml.parse(text, Loader=loader)


_RESOLVER = yaml.resolver.Resolver()


def _compose(text: str, source: str) -> yaml.Node | None:
    """Build the node tree of a single-document stream from its events, without recursion, refusing
    aliases, nesting deeper than MAX_YAML_DEPTH and more than MAX_YAML_NODES values.

    Every refusal is a :class:`ConfigError` naming the line, column and field path where it happened.
    """
    # stack of open collections: [node, children (list), pending mapping key node or None]
    stack: list[list[Any]] = []
    root: yaml.Node | None = None
    documents = 0
    nodes = 0

    def here() -> tuple[PathPart, ...]:
        out: list[PathPart] = []
        for node, children, _ in stack:
            if isinstance(node, yaml.SequenceNode):
                out.append(len(children))
            elif len(children) % 2 == 1 and isinstance(children[-1], yaml.ScalarNode):
                out.append(str(children[-1].value))
        return tuple(out)

    def fail(message: str, mark: Any) -> ConfigError:
        return ConfigError(source, [_mark_problem(here(), message, mark)])

    def attach(node: yaml.Node) -> None:
        nonlocal root
        if stack:
            stack[-1][1].append(node)
        else:
            root = node

    for event in _events(text):
        if isinstance(event, yaml.AliasEvent):
            raise fail(f"aliases are not allowed (*{event.anchor}): write the value out in full", event.start_mark)
        if isinstance(event, (yaml.ScalarEvent, yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            nodes += 1
            if nodes > MAX_YAML_NODES:
                raise fail(f"more than {MAX_YAML_NODES} values in one document", event.start_mark)
        if isinstance(event, yaml.ScalarEvent):
            tag = event.tag
            if tag is None or tag == "!":
                tag = _RESOLVER.resolve(yaml.ScalarNode, event.value, event.implicit)
            attach(yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, style=event.style))
        elif isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            if len(stack) >= MAX_YAML_DEPTH:
                raise fail(f"nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark)
            kind = yaml.SequenceNode if isinstance(event, yaml.SequenceStartEvent) else yaml.MappingNode
            tag = event.tag
            if tag is None or tag == "!":
                tag = _RESOLVER.resolve(kind, None, event.implicit)
            node = kind(tag, [], event.start_mark, None, flow_style=event.flow_style)
            stack.append([node, [], None])
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            node, children, _ = stack.pop()
            node.end_mark = event.end_mark
            if isinstance(node, yaml.MappingNode):
                node.value = list(zip(children[0::2], children[1::2]))
            else:
                node.value = children
            attach(node)
        elif isinstance(event, yaml.DocumentStartEvent):
            documents += 1
            if documents > 1:
                raise ConfigError(source, [_mark_problem((), "expected a single document, found a second one",
                                                         event.start_mark)])
    return root


def _construct(node: yaml.Node, path: tuple[PathPart, ...], smap: SourceMap, source: str,
               constructor: yaml.constructor.SafeConstructor) -> Any:
    """Plain Python data from a node tree (depth is bounded by :func:`_compose`)."""
    smap.add(path, node)
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in _COLLECTION_TAGS:
        raise ConfigError(source, [_mark_problem(path, f"invalid value: the tag {node.tag!r} is not allowed",
                                                 node.start_mark)])
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError(source, [_mark_problem(path, "mapping keys must be plain scalars",
                                                         key_node.start_mark)])
            if key_node.tag == _MERGE_TAG:
                raise ConfigError(source, [_mark_problem(path, "merge keys (<<) are not allowed: write the "
                                                               "fields out in full", key_node.start_mark)])
            key = _scalar(key_node, path, source, constructor)
            if not isinstance(key, _SCALAR_KEY_TYPES):
                raise ConfigError(source, [_mark_problem(path, "mapping keys must be plain scalars",
                                                         key_node.start_mark)])
            key = str(key)
            if key in out:
                raise ConfigError(source, [_mark_problem(path + (key,), "duplicate key", key_node.start_mark)])
            out[key] = _construct(value_node, path + (key,), smap, source, constructor)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, path + (i,), smap, source, constructor) for i, item in enumerate(node.value)]
    return _scalar(node, path, source, constructor)


def _scalar(node: yaml.Node, path: tuple[PathPart, ...], source: str,
            constructor: yaml.constructor.SafeConstructor) -> Any:
    try:
        value = constructor.construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        msg = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [_mark_problem(path, f"invalid value: {msg}", node.start_mark)]) from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. an int of 5,000 digits, a 2024-13-45 date
        raise ConfigError(source, [_mark_problem(path, f"invalid value: {str(exc).split(';')[0][:200]}",
                                                 node.start_mark)]) from None
    finally:
        constructor.constructed_objects.clear()
    return value


def load_yaml(text: str, source: str) -> tuple[Any, SourceMap]:
    """Parse one YAML document; returns (data, source map). Raises :class:`ConfigError`.

    Bounded: at most MAX_YAML_BYTES of text, MAX_YAML_DEPTH levels of nesting, MAX_YAML_NODES values,
    no aliases — each refusal names the line and column (and the field path where known).
    """
    if not isinstance(text, str):
        raise ConfigError(source, [Problem("<root>", f"must be YAML text (a string), got {type_name(text)}")])
    if len(text) > MAX_YAML_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_YAML_BYTES:
        cut = len(text.encode("utf-8", "surrogatepass")[:MAX_YAML_BYTES].decode("utf-8", "ignore"))
        line, col = _line_col(text, cut)
        raise ConfigError(source, [Problem("<root>", f"larger than {MAX_YAML_BYTES // 1024} KiB "
                                                     f"({len(text.encode('utf-8', 'surrogatepass'))} bytes); "
                                                     "the limit is crossed here", line, col)])
    try:
        node = _compose(text, source)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        msg = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if isinstance(exc, yaml.reader.ReaderError):
            line, col = _line_col(text, exc.position)
            raise ConfigError(source, [Problem("<root>", f"invalid YAML: {msg}", line, col)]) from None
        problem = _mark_problem((), f"invalid YAML: {msg}", mark)
        raise ConfigError(source, [problem]) from None
    except RecursionError:  # not expected (no recursion above): never let it out as a crash
        raise ConfigError(source, [Problem("<root>", f"nested deeper than {MAX_YAML_DEPTH} levels")]) from None
    smap = SourceMap()
    if node is None:
        return None, smap
    return _construct(node, (), smap, source, yaml.constructor.SafeConstructor()), smap


def load_yaml_file(path: str | Path) -> tuple[Any, SourceMap, str]:
    """Read and parse ``path``; returns (data, source map, source name for messages).

    Reads at most MAX_YAML_BYTES + 1 bytes: a huge file (or ``/dev/zero``) is refused, not read whole."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise ConfigError(source, [Problem("<root>", f"cannot read file: {exc.strerror or exc}")]) from None
    if len(raw) > MAX_YAML_BYTES:
        line = raw.count(b"\n", 0, MAX_YAML_BYTES) + 1
        col = MAX_YAML_BYTES - (raw.rfind(b"\n", 0, MAX_YAML_BYTES) + 1) + 1
        raise ConfigError(source, [Problem("<root>", f"larger than {MAX_YAML_BYTES // 1024} KiB; the limit is "
                                                     "crossed here", line, col)])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(source, [Problem("<root>", f"file is not UTF-8 text (byte 0x{raw[exc.start]:02x})",
                                           line, col)]) from None
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
