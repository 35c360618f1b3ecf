"""Configuration: TOML file, overridden by ``BATCH_POLLER_…`` environment variables, validated up front.

Every problem is reported as a `ConfigError` naming the key, the value and the fix. Secrets are never
values in the config, only references (``*_env`` names an environment variable, ``*_file`` a file).
"""

from poller.config.loading import DEFAULT_CONFIG_PATH, find_config_path, load_config, parse_config
from poller.config.model import ENV_PREFIX, Config
from poller.config.secrets import read_secret
from poller.config.settings import LogConfig, PollConfig, ServiceConfig, StateConfig
from poller.config.sinks import (
    FileSinkConfig,
    MqttSinkConfig,
    SinkConfig,
    StdoutSinkConfig,
    WebhookSinkConfig,
    webhook_secrets,
)
from poller.config.sources import AzureSourceConfig, OpenAISourceConfig, SourceConfig

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIX",
    "AzureSourceConfig",
    "Config",
    "FileSinkConfig",
    "LogConfig",
    "MqttSinkConfig",
    "OpenAISourceConfig",
    "PollConfig",
    "ServiceConfig",
    "SinkConfig",
    "SourceConfig",
    "StateConfig",
    "StdoutSinkConfig",
    "WebhookSinkConfig",
    "find_config_path",
    "load_config",
    "parse_config",
    "read_secret",
    "webhook_secrets",
]
