-- Structured messages: typed parts, author name, model and token usage on
-- messages; usage summed on conversations; tool calls indexed by id so a
-- tool result finds the call it answers with one index lookup.
--
-- Every new column is nullable or has a constant default, so adding it
-- rewrites no rows, and a plain-text message stores nothing more than before
-- (NULLs cost a bit in the row's null bitmap).

-- A message stored from parts keeps them here, encoded as protobuf
-- (store/parts.rs), byte for byte; `content` then holds its text projection,
-- which may be empty (a message of tool calls only). NULL for a message
-- stored from content.
ALTER TABLE messages
    ADD COLUMN parts               bytea,
    ADD COLUMN name                text   NOT NULL DEFAULT '',
    ADD COLUMN model               text   NOT NULL DEFAULT '',
    ADD COLUMN input_tokens        bigint,
    ADD COLUMN output_tokens       bigint,
    ADD COLUMN cached_input_tokens bigint,
    ADD COLUMN reasoning_tokens    bigint,
    -- For a tool message: the lowest sequence among the messages holding the
    -- calls its results answer, so resume can widen its window back to them
    -- without a lookup.
    ADD COLUMN answers_from        bigint;

-- One constraint per ALTER TABLE: Citus refuses ADD CONSTRAINT beside other
-- subcommands, and this schema must migrate on a distributed cluster too.
ALTER TABLE messages DROP CONSTRAINT messages_role_known;
-- 1 = user, 2 = assistant, 3 = system, 4 = tool, 5 = developer (convo.v1.Role).
ALTER TABLE messages ADD CONSTRAINT messages_role_known CHECK (role BETWEEN 1 AND 5);
ALTER TABLE messages DROP CONSTRAINT messages_content_size;
ALTER TABLE messages ADD CONSTRAINT messages_content_size CHECK (
    octet_length(content) <= 1048576
    AND (octet_length(content) >= 1 OR parts IS NOT NULL)
);
-- The parts' strings and bytes are at most 1 MiB; this bounds their
-- encoding with room for its framing.
ALTER TABLE messages
    ADD CONSTRAINT messages_parts_size CHECK (octet_length(parts) BETWEEN 1 AND 8388608);
ALTER TABLE messages ADD CONSTRAINT messages_name_length CHECK (char_length(name) <= 256);
ALTER TABLE messages ADD CONSTRAINT messages_model_length CHECK (char_length(model) <= 256);
ALTER TABLE messages ADD CONSTRAINT messages_usage_whole CHECK (
    (input_tokens IS NULL) = (output_tokens IS NULL)
    AND (input_tokens IS NULL) = (cached_input_tokens IS NULL)
    AND (input_tokens IS NULL) = (reasoning_tokens IS NULL)
);
ALTER TABLE messages ADD CONSTRAINT messages_usage_nonnegative CHECK (
    input_tokens >= 0 AND output_tokens >= 0
    AND cached_input_tokens >= 0 AND reasoning_tokens >= 0
);
ALTER TABLE messages
    ADD CONSTRAINT messages_answers_earlier CHECK (answers_from >= 1 AND answers_from < sequence);

ALTER TABLE conversations
    ADD COLUMN usage_input_tokens        bigint NOT NULL DEFAULT 0,
    ADD COLUMN usage_output_tokens       bigint NOT NULL DEFAULT 0,
    ADD COLUMN usage_cached_input_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN usage_reasoning_tokens    bigint NOT NULL DEFAULT 0;
ALTER TABLE conversations ADD CONSTRAINT conversations_usage_nonnegative CHECK (
    usage_input_tokens >= 0 AND usage_output_tokens >= 0
    AND usage_cached_input_tokens >= 0 AND usage_reasoning_tokens >= 0
);

-- Every tool call made in a conversation, by id: the primary key makes ids
-- unique per conversation, and is the index a tool result's check reads.
-- Rows go with their message (truncation, deletion) by cascade.
CREATE TABLE tool_calls (
    user_id         text   NOT NULL,
    conversation_id uuid   NOT NULL,
    tool_call_id    text   NOT NULL,
    sequence        bigint NOT NULL,
    CONSTRAINT tool_calls_pkey PRIMARY KEY (user_id, conversation_id, tool_call_id),
    CONSTRAINT tool_calls_message_fkey FOREIGN KEY (user_id, conversation_id, sequence)
        REFERENCES messages (user_id, conversation_id, sequence) ON DELETE CASCADE,
    -- 1-256 visible ASCII (PostgreSQL regexes repeat at most 255 times).
    CONSTRAINT tool_calls_id_format
        CHECK (tool_call_id ~ '^[!-~]+$' AND octet_length(tool_call_id) <= 256)
);

-- The foreign key's referencing side, so a truncation's cascade finds the
-- calls of the removed messages without reading the whole table.
CREATE INDEX tool_calls_by_message ON tool_calls (user_id, conversation_id, sequence);
