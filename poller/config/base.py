"""What every config section shares."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

#: Names of sources and sinks: they appear in topics, metrics labels and URLs.
NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
