"""The JSON Schema of mapping files (for editors); ``python -m instruqt_crm.mapping.schema``."""

from __future__ import annotations

import json
import sys
from typing import Any

from .model import Mapping

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def mapping_schema() -> dict[str, Any]:
    """The JSON Schema generated from the pydantic model."""
    schema = Mapping.model_json_schema()
    schema["description"] = (
        "Which Instruqt events write which CRM properties, and how values merge. "
        "See the comments in mappings/hubspot.yaml."
    )
    return {"$schema": SCHEMA_DIALECT, **schema}


def schema_text() -> str:
    """The schema as the text committed in ``mappings/schema.json``."""
    return json.dumps(mapping_schema(), indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    """Print the schema to stdout."""
    sys.stdout.write(schema_text())


if __name__ == "__main__":
    main()
