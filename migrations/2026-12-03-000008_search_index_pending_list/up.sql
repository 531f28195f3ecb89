-- The search index takes new entries into a pending list (GIN's fastupdate)
-- and merges that list into the index in bulk. Whichever insert finds the
-- list past gin_pending_list_limit does the merge before it returns: at the
-- default 4 MB, that append waited about 100 ms. A quarter of the list keeps
-- the bulk merge (turning fastupdate off made every append dearer) and cuts
-- that wait to about a third, with the same throughput and p99
-- (BENCHMARKS.md, "Eighth sitting").
ALTER INDEX messages_search SET (gin_pending_list_limit = 1024);
