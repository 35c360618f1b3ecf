CREATE TABLE IF NOT EXISTS batches (
    source TEXT NOT NULL,
    id TEXT NOT NULL,
    origin TEXT NOT NULL,
    added_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'active',
    status TEXT,
    created_at INTEGER,
    snapshot TEXT,
    knowledge TEXT NOT NULL DEFAULT '{}',
    next_due REAL NOT NULL DEFAULT 0,
    interval REAL,
    error_streak INTEGER NOT NULL DEFAULT 0,
    not_found INTEGER NOT NULL DEFAULT 0,
    updated_at REAL,
    finished_at REAL,
    PRIMARY KEY (source, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    type TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    detected_at REAL NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_batch ON events (source, batch_id, sequence);
CREATE TABLE IF NOT EXISTS outbox (
    sink TEXT NOT NULL,
    event_id TEXT NOT NULL,
    source TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    enqueued_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    updated_at REAL,
    -- Set only on the head of a batch's queue (its lowest pending sequence): when it may be sent next.
    ready_at REAL,
    PRIMARY KEY (sink, event_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS outbox_queue ON outbox (sink, state, source, batch_id, sequence);
CREATE INDEX IF NOT EXISTS outbox_heads ON outbox (sink, ready_at, enqueued_at) WHERE ready_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS untracked (
    source TEXT NOT NULL,
    id TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (source, id)
) WITHOUT ROWID;
