-- The one statement of ResumeConversation(max_messages = 50), exactly as
-- convo runs it (src/store/resume.rs; a unit test keeps the two the same):
-- the conversation and its window, widened for tool exchanges, from one
-- snapshot. :user and :conversation are set with -D; run with -M prepared,
-- so variables are bound as parameters, as convo does.
WITH c AS (
    SELECT user_id, id, title, metadata, create_time, update_time, message_count,
           forked_from_conversation_id, forked_at_sequence, usage_input_tokens,
           usage_output_tokens, usage_cached_input_tokens, usage_reasoning_tokens,
           total_bytes, greatest(message_count - 50, 0) + 1 AS start
      FROM conversations WHERE user_id = :user AND id = :conversation::uuid
), w AS (
    SELECT m.id, m.sequence, m.role, m.content, m.metadata, m.create_time, m.parts, m.name,
           m.model, m.input_tokens, m.output_tokens, m.cached_input_tokens, m.reasoning_tokens
      FROM messages m
     WHERE m.user_id = :user AND m.conversation_id = :conversation::uuid
       AND m.sequence BETWEEN (
           SELECT least(c.start, (
                      SELECT CASE WHEN f.role = 4 THEN (
                                 SELECT min(t.answers_from) FROM messages t
                                  WHERE t.user_id = :user AND t.conversation_id = :conversation::uuid
                                    AND t.sequence >= f.sequence AND t.role = 4
                                    AND t.sequence < coalesce(
                                        (SELECT min(o.sequence) FROM messages o
                                          WHERE o.user_id = :user AND o.conversation_id = :conversation::uuid
                                            AND o.sequence > f.sequence AND o.role <> 4),
                                        c.message_count + 1))
                             END
                        FROM messages f
                       WHERE f.user_id = :user AND f.conversation_id = :conversation::uuid
                         AND f.sequence = c.start))
             FROM c)
           AND (SELECT message_count FROM c)
       AND (m.bytes_through > (SELECT total_bytes FROM c) - 4194304 OR m.bytes_through IS NULL)
)
SELECT ROW(c.user_id, c.id, c.title, c.metadata, c.create_time, c.update_time, c.message_count,
       c.forked_from_conversation_id, c.forked_at_sequence, c.usage_input_tokens,
       c.usage_output_tokens, c.usage_cached_input_tokens, c.usage_reasoning_tokens) AS conversation,
       NULL::uuid AS id, NULL::int8 AS sequence, NULL::int2 AS role, NULL::text AS content,
       NULL::jsonb AS metadata, NULL::timestamptz AS create_time, NULL::bytea AS parts,
       NULL::text AS name, NULL::text AS model, NULL::int8 AS input_tokens,
       NULL::int8 AS output_tokens, NULL::int8 AS cached_input_tokens,
       NULL::int8 AS reasoning_tokens
  FROM c
UNION ALL
SELECT NULL,
       x.id, x.sequence, x.role, x.content, x.metadata, x.create_time, x.parts, x.name,
       x.model, x.input_tokens, x.output_tokens, x.cached_input_tokens, x.reasoning_tokens
  FROM w AS x;
