-- The append as convo runs it on a Citus cluster (src/store/sql/citus_append.sql,
-- created by `convo distribute`): one message, no request_id, no tool calls,
-- called as `SELECT f(…)` in autocommit so that Citus runs it on the worker
-- holding the user's shard. The same work as append.sql; compare the two on
-- the coordinator (benches/citus.sh, BENCHMARKS.md "Citus").
SELECT convo_append_v1(
    '10s', 'pgbench', ('00000000-0000-0000-0000-' || lpad(:client_id::text, 12, '0'))::uuid,
    NULL, NULL, 1, now(), 0, 0, 0, 0,
    ARRAY[gen_random_uuid()], ARRAY[1]::int2[],
    ARRAY['The quick brown fox jumps over the lazy dog, again and again, while the orchestrator keeps the whole conversation in PostgreSQL for the next turn.'],
    ARRAY['{}'::jsonb], ARRAY[NULL]::bytea[], ARRAY[NULL]::text[], ARRAY[NULL]::text[],
    ARRAY[NULL]::int8[], ARRAY[NULL]::int8[], ARRAY[NULL]::int8[], ARRAY[NULL]::int8[],
    '{}'::text[], '{}'::int4[], '{}'::text[], '{}'::int4[]);
