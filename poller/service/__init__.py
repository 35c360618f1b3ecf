"""The HTTP service: health probes, Prometheus metrics and the control API."""
