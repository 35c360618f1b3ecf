-- One lease per source: which replica polls it, and until when (it renews well within that).
CREATE TABLE leases (
    source TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
