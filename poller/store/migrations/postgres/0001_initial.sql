-- The whole PostgreSQL schema, at the SQLite schema's version 2 (plus claims and the change revision).
-- Text keys use the "C" collation so that listings sort as they do on SQLite, whatever the database's locale.
CREATE TABLE batches (
    source TEXT COLLATE "C" NOT NULL,
    id TEXT COLLATE "C" NOT NULL,
    origin TEXT NOT NULL,
    added_at DOUBLE PRECISION NOT NULL,
    state TEXT NOT NULL DEFAULT 'active',
    status TEXT,
    created_at BIGINT,
    snapshot TEXT,
    knowledge TEXT NOT NULL DEFAULT '{}',
    sequence BIGINT NOT NULL DEFAULT 0,
    next_due DOUBLE PRECISION NOT NULL DEFAULT 0,
    interval DOUBLE PRECISION,
    error_streak INTEGER NOT NULL DEFAULT 0,
    not_found INTEGER NOT NULL DEFAULT 0,
    updated_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    PRIMARY KEY (source, id)
);
-- Positions are handed out from event_log.last under its row lock, so they commit in order and a reader
-- resuming after a position never misses an event committed later with a lower one.
CREATE TABLE events (
    pos BIGINT PRIMARY KEY,
    id TEXT COLLATE "C" NOT NULL UNIQUE,
    source TEXT COLLATE "C" NOT NULL,
    batch_id TEXT COLLATE "C" NOT NULL,
    sequence BIGINT NOT NULL,
    type TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    detected_at DOUBLE PRECISION NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX events_batch ON events (source, batch_id, sequence);
CREATE TABLE event_log (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last BIGINT NOT NULL
);
INSERT INTO event_log (id, last) VALUES (1, 0);
CREATE TABLE outbox (
    sink TEXT COLLATE "C" NOT NULL,
    event_id TEXT COLLATE "C" NOT NULL,
    source TEXT COLLATE "C" NOT NULL,
    batch_id TEXT COLLATE "C" NOT NULL,
    sequence BIGINT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    enqueued_at DOUBLE PRECISION NOT NULL,
    next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_error TEXT,
    updated_at DOUBLE PRECISION,
    -- Set only on the head of a batch's queue (its lowest pending sequence): when it may be sent next.
    ready_at DOUBLE PRECISION,
    -- The replica sending this head, and until when its claim holds (another replica takes over after).
    claimed_by TEXT,
    claimed_until DOUBLE PRECISION,
    PRIMARY KEY (sink, event_id)
);
CREATE INDEX outbox_queue ON outbox (sink, state, source, batch_id, sequence);
CREATE INDEX outbox_heads ON outbox (sink, ready_at, enqueued_at) WHERE ready_at IS NOT NULL;
CREATE TABLE untracked (
    source TEXT COLLATE "C" NOT NULL,
    id TEXT COLLATE "C" NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (source, id)
);
CREATE TABLE cursors (
    source TEXT COLLATE "C" NOT NULL,
    name TEXT COLLATE "C" NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (source, name)
);
-- Bumped by writes other replicas must catch up with (track, untrack, redeliver): what the timer
-- fallback of changes() compares when no notification came.
CREATE TABLE revision (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    value BIGINT NOT NULL
);
INSERT INTO revision (id, value) VALUES (1, 0);
