"""Polling one source: its tracker, refresh, discovery, health and the recorder of its events."""
