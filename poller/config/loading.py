"""Reading the config file and turning every validation problem into one `ConfigError` that names the
key, the bad value (never a secret) and the fix.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from poller.config.base import KeyValueError
from poller.config.model import ENV_PREFIX, Config
from poller.config.sinks import SINK_KINDS
from poller.config.sources import PROVIDERS
from poller.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/batch-poller/config.toml")
_SECRETISH = ("key", "secret", "password", "token")
_TAGS = frozenset(SINK_KINDS) | frozenset(PROVIDERS)


def find_config_path(explicit: Path | None, environ: dict[str, str] | None = None) -> Path | None:
    """`--config`, else $BATCH_POLLER_CONFIG, else /etc/batch-poller/config.toml if it exists."""
    environ = dict(os.environ) if environ is None else environ
    if explicit is not None:
        return explicit
    if environ.get(f"{ENV_PREFIX}CONFIG"):
        return Path(environ[f"{ENV_PREFIX}CONFIG"])
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def _key_of(loc: tuple[int | str, ...], raw: dict[str, Any]) -> str:
    parts: list[str] = []
    node: Any = raw
    for i, item in enumerate(loc):
        if isinstance(item, int):
            name = None
            if isinstance(node, list) and item < len(node) and isinstance(node[item], dict):
                name = node[item].get("name")
            parts[-1] += f"[{name or item}]" if parts else f"[{item}]"
            node = node[item] if isinstance(node, list) and item < len(node) else None
            continue
        if i > 0 and (isinstance(loc[i - 1], int) or loc[i - 1] == "source") and item in _TAGS:
            continue  # the discriminator tag pydantic puts into the location
        parts.append(item)
        node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts) or "(top level)"


def _redact_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "[redacted]"
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    return f"{scheme}://{host}/…" if "/" in rest or "@" in rest else f"{scheme}://{host}"


def _from_validation(exc: ValidationError, raw: dict[str, Any]) -> ConfigError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    key = _key_of(tuple(first["loc"]), raw)
    value = first.get("input")
    leaf = key.rsplit(".", 1)[-1]
    secretish = any(word in leaf.lower() for word in _SECRETISH) or ".headers" in f".{key}"
    if isinstance(value, dict | list) or secretish:
        value = None  # never echo whole sections, nor anything that may be a secret
    elif leaf == "url" and isinstance(value, str):
        value = _redact_url(value)  # a webhook URL's path (Slack) and userinfo are credentials
    kind = first["type"]
    if kind == "extra_forbidden":
        fix = "remove it or correct its spelling; config/config.example.toml lists every key"
        problem = "unknown key"
    elif kind == "missing":
        fix = "add it"
        problem = "required key is missing"
    elif kind == "union_tag_invalid":
        is_source = key.startswith("source")
        fix = (
            f"provider must be one of: {', '.join(PROVIDERS)}"
            if is_source
            else f"kind must be one of: {', '.join(SINK_KINDS)}"
        )
        problem = "unknown provider" if is_source else "unknown sink kind"
    elif isinstance(hint := first.get("ctx", {}).get("error"), KeyValueError):
        key, problem, fix, value = f"{key}.{hint.key}", hint.problem, hint.fix, None
    else:
        problem = first["msg"].removeprefix("Value error, ")
        fix = "see config/config.example.toml for the accepted values"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return ConfigError(key, problem + more, fix, value)


def parse_config(raw: dict[str, Any]) -> Config:
    """A validated Config from a TOML-shaped dict plus the environment; raises ConfigError."""
    try:
        return Config(**raw)
    except ValidationError as exc:
        raise _from_validation(exc, raw) from None


def load_config(path: Path | None, *, require_file: bool = False) -> Config:
    """Read, merge and validate the configuration; raises ConfigError for every problem."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("--config", f"no such file: {path}", "pass the path of an existing TOML file") from None
        except OSError as exc:
            raise ConfigError("--config", f"cannot read {path}: {exc.strerror}", "check its permissions") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{path} is not valid TOML: {exc}", "fix the syntax at that line") from None
    elif require_file:
        raise ConfigError(
            "--config",
            f"no config file found (looked at --config, ${ENV_PREFIX}CONFIG and {DEFAULT_CONFIG_PATH})",
            f"pass --config PATH, set ${ENV_PREFIX}CONFIG, or create {DEFAULT_CONFIG_PATH} "
            "(config/config.example.toml in the source tree is a complete example)",
        )
    return parse_config(raw)
