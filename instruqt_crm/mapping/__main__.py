"""``python -m instruqt_crm.mapping FILE...``: validate mapping files; exit 1 on problems."""

from __future__ import annotations

import sys

from .errors import MappingError
from .loader import load_mapping


def main(argv: list[str] | None = None) -> int:
    """Validate each file; print ``file:LINE: key: problem`` lines; return the exit status."""
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m instruqt_crm.mapping MAPPING.yaml...", file=sys.stderr)
        return 2
    status = 0
    for path in paths:
        try:
            mapping = load_mapping(path)
        except MappingError as exc:
            print(exc, file=sys.stderr)
            status = 1
            continue
        for warning in mapping.warnings:
            print(f"{warning} (warning)", file=sys.stderr)
        print(f"{path}: ok ({len(mapping.properties)} properties, {len(mapping.events)} rules)")
    return status


if __name__ == "__main__":
    sys.exit(main())
