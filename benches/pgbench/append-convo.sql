-- convo's own AppendMessage statement, exactly as convo runs it for one
-- message with no request_id, no tool parts and no watcher in the process
-- (src/store/append.rs, the lean single-message shape; a unit test keeps the
-- two the same), with its parameters written as values. Beside append.sql
-- (the ceiling) it shows what the statement itself costs PostgreSQL. Each
-- pgbench client appends to its own conversation of user 'pgbench'; run
-- with -M prepared, as convo does.
WITH bumped AS (
    UPDATE conversations
       SET message_count = message_count + 1,
           update_time = greatest(now(), update_time),
           usage_input_tokens = usage_input_tokens + 0,
           usage_output_tokens = usage_output_tokens + 0,
           usage_cached_input_tokens = usage_cached_input_tokens + 0,
           usage_reasoning_tokens = usage_reasoning_tokens + 0,
           total_bytes = total_bytes + octet_length('The quick brown fox jumps over the lazy dog, again and again, while the orchestrator keeps the whole conversation in PostgreSQL for the next turn.'::text) + coalesce(octet_length(NULL::bytea), 0)
     WHERE user_id = 'pgbench' AND id = ('00000000-0000-0000-0000-' || lpad(:client_id::text, 12, '0'))::uuid
       AND (NULL::int8 IS NULL OR message_count = NULL)
    RETURNING message_count - 1 AS base, update_time, total_bytes
), inserted AS (
    INSERT INTO messages (user_id, conversation_id, sequence, id, role, content, metadata,
                          create_time, parts, name, model, input_tokens, output_tokens,
                          cached_input_tokens, reasoning_tokens, answers_from, bytes_through)
    SELECT 'pgbench', ('00000000-0000-0000-0000-' || lpad(:client_id::text, 12, '0'))::uuid, b.base + m.at, m.id, m.role, m.content, m.metadata,
           b.update_time, m.parts, coalesce(m.name, ''), coalesce(m.model, ''),
           m.input_tokens, m.output_tokens, m.cached_input_tokens, m.reasoning_tokens,
           NULL::int8, b.total_bytes
      FROM bumped b,
           (SELECT gen_random_uuid()::uuid, 1::int2, 'The quick brown fox jumps over the lazy dog, again and again, while the orchestrator keeps the whole conversation in PostgreSQL for the next turn.'::text, '{}'::jsonb,
                   NULL::bytea, NULL::text, NULL::text, NULL::int8,
                   NULL::int8, NULL::int8, NULL::int8, 1)
             AS m (id, role, content, metadata, parts, name, model, input_tokens,
                   output_tokens, cached_input_tokens, reasoning_tokens, at)
    RETURNING 1
)
SELECT b.base, b.update_time AS create_time,
       (SELECT count(*) FROM inserted) AS written,
       NULL::uuid AS follows,
       NULL::int8 AS replay_first, NULL::int4 AS replay_count,
       NULL::text AS taken, NULL::text AS unanswered,
       s.message_count AS snapshot_count
  FROM (SELECT) AS one
  LEFT JOIN bumped b ON true
  LEFT JOIN conversations s ON s.user_id = 'pgbench' AND s.id = ('00000000-0000-0000-0000-' || lpad(:client_id::text, 12, '0'))::uuid;
