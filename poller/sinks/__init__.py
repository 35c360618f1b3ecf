"""Where an event leaves the process. Each sink implements `Sink`; sinks never import each other."""

from poller.sinks.base import Sink

__all__ = ["Sink"]
