"""Pure logic: the common lifecycle, snapshots, events, transition detection and scheduling (no I/O)."""
