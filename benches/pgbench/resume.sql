-- The statements of one ResumeConversation(max_messages = 50), as convo issues
-- them (see src/store/messages.rs). :user and :conversation are set with -D;
-- run with -M prepared, so variables are bound as parameters, as convo does.
SELECT user_id, id, title, metadata, create_time, update_time, message_count,
       forked_from_conversation_id, forked_at_sequence
  FROM conversations WHERE user_id = :user AND id = :conversation::uuid LIMIT 1 \gset
SELECT id, conversation_id, sequence, role, content, metadata, create_time
  FROM messages
  WHERE user_id = :user AND conversation_id = :conversation::uuid
    AND sequence > greatest(:message_count - 50, 0) AND sequence <= :message_count
  ORDER BY sequence;
