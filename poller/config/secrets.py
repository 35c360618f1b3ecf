"""Secrets in config are references, never values: ``*_env`` names an environment variable, ``*_file``
a file (relative to ``$CREDENTIALS_DIRECTORY`` when systemd sets it). A missing secret raises
`ConfigError` naming the key, never showing a value.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel

from poller.errors import ConfigError


def read_secret(key: str, env: str | None, file: Path | None, environ: dict[str, str] | None = None) -> str:
    """The secret named by an ``*_env``/``*_file`` pair; raises ConfigError (without the value) if absent."""
    environ = dict(os.environ) if environ is None else environ
    if file is not None:
        path = file
        if not path.is_absolute() and environ.get("CREDENTIALS_DIRECTORY"):
            path = Path(environ["CREDENTIALS_DIRECTORY"]) / path
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"{key}_file",
                f"cannot read the secret file {str(path)!r}: {exc.strerror}",
                "point it at a readable file (with systemd, LoadCredential= and a name relative to "
                "$CREDENTIALS_DIRECTORY)",
            ) from None
        if not value:
            raise ConfigError(f"{key}_file", f"the secret file {str(path)!r} is empty", "write the secret into it")
        return value
    if env is not None:
        value = environ.get(env, "").strip()
        if not value:
            raise ConfigError(
                f"{key}_env",
                f"the environment variable {env} is not set",
                f"export {env}=… or set {key}_file to a file holding the secret",
            )
        return value
    raise ConfigError(key, "no secret configured", f"set {key}_env or {key}_file")


def secret_pair_check(section: BaseModel, key: str, *, required: bool) -> None:
    """A model validator's check of one ``*_env``/``*_file`` pair: at most one, and one if required."""
    env = getattr(section, f"{key}_env")
    file = getattr(section, f"{key}_file")
    if env is not None and file is not None:
        raise ValueError(f"set only one of {key}_env and {key}_file")
    if required and env is None and file is None:
        raise ValueError(f"set {key}_env or {key}_file")
