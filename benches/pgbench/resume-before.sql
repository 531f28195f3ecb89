-- BEFORE the one-statement resume: the statements of one
-- ResumeConversation(max_messages = 50) as convo issued them until then.
-- :user and :conversation are set with -D;
-- run with -M prepared, so variables are bound as parameters, as convo does.
SELECT user_id, id, title, metadata, create_time, update_time, message_count,
       forked_from_conversation_id, forked_at_sequence, usage_input_tokens,
       usage_output_tokens, usage_cached_input_tokens, usage_reasoning_tokens
  FROM conversations WHERE user_id = :user AND id = :conversation::uuid LIMIT 1 \gset
SELECT id, conversation_id, sequence, role, content, metadata, create_time, parts, name,
       model, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, answers_from
  FROM messages
  WHERE user_id = :user AND conversation_id = :conversation::uuid
    AND sequence BETWEEN greatest(:message_count - 50, 0) + 1 AND :message_count
  ORDER BY sequence;
