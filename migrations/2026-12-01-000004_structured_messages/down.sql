DROP TABLE tool_calls;

ALTER TABLE conversations
    DROP CONSTRAINT conversations_usage_nonnegative,
    DROP COLUMN usage_input_tokens,
    DROP COLUMN usage_output_tokens,
    DROP COLUMN usage_cached_input_tokens,
    DROP COLUMN usage_reasoning_tokens;

-- Reverting would lose parts (and break sequences if such messages were
-- removed): refuse while any message needs this migration's columns.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM messages WHERE parts IS NOT NULL OR role = 5) THEN
        RAISE EXCEPTION 'cannot revert structured messages: messages with parts or ROLE_DEVELOPER exist';
    END IF;
END
$$;

ALTER TABLE messages
    DROP CONSTRAINT messages_answers_earlier,
    DROP CONSTRAINT messages_usage_nonnegative,
    DROP CONSTRAINT messages_usage_whole,
    DROP CONSTRAINT messages_model_length,
    DROP CONSTRAINT messages_name_length,
    DROP CONSTRAINT messages_parts_size,
    DROP CONSTRAINT messages_content_size,
    DROP CONSTRAINT messages_role_known,
    DROP COLUMN answers_from,
    DROP COLUMN reasoning_tokens,
    DROP COLUMN cached_input_tokens,
    DROP COLUMN output_tokens,
    DROP COLUMN input_tokens,
    DROP COLUMN model,
    DROP COLUMN name,
    DROP COLUMN parts;

-- Apart: Citus refuses ADD CONSTRAINT beside other subcommands.
ALTER TABLE messages
    ADD CONSTRAINT messages_content_size CHECK (octet_length(content) BETWEEN 1 AND 1048576);
ALTER TABLE messages ADD CONSTRAINT messages_role_known CHECK (role BETWEEN 1 AND 4);
