"""What the CLI modules share."""

from __future__ import annotations

import json


def print_json(obj: object) -> None:
    """Results go to stdout as indented JSON (paths and other objects as strings)."""
    print(json.dumps(obj, indent=2, default=str))
