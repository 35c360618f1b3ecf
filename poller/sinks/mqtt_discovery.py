"""Home Assistant MQTT discovery for the MQTT sink: what to announce and what to count. Pure: no I/O.

The sink subscribes to its own retained state topics (``{prefix}/+/+/state``) and feeds every message to
`HomeAssistant.observe`, so the counts are rebuilt from the broker after a restart and follow every
event the sink publishes. `drain` returns the retained messages to publish since the last call:

- per source, one HA device with a sensor of its active batches (every count as attributes) and a
  sensor per status, announced at ``{ha_prefix}/sensor/{node}/{object}/config``, reading the retained
  summary ``{prefix}/{source}/summary``;
- with ``homeassistant_batches``, one sensor per batch reading the batch's own state topic, removed
  (empty retained config) when the batch's state is cleared.

Every entity is available while ``{prefix}/availability`` says ``online`` (the sink's Last Will).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Final

from poller.domain.lifecycle import ACTIVE_STATUSES, STATUSES

ORIGIN: Final = "batch-poller"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_BATCH_ATTRIBUTES: Final = (
    "{{ {'source': value_json.source, 'provider': value_json.provider, "
    "'previous_status': value_json.previous_status, 'request_counts': value_json.request_counts, "
    "'updated_at': value_json.updated_at, 'event_type': value_json.type} | tojson }}"
)


def object_id(*parts: str) -> str:
    """Parts joined as an HA object id (``[A-Za-z0-9_-]``); a hash keeps two altered names apart."""
    raw = "_".join(parts)
    safe = _UNSAFE.sub("_", raw)
    if safe != raw:
        safe += "_" + hashlib.sha256(raw.encode()).hexdigest()[:8]
    return safe


def summary(batches: dict[str, str]) -> dict[str, int]:
    """Counts of one source's batches: ``total``, ``active`` and one per status (zeros included)."""
    counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
    for status in batches.values():
        counts[status] = counts.get(status, 0) + 1
    active = sum(counts[s] for s in ACTIVE_STATUSES)
    return {"total": len(batches), "active": active, **counts}


@dataclass(slots=True)
class HomeAssistant:
    """Discovery and counts for one MQTT sink; `observe` what the broker holds, `drain` what to publish."""

    sink: str
    topic_prefix: str
    ha_prefix: str = "homeassistant"
    batches: bool = False
    version: str = ""
    _states: dict[str, dict[str, str]] = field(default_factory=dict)
    _announced: set[str] = field(default_factory=set)
    _batch_sensors: dict[tuple[str, str], str] = field(default_factory=dict)
    _dirty: set[str] = field(default_factory=set)
    _out: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def node(self) -> str:
        return object_id("batch_poller", self.sink)

    @property
    def subscription(self) -> str:
        """The topic filter whose retained messages are every batch's latest state."""
        return f"{self.topic_prefix}/+/+/state"

    @property
    def availability_topic(self) -> str:
        return f"{self.topic_prefix}/availability"

    def summary_topic(self, source: str) -> str:
        return f"{self.topic_prefix}/{source}/summary"

    def config_topic(self, object_name: str) -> str:
        return f"{self.ha_prefix}/sensor/{self.node}/{object_name}/config"

    def reset(self) -> None:
        """Forget what was announced (a new connection): everything is announced again as it is seen."""
        self._states.clear()
        self._announced.clear()
        self._batch_sensors.clear()
        self._dirty.clear()
        self._out.clear()

    def counts(self, source: str) -> dict[str, int]:
        return summary(self._states.get(source, {}))

    def observe(self, topic: str, payload: bytes) -> None:
        """One retained state message (``{prefix}/{source}/{batch}/state``); empty means the batch is gone."""
        head, sep, rest = topic.partition(self.topic_prefix + "/")
        if head or not sep:
            return
        parts = rest.split("/")
        if len(parts) != 3 or parts[2] != "state":  # source, batch, "state"
            return
        source, batch_id = parts[0], parts[1]
        status = _status(payload)
        known = self._states.setdefault(source, {})
        if status is None:
            if known.pop(batch_id, None) is None:
                return
            removed = self._batch_sensors.pop((source, batch_id), None)
            if removed is not None:
                self._out.append((self.config_topic(removed), b""))
        else:
            if known.get(batch_id) == status:
                return
            known[batch_id] = status
            if self.batches and (source, batch_id) not in self._batch_sensors:
                name = object_id("batch", source, batch_id)
                self._batch_sensors[(source, batch_id)] = name
                self._out.append((self.config_topic(name), _json(self.batch_config(source, batch_id, topic, name))))
        if source not in self._announced:
            self._announced.add(source)
            self._out.extend(self.source_configs(source))
        self._dirty.add(source)

    def drain(self) -> list[tuple[str, bytes]]:
        """The retained messages to publish now, in order: configs first, then the changed summaries."""
        out, self._out = self._out, []
        for source in sorted(self._dirty):
            out.append((self.summary_topic(source), _json(self.counts(source))))
        self._dirty.clear()
        return out

    # -- discovery payloads ------------------------------------------------------------------------

    def device(self, source: str) -> dict[str, Any]:
        return {
            "identifiers": [object_id(self.node, source)],
            "name": f"batch-poller {source}",
            "manufacturer": "batch-poller",
            "model": "Batch API source",
            "sw_version": self.version,
        }

    def _common(self, source: str, name: str) -> dict[str, Any]:
        return {
            "unique_id": object_id(self.node, name),
            "availability_topic": self.availability_topic,
            "payload_available": "online",
            "payload_not_available": "offline",
            "device": self.device(source),
            "origin": {"name": ORIGIN, "sw_version": self.version},
        }

    def source_configs(self, source: str) -> list[tuple[str, bytes]]:
        """The discovery configs of one source: active batches (all counts as attributes), one per status."""
        state = self.summary_topic(source)
        configs: list[tuple[str, bytes]] = []
        active = object_id(source, "active")
        configs.append(
            (
                self.config_topic(active),
                _json(
                    self._common(source, active)
                    | {
                        "name": "Active batches",
                        "state_topic": state,
                        "value_template": "{{ value_json.active }}",
                        "json_attributes_topic": state,
                        "unit_of_measurement": "batches",
                        "state_class": "measurement",
                        "icon": "mdi:tray-full",
                    }
                ),
            )
        )
        for status in ("total", *STATUSES):
            name = object_id(source, status)
            label = "All batches" if status == "total" else "Batches " + status.replace("_", " ")
            config = self._common(source, name) | {
                "name": label,
                "state_topic": state,
                "value_template": f"{{{{ value_json.{status} | default(0) }}}}",
                "unit_of_measurement": "batches",
                "state_class": "measurement",
                "icon": "mdi:tray-full",
            }
            configs.append((self.config_topic(name), _json(config)))
        return configs

    def batch_config(self, source: str, batch_id: str, state_topic: str, name: str) -> dict[str, Any]:
        """The discovery config of one batch's sensor: its status, read from its retained state."""
        return self._common(source, name) | {
            "name": f"Batch {batch_id}",
            "state_topic": state_topic,
            "value_template": "{{ value_json.status }}",
            "json_attributes_topic": state_topic,
            "json_attributes_template": _BATCH_ATTRIBUTES,
            "icon": "mdi:file-document-multiple",
        }


def _status(payload: bytes) -> str | None:
    """The status in a retained state document; None for an empty (cleared) or unreadable one."""
    if not payload:
        return None
    try:
        value = json.loads(payload)
    except ValueError:
        return None
    status = value.get("status") if isinstance(value, dict) else None
    return status if isinstance(status, str) else None


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
