"""A bad mapping file (``MappingError``, load time), and the hints its messages give."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


class MappingError(ValueError):
    """The mapping file is unusable; the message has one ``file:LINE: key.path: problem`` a line."""

    def __init__(self, problems: Sequence[str], source: str = "") -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)
        self.source = source


def suggest(word: object, options: Iterable[str]) -> str:
    """A `` (did you mean 'x'?)`` hint for a misspelt name, or an empty string."""
    if not isinstance(word, str) or not word:
        return ""
    matches = difflib.get_close_matches(word[:100], list(options), n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def short_repr(value: object, limit: int = 60) -> str:
    """``repr`` cut to a readable length for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
