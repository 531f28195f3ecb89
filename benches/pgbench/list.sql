-- The statement of one ListConversations(page_size = 50) first page, as
-- convo runs it (src/store/list_conversations.rs; a unit test keeps the two
-- the same): the owner's conversations newest first on the
-- (user_id, update_time, id) index, one row more than the page to know
-- whether another follows. :user is set with -D; run with -M prepared, so
-- the user and the limit are bound as parameters, as convo binds them.
\set limit 51
SELECT user_id, id, title, metadata, create_time, update_time, message_count,
       forked_from_conversation_id, forked_at_sequence, usage_input_tokens,
       usage_output_tokens, usage_cached_input_tokens, usage_reasoning_tokens
  FROM conversations
 WHERE user_id = :user
 ORDER BY update_time DESC, id DESC
 LIMIT :limit;
