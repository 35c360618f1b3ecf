"""Shared fixtures. Broker fixtures live in tests/broker.py; simulator and daemon helpers in tests/helpers.py."""

from __future__ import annotations

pytest_plugins = ["tests.broker", "tests.postgres"]
