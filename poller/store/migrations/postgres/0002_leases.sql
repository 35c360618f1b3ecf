-- One lease per source: which replica polls it, and until when (it renews well within that).
CREATE TABLE leases (
    source TEXT COLLATE "C" PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
