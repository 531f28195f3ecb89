-- The one statement of CreateConversation, exactly as convo runs it on
-- PostgreSQL (src/store/create.rs; a unit test keeps the two the same): the
-- user row made or locked, the conversation inserted, or else the one its
-- request_id made before. In autocommit. The id is time-ordered, as convo's
-- UUIDv7 is (microseconds, then 64 random bits); the request_id is new at
-- every call. :user is set with -D; run with -M prepared.
\set n random(1, 9223372036854775806)
WITH owner AS (
    INSERT INTO users (user_id) VALUES (:user)
    ON CONFLICT (user_id) DO UPDATE SET user_id = EXCLUDED.user_id WHERE false
    RETURNING user_id
), made AS (
    INSERT INTO conversations (user_id, id, title, metadata, create_time, update_time, request_id)
    SELECT :user, (lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000000)::bigint), 16, '0') || lpad(to_hex(:n::bigint), 16, '0'))::uuid, 'A new chat', '{"channel": "bench"}'::jsonb, now(), now(), ('pgbench-' || :n)
      FROM (SELECT count(*) FROM owner) AS after_owner
    ON CONFLICT (user_id, request_id) DO NOTHING
    RETURNING user_id, id, title, metadata, create_time, update_time, message_count,
       forked_from_conversation_id, forked_at_sequence, usage_input_tokens,
       usage_output_tokens, usage_cached_input_tokens, usage_reasoning_tokens
)
SELECT user_id, id, title, metadata, create_time, update_time, message_count,
       forked_from_conversation_id, forked_at_sequence, usage_input_tokens,
       usage_output_tokens, usage_cached_input_tokens, usage_reasoning_tokens
  FROM made
UNION ALL
SELECT user_id, id, title, metadata, create_time, update_time, message_count,
       forked_from_conversation_id, forked_at_sequence, usage_input_tokens,
       usage_output_tokens, usage_cached_input_tokens, usage_reasoning_tokens
  FROM conversations
 WHERE user_id = :user AND request_id = ('pgbench-' || :n) AND NOT EXISTS (SELECT FROM made);
