"""Load a mapping file: YAML with line numbers, pydantic validation, ``file:LINE: key: problem``."""

from __future__ import annotations

import types
from pathlib import Path as FilePath
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from .checks import Problem, mapping_problems, mapping_warnings
from .errors import MappingError, short_repr, suggest
from .model import DEFER_CHECKS, Mapping
from .yamlsource import Path, YamlDocument, YamlSyntaxError, read_yaml

_KINDS: dict[str, str] = {
    "dict": "a mapping",
    "list": "a list",
    "str": "text",
    "int": "a number",
    "float": "a number",
    "bool": "true or false",
    "NoneType": "nothing (null)",
}
_EXPECTED: dict[str, str] = {
    "string_type": "text",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _kind(value: Any) -> str:
    """How a YAML reader would describe a value's type."""
    name = type(value).__name__
    return _KINDS.get(name, name)


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated`` and ``| None`` from a field annotation."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        else:
            return annotation


def allowed_keys(path: Path) -> list[str]:
    """The keys the model allows at ``path`` (empty if it is not a model)."""
    current: Any = Mapping
    for part in path:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return []
            current = field.annotation
        elif get_origin(current) in (dict, list):
            current = get_args(current)[-1]
        else:
            return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _written(data: Any, path: Path) -> Path:
    """``path`` without a trailing ``value`` the file did not write (short-form properties)."""
    if len(path) < 5 or path[0] != "events" or path[-1] != "value":
        return path
    node = data
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    return path if isinstance(node, dict) else path[:-1]


def _describe(error: ErrorDetails, data: Any) -> tuple[Path, str]:
    """The key path and a plain-English message for one pydantic error."""
    path = _written(data, tuple(part for part in error["loc"] if part != "[key]"))
    kind = error["type"]
    if kind == "extra_forbidden":
        key, options = path[-1], allowed_keys(path[:-1])
        hint = suggest(key, options) or f"; allowed keys: {', '.join(options)}"
        return path, f"unknown key {short_repr(key)}{hint}"
    if kind == "missing":
        return path[:-1], f"missing required key {path[-1]!r}"
    if kind in _EXPECTED:
        given = error["input"]
        shown = short_repr(given) if isinstance(given, str | int | float) else _kind(given)
        return path, f"expected {_EXPECTED[kind]}, not {shown}"
    message = error["msg"].removeprefix("Value error, ")
    return path, message


def _dotted(path: Path) -> str:
    """``events.track.completed.properties.x`` (keys as written, indices as numbers)."""
    return ".".join(str(part) for part in path)


def _line(source: str, doc: YamlDocument, path: Path, message: str, line: int = 0) -> str:
    """One ``file:LINE: key.path: message`` line."""
    where = f"{source}:{line or doc.line_of(path)}"
    return f"{where}: {_dotted(path)}: {message}" if path else f"{where}: {message}"


def _problem_line(source: str, doc: YamlDocument, problem: Problem) -> str:
    """A formatted Problem, pointing at its second place too."""
    message = problem.message
    if problem.see is not None:
        message += f" ({_dotted(problem.see)}, line {doc.line_of(problem.see)})"
    return _line(source, doc, problem.path, message)


def _decode(data: str | bytes, source: str) -> str:
    """The text of the file; MappingError if it is not UTF-8."""
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise MappingError([f"{source}:{line}: not UTF-8 text"], source) from None


def parse_mapping(data: str | bytes, source: str = "<string>") -> Mapping:
    """Validate mapping text; raise MappingError listing every problem found."""
    text = _decode(data, source)
    try:
        doc = read_yaml(text)
    except YamlSyntaxError as exc:
        raise MappingError([f"{source}:{exc.line}: {exc.message}"], source) from None
    if not isinstance(doc.data, dict):
        what = "empty" if doc.data is None else _kind(doc.data)
        message = f"the top level must be a mapping (version, crm, object, ...), not {what}"
        raise MappingError([f"{source}:{doc.line_of(())}: {message}"], source)
    lines = [(line, _line(source, doc, path, msg, line)) for path, line, msg in doc.problems]
    mapping: Mapping | None = None
    try:
        mapping = Mapping.model_validate(doc.data, context={DEFER_CHECKS: True})
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            path, message = _describe(error, doc.data)
            lines.append((doc.line_of(path), _line(source, doc, path, message)))
    if mapping is not None and not lines:
        for problem in mapping_problems(mapping):
            lines.append((doc.line_of(problem.path), _problem_line(source, doc, problem)))
    if lines or mapping is None:
        ordered = sorted(dict.fromkeys(lines), key=lambda item: item[0])
        raise MappingError([text for _, text in ordered], source)
    mapping._source = source
    mapping._warnings = [_problem_line(source, doc, w) for w in mapping_warnings(mapping)]
    return mapping


def load_mapping(path: str | FilePath) -> Mapping:
    """Read and validate the mapping file at ``path``; raise MappingError on any problem."""
    source = str(path)
    try:
        data = FilePath(path).read_bytes()
    except OSError as exc:
        raise MappingError(
            [f"{source}: cannot read the mapping: {exc.strerror or exc}"], source
        ) from None
    return parse_mapping(data, source)
