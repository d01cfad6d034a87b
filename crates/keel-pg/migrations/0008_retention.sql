-- Retention (keel_pg::retention): the indexes its purges and row counts walk. Each purge
-- deletes the oldest rows past an age, a batch at a time (`ORDER BY <age column> LIMIT n`).
-- Without an index on the age column every batch is a scan of the whole table, and a run of
-- a hundred batches a hundred scans: the purge would cost most exactly when the table is
-- biggest. With one, a batch reads the rows it deletes and little else, and a run that finds
-- nothing old enough stops at the first index entry.
--
-- outbox: sent rows by when they were sent. Partial: unsent rows (the relay's, small, in
-- outbox_unsent) are never purged. `sent_at < $cutoff` implies `sent_at IS NOT NULL`, so the
-- planner uses this index for the purge.
CREATE INDEX IF NOT EXISTS outbox_sent ON outbox (sent_at) WHERE sent_at IS NOT NULL;

-- inbox: entries by when their message was handled.
CREATE INDEX IF NOT EXISTS inbox_received ON inbox (received_at);

-- jobs: finished jobs by state, then when they finished. Queued and running jobs are in
-- jobs_claimable; together the two cover every state, so counting jobs per state reads an
-- index. Like jobs_claimable, the queries name the states as constants, or a generic plan
-- could not match the partial predicate (see keel_pg::jobs::claim).
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (state, finished_at)
    WHERE state IN ('succeeded', 'failed');

-- Building an index blocks writes to its table until the build ends. On a database whose
-- tables have grown large (the reason retention is added), build them first without that
-- lock, one at a time, outside a transaction, as the owner:
--   CREATE INDEX CONCURRENTLY outbox_sent ON outbox (sent_at) WHERE sent_at IS NOT NULL;
--   CREATE INDEX CONCURRENTLY inbox_received ON inbox (received_at);
--   CREATE INDEX CONCURRENTLY jobs_finished ON jobs (state, finished_at)
--       WHERE state IN ('succeeded', 'failed');
-- and this migration then finds them and does nothing (IF NOT EXISTS). A concurrent build
-- that failed leaves an invalid index under the name, which IF NOT EXISTS would also accept:
-- drop it and build again until `pg_index.indisvalid` is true. This migration cannot do that
-- itself: CONCURRENTLY refuses to run in a transaction, and a migration file of several
-- statements is one.
--
-- No grant: indexes serve the app role's existing rights on these tables.
