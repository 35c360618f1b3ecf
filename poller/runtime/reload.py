"""Reloading the config (SIGHUP) without a restart: sources may come and go, sinks are rebuilt where
they changed. A config that is invalid, or names a sink that cannot be built, changes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from poller.config import Config, SinkConfig, load_config
from poller.delivery.routing import Routes
from poller.errors import ConfigError
from poller.logs import configure
from poller.sinks.base import Sink
from poller.sinks.registry import build_sink

if TYPE_CHECKING:
    from poller.runtime.daemon import Daemon

log = structlog.get_logger("poller.reload")


class Reloader:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def reload(self) -> None:
        d = self.daemon
        d.notifier.reloading()
        try:
            new = load_config(d.config_path)
            new.check_secrets(d.environ)
            self._check_reloadable(new)
            sink_configs = new.named_sinks()
            # Build every new or changed sink before touching the running ones: construction validates.
            built = {
                name: build_sink(name, cfg, d.environ)
                for name, cfg in sink_configs.items()
                if d.sinks.configs.get(name) != cfg
            }
        except Exception as exc:
            problem = exc.render() if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            log.error("config reload rejected; still running the previous config", error=problem)
            d.notifier.ready()
            return
        try:
            await self._apply(new, sink_configs, built)
        except Exception:
            log.exception("config reload failed part-way; running with what was applied")
        d.notifier.ready()
        log.info("config reloaded", sources=list(d.runners), sinks=list(d.sinks.workers))

    def _check_reloadable(self, new: Config) -> None:
        d = self.daemon
        if new.state != d.config.state:
            raise ConfigError("state", "cannot change while running", "restart the service to use another state store")
        if new.service != d.config.service:
            raise ConfigError("service", "cannot change while running", "restart the service to rebind the endpoint")

    async def _apply(self, new: Config, sink_configs: dict[str, SinkConfig], built: dict[str, Sink]) -> None:
        d = self.daemon
        old, d.config = d.config, new
        if new.log != old.log:
            configure(new.log.level, new.log.format)
        deadline = new.service.shutdown_timeout
        for name in [n for n in d.sinks.configs if n not in sink_configs or n in built]:
            await d.sinks.close(name, deadline)
        for name, sink in built.items():
            await d.sinks.open(name, sink_configs[name], sink)
        d.recorder.router = Routes(sink_configs)
        sources = new.named_sources()
        for name in [n for n in d.runners if n not in sources]:
            await d.remove_runner(name)
        for name, source in sources.items():
            runner = d.runners.get(name)
            if runner is None:
                d.add_runner(source)
            elif runner.config.provider_name != source.provider_name:
                await d.remove_runner(name)
                d.add_runner(source)
            else:
                await runner.configure(source, new.poll)
        d.sinks.wake()
