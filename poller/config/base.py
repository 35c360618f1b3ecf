"""What every config section shares."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

#: Names of sources and sinks: they appear in topics, metrics labels and URLs.
NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"


class KeyValueError(ValueError):
    """A validator's problem with one key of its section, and the fix: reported as that key's ConfigError."""

    def __init__(self, key: str, problem: str, fix: str) -> None:
        self.key = key
        self.problem = problem
        self.fix = fix
        super().__init__(f"{key}: {problem}")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
