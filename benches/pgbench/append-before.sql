-- BEFORE the one-statement append: the statements of one AppendMessage
-- without request_id as convo issued them until then (a transaction with
-- pg_notify inside), kept to show what the change bought. Only the running
-- byte total (total_bytes, bytes_through; 146 is the content's octet_length)
-- is new: today's schema requires it.
-- Each pgbench client appends to its own conversation of user 'pgbench',
-- whose id is derived from pgbench's client_id (see convo-bench's seeding).
BEGIN;
SELECT message_count + 1 AS next_sequence, greatest(now(), update_time) AS at,
       total_bytes + 146 AS through
  FROM conversations
  WHERE user_id = 'pgbench' AND id = ('00000000-0000-0000-0000-' || lpad(:client_id::text, 12, '0'))::uuid
  LIMIT 1 FOR NO KEY UPDATE \gset
INSERT INTO messages (user_id, conversation_id, sequence, id, role, content, metadata, create_time,
                      bytes_through)
  VALUES ('pgbench', ('00000000-0000-0000-0000-' || lpad(:client_id::text, 12, '0'))::uuid,
          :next_sequence, gen_random_uuid(), 1,
          'The quick brown fox jumps over the lazy dog, again and again, while the orchestrator keeps the whole conversation in PostgreSQL for the next turn.',
          '{}'::jsonb, :at::timestamptz, :through);
UPDATE conversations SET message_count = :next_sequence, update_time = :at::timestamptz,
                         total_bytes = :through
  WHERE user_id = 'pgbench' AND id = ('00000000-0000-0000-0000-' || lpad(:client_id::text, 12, '0'))::uuid;
SELECT pg_notify('convo_changes', 'c:00000000-0000-0000-0000-' || lpad(:client_id::text, 12, '0'));
COMMIT;
