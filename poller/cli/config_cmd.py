"""`batch-poller config example|unit|schema`: what ships with the package, printed from the installed copy.

The example config and the systemd unit are package data (`poller/data/`, links to `config/` and
`systemd/` in the source tree, copied into the wheel), so an installed daemon can print them without a
checkout. The schema is generated from the config models, so it is never out of date.
"""

from __future__ import annotations

import json
import sys
from importlib.resources import files
from typing import Any, Final

#: What `config` can print, and the package data file each one is.
PACKAGED: Final = {"example": "config.example.toml", "unit": "batch-poller.service"}
CHOICES: Final = (*PACKAGED, "schema")


def packaged(name: str) -> bytes:
    """One file of `poller/data/`, as installed."""
    return files("poller").joinpath("data", name).read_bytes()


def schema() -> dict[str, Any]:
    """The JSON Schema of the config file, from the pydantic models."""
    from poller.config import Config  # noqa: PLC0415 - pydantic models load only for `schema`

    return Config.model_json_schema()


def run(what: str) -> int:
    if what == "schema":
        data = (json.dumps(schema(), indent=2, sort_keys=True) + "\n").encode()
    else:
        data = packaged(PACKAGED[what])
    sys.stdout.buffer.write(data)  # bytes as shipped: no newline translation, no re-encoding
    return 0
