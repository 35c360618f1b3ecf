-- The fingerprint of the stored body (`poller.store.codec.fingerprint`) as a column, written with the
-- body, so that loading the tracked set reads no body. Existing rows are backfilled by the Python step
-- `_schema.py` runs after this file, in the same transaction.
ALTER TABLE batches ADD COLUMN fingerprint BIGINT;
