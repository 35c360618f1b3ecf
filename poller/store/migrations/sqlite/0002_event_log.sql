-- The event log gets a monotonic position (the cursor the live stream resumes from), discovery
-- cursors are kept per source, and a batch row remembers its provider's own status.
CREATE TABLE events_v2 (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    type TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    detected_at REAL NOT NULL,
    payload TEXT NOT NULL
);
INSERT INTO events_v2 (id, source, batch_id, sequence, type, created_at, detected_at, payload)
    SELECT id, source, batch_id, sequence, type, created_at, detected_at, payload FROM events
    ORDER BY detected_at, source, batch_id, sequence;
DROP TABLE events;
ALTER TABLE events_v2 RENAME TO events;
CREATE INDEX events_batch ON events (source, batch_id, sequence);
CREATE TABLE cursors (
    source TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (source, name)
) WITHOUT ROWID;
-- The stored sequence as a column: writes compare-and-set on it.
ALTER TABLE batches ADD COLUMN sequence INTEGER NOT NULL DEFAULT 0;
UPDATE batches SET sequence = COALESCE(json_extract(knowledge, '$.sequence'), 0);
