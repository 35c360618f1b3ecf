"""Delivery: routing events to sinks, draining each sink's outbox in order, retrying by schedule."""
