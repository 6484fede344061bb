
-- Every round rewrites each held lease's `until_ms`, and every poll its
-- instance's `next_run.at_ms`: at 100,000 instances, millions of row
-- versions an hour. Neither column is indexed (`lease_owner` covers
-- `owner`, which only a claim or a release changes), so these updates
-- can be HOT (heap-only: no index entry, the old version pruned within
-- its page) as long as the page has room for the new version: half of
-- each page is left free for them. Autovacuum then visits these small,
-- busy tables after 5% of their rows (plus 1,000) are dead rather than
-- 20%. A page already full keeps its rows until they move; new pages
-- are filled to half.
ALTER TABLE lease SET (fillfactor = 50, autovacuum_vacuum_scale_factor = 0.05,
                       autovacuum_vacuum_threshold = 1000);
ALTER TABLE next_run SET (fillfactor = 50, autovacuum_vacuum_scale_factor = 0.05,
                          autovacuum_vacuum_threshold = 1000);
