-- convo's AppendMessage statement for one message that carries a
-- request_id, as both appends of an orchestrator's turn do (src/store/append.rs,
-- the single-message shape with the request parts; a unit test keeps the two
-- the same): it also looks up earlier requests with that id and records this
-- one. Beside append-convo.sql (the same without a request_id) it shows what
-- idempotency costs PostgreSQL. Each pgbench client appends to its own
-- conversation of user 'pgbench' with a fresh request id; run with
-- -M prepared, as convo does.
\set request random(1, 1000000000000)
WITH earlier AS (
    SELECT first_sequence, message_count FROM append_requests
     WHERE user_id = 'pgbench' AND conversation_id = ('00000000-0000-0000-0000-' || lpad(:client_id::text, 12, '0'))::uuid AND request_id = ('request-' || :request)
), bumped AS (
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
       AND NOT EXISTS (SELECT FROM earlier)
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
), recorded AS (
    INSERT INTO append_requests (user_id, conversation_id, request_id, first_sequence,
                                 message_count, create_time)
    SELECT 'pgbench', ('00000000-0000-0000-0000-' || lpad(:client_id::text, 12, '0'))::uuid, ('request-' || :request), b.base + 1, 1, b.update_time
      FROM bumped b
)
SELECT b.base, b.update_time AS create_time,
       (SELECT count(*) FROM inserted) AS written,
       NULL::uuid AS follows,
       e.first_sequence AS replay_first, e.message_count AS replay_count,
       NULL::text AS taken, NULL::text AS unanswered,
       s.message_count AS snapshot_count
  FROM (SELECT) AS one
  LEFT JOIN bumped b ON true
  LEFT JOIN earlier e ON true
  LEFT JOIN conversations s ON s.user_id = 'pgbench' AND s.id = ('00000000-0000-0000-0000-' || lpad(:client_id::text, 12, '0'))::uuid;
