"""TOML values for the daemon configs that tests, benchmarks and the fleet demo write on the fly.

The standard library reads TOML but does not write it; the configs written here are flat keys,
lists and inline tables, which this covers.
"""

from __future__ import annotations

import json
from typing import Any


def toml_value(value: Any) -> str:
    """``value`` as a TOML value: a bool, number, string, list or inline table (nested freely)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {value!r}")
