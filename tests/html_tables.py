"""Read an HTML page's tables as a reader sees them: rows of cell texts, by section id."""

from __future__ import annotations

from html.parser import HTMLParser


class _Tables(HTMLParser):
    """Collects each <tr>'s cells' text (entities decoded) under the enclosing <section id>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: dict[str, list[list[str]]] = {}
        self._section = ""
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "section":
            self._section = dict(attrs).get("id") or ""
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.sections.setdefault(self._section, []).append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def table_rows(html: str) -> dict[str, list[list[str]]]:
    """Per section id: every table row of the section, as its cells' whitespace-folded text."""
    parser = _Tables()
    parser.feed(html)
    return parser.sections


def row(html: str, section: str, first_cell: str) -> list[str]:
    """The row of ``section`` whose first cell reads ``first_cell`` (KeyError if none)."""
    for cells in table_rows(html).get(section, []):
        if cells and cells[0] == first_cell:
            return cells
    raise KeyError(f"no row {first_cell!r} in section {section!r}")
