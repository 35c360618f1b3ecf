-- The fingerprint of the stored body (`poller.store.codec.fingerprint`) as a column, written with the
-- body, so that loading the tracked set reads no body. `poller_fingerprint` is that function, which
-- the store registers on its connection before migrating.
ALTER TABLE batches ADD COLUMN fingerprint INTEGER;
UPDATE batches SET fingerprint = poller_fingerprint(snapshot) WHERE snapshot IS NOT NULL AND snapshot != '';
