"""The running daemon: wiring and supervision (`daemon`), its sinks (`sinkset`), systemd (`notify`)."""
