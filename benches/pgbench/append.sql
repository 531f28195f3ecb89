-- The cheapest correct append on convo's schema: one statement, in
-- autocommit, that bumps the conversation (its row lock orders concurrent
-- appenders, so sequences stay gapless) and inserts the message numbered by
-- the new count, keeping the running byte total resume reads (the literal
-- 146 is the content's octet_length). No NOTIFY. The ceiling an
-- AppendMessage is measured against.
-- Each pgbench client appends to its own conversation of user 'pgbench'.
WITH c AS (
  UPDATE conversations
     SET message_count = message_count + 1, update_time = greatest(now(), update_time),
         total_bytes = total_bytes + 146
   WHERE user_id = 'pgbench' AND id = ('00000000-0000-0000-0000-' || lpad(:client_id::text, 12, '0'))::uuid
  RETURNING message_count, update_time, total_bytes
)
INSERT INTO messages (user_id, conversation_id, sequence, id, role, content, metadata, create_time,
                      bytes_through)
SELECT 'pgbench', ('00000000-0000-0000-0000-' || lpad(:client_id::text, 12, '0'))::uuid,
       c.message_count, gen_random_uuid(), 1,
       'The quick brown fox jumps over the lazy dog, again and again, while the orchestrator keeps the whole conversation in PostgreSQL for the next turn.',
       '{}'::jsonb, c.update_time, c.total_bytes
  FROM c;
