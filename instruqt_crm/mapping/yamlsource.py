"""Read YAML into plain data while remembering the line of every key and list item."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

Path = tuple[str | int, ...]

MAX_NODES = 100_000
MAX_DEPTH = 64
MERGE_TAG = "tag:yaml.org,2002:merge"
COLLECTION_TAGS = frozenset(
    f"tag:yaml.org,2002:{name}" for name in ("map", "seq", "set", "omap", "pairs")
)


class YamlSyntaxError(Exception):
    """The text is not YAML (or not one document); ``line`` is 1-based."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _TooLarge(Exception):
    """The document expands to more nodes than a mapping file could need."""


class LineLoader(yaml.SafeLoader):
    """A SafeLoader used only to compose nodes (which keep their marks) and build scalars."""


@dataclass
class YamlDocument:
    """Plain data, the line of every key path, and problems found while reading."""

    data: Any
    lines: dict[Path, int] = field(default_factory=dict)
    problems: list[tuple[Path, int, str]] = field(default_factory=list)

    def line_of(self, path: Path) -> int:
        """The line of ``path`` or of its nearest recorded ancestor (1 for the document)."""
        for end in range(len(path), 0, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return self.lines.get((), 1)


def _line(node: Node) -> int:
    """The 1-based line a node starts on."""
    return node.start_mark.line + 1


class _Walker:
    """Turn a node tree into dicts, lists and scalars, recording lines and problems."""

    def __init__(self, loader: LineLoader, doc: YamlDocument) -> None:
        self.loader = loader
        self.doc = doc
        self.count = 0
        self.active: set[int] = set()

    def problem(self, path: Path, node: Node, message: str) -> None:
        """Record a located problem."""
        self.doc.problems.append((path, _line(node), message))

    def value(self, node: Node, path: Path) -> Any:
        """The plain value of any node."""
        self.count += 1
        if self.count > MAX_NODES:
            raise _TooLarge
        if isinstance(node, ScalarNode):
            return self.scalar(node, path)
        if id(node) in self.active:
            self.problem(path, node, "an alias refers to a node that contains it")
            return None
        if len(path) > MAX_DEPTH:
            self.problem(path, node, f"nested more than {MAX_DEPTH} levels deep")
            return None
        if node.tag not in COLLECTION_TAGS:
            self.problem(path, node, f"unsupported tag {node.tag!r}")
        self.active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                return self.sequence(node, path)
            if isinstance(node, MappingNode):
                return self.mapping(node, path)
            return None
        finally:
            self.active.discard(id(node))

    def scalar(self, node: ScalarNode, path: Path) -> Any:
        """A scalar built by the safe constructor (int, float, bool, null, str, ...)."""
        try:
            return self.loader.construct_object(node, deep=True)
        except Exception as exc:  # any constructor failure is a located problem
            if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
                reason = exc.problem
            else:
                reason = f"not a valid {node.tag.rsplit(':', 1)[-1]}"
            self.problem(path, node, f"cannot read value {node.value[:40]!r}: {reason}")
            return None

    def sequence(self, node: SequenceNode, path: Path) -> list[Any]:
        """A list; each item's line is recorded under its index."""
        items = []
        for index, item in enumerate(node.value):
            self.doc.lines.setdefault((*path, index), _line(item))
            items.append(self.value(item, (*path, index)))
        return items

    def mapping(self, node: MappingNode, path: Path) -> dict[str, Any]:
        """A dict keyed by the keys' text; duplicates and non-text keys are problems."""
        result: dict[str, Any] = {}
        merges: list[Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:
                merges.append(value_node)
                continue
            if not isinstance(key_node, ScalarNode):
                self.problem(path, key_node, "keys must be plain text")
                continue
            key = key_node.value
            if key in result:
                first = self.doc.lines.get((*path, key), 0)
                self.problem(
                    (*path, key), key_node, f"duplicate key {key!r} (first at line {first})"
                )
                continue
            self.doc.lines.setdefault((*path, key), _line(key_node))
            result[key] = self.value(value_node, (*path, key))
        for merge_node in merges:
            self.merge_into(result, merge_node, path)
        return result

    def merge_into(self, result: dict[str, Any], node: Node, path: Path) -> None:
        """Apply a ``<<:`` merge key: keys not given explicitly come from the merged mappings."""
        sources = node.value if isinstance(node, SequenceNode) else [node]
        for source in sources:
            if not isinstance(source, MappingNode):
                self.problem(path, source, "'<<' needs a mapping or a list of mappings")
                continue
            merged = self.value(source, path)
            for key, value in (merged or {}).items():
                result.setdefault(key, value)


def _syntax_error(exc: yaml.YAMLError, text: str) -> YamlSyntaxError:
    """A YamlSyntaxError with the line and wording of a PyYAML error."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        message = exc.problem or "invalid YAML"
        if exc.context:
            where = f", line {exc.context_mark.line + 1}" if exc.context_mark else ""
            message = f"{message} ({exc.context}{where})"
        return YamlSyntaxError(exc.problem_mark.line + 1, message)
    position = getattr(exc, "position", None)
    line = text.count("\n", 0, position) + 1 if isinstance(position, int) else 1
    return YamlSyntaxError(line, str(exc).splitlines()[0] if str(exc) else "invalid YAML")


def read_yaml(text: str) -> YamlDocument:
    """Parse one YAML document; raise YamlSyntaxError for text that is not YAML."""
    loader: LineLoader | None = None
    try:
        loader = LineLoader(text)
        node = loader.get_single_node()
        doc = YamlDocument(data=None)
        if node is None:
            return doc
        doc.lines[()] = _line(node)
        doc.data = _Walker(loader, doc).value(node, ())
        return doc
    except yaml.YAMLError as exc:
        raise _syntax_error(exc, text) from exc
    except (RecursionError, _TooLarge) as exc:
        raise YamlSyntaxError(1, "document is nested too deeply or expands too far") from exc
    finally:
        if loader is not None:
            loader.dispose()
