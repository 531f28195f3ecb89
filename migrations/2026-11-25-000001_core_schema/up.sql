-- convo's core schema.
--
-- Every table carries user_id and every key begins with it, so every query is
-- owner-scoped by construction and the schema can be distributed by user_id on
-- Citus unchanged (see docs/adr/0003-user-id-first-keys.md). No triggers, no
-- SET NULL actions, no volatile defaults used by UPDATEs.

CREATE TABLE users (
    user_id     text        NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT users_pkey PRIMARY KEY (user_id),
    -- 1-128 bytes of visible ASCII (0x21-0x7E), as x-user-id allows.
    CONSTRAINT users_user_id_format CHECK (user_id ~ '^[!-~]{1,128}$')
);

CREATE TABLE conversations (
    user_id                     text        NOT NULL,
    id                          uuid        NOT NULL,
    title                       text        NOT NULL DEFAULT '',
    metadata                    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    create_time                 timestamptz NOT NULL,
    update_time                 timestamptz NOT NULL,
    message_count               bigint      NOT NULL DEFAULT 0,
    -- Plain columns, not a foreign key: the source may be deleted later, and
    -- Citus allows no SET NULL action.
    forked_from_conversation_id uuid,
    forked_at_sequence          bigint,
    -- Idempotency key of the CreateConversation call that made the row.
    request_id                  text,
    CONSTRAINT conversations_pkey PRIMARY KEY (user_id, id),
    CONSTRAINT conversations_user_fkey FOREIGN KEY (user_id)
        REFERENCES users (user_id) ON DELETE CASCADE,
    -- NULLs are distinct, so only calls that carry a key are deduplicated.
    CONSTRAINT conversations_request_id_key UNIQUE (user_id, request_id),
    CONSTRAINT conversations_title_length CHECK (char_length(title) <= 256),
    CONSTRAINT conversations_metadata_object CHECK (jsonb_typeof(metadata) = 'object'),
    CONSTRAINT conversations_message_count_nonnegative CHECK (message_count >= 0),
    CONSTRAINT conversations_times_ordered CHECK (update_time >= create_time),
    CONSTRAINT conversations_fork_consistent CHECK (
        (forked_from_conversation_id IS NULL AND forked_at_sequence IS NULL)
        OR (forked_from_conversation_id IS NOT NULL AND forked_at_sequence >= 0)
    ),
    CONSTRAINT conversations_request_id_format
        CHECK (request_id IS NULL OR request_id ~ '^[!-~]{1,128}$')
);

-- ListConversations: the caller's conversations, most recently updated first.
CREATE INDEX conversations_by_update_time
    ON conversations (user_id, update_time DESC, id DESC);

CREATE TABLE messages (
    user_id         text        NOT NULL,
    conversation_id uuid        NOT NULL,
    sequence        bigint      NOT NULL,
    id              uuid        NOT NULL,
    role            smallint    NOT NULL,
    content         text        NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    create_time     timestamptz NOT NULL,
    -- The primary key is the access path: list, resume and append all walk a
    -- conversation's messages by sequence.
    CONSTRAINT messages_pkey PRIMARY KEY (user_id, conversation_id, sequence),
    CONSTRAINT messages_id_key UNIQUE (user_id, id),
    CONSTRAINT messages_conversation_fkey FOREIGN KEY (user_id, conversation_id)
        REFERENCES conversations (user_id, id) ON DELETE CASCADE,
    CONSTRAINT messages_sequence_positive CHECK (sequence >= 1),
    -- 1 = user, 2 = assistant, 3 = system, 4 = tool (convo.v1.Role).
    CONSTRAINT messages_role_known CHECK (role BETWEEN 1 AND 4),
    CONSTRAINT messages_content_size CHECK (octet_length(content) BETWEEN 1 AND 1048576),
    CONSTRAINT messages_metadata_object CHECK (jsonb_typeof(metadata) = 'object')
);

-- One row per AppendMessage(s) call that carried a request_id: the range of
-- sequences it wrote, so a retry returns the same messages and writes nothing.
CREATE TABLE append_requests (
    user_id         text        NOT NULL,
    conversation_id uuid        NOT NULL,
    request_id      text        NOT NULL,
    first_sequence  bigint      NOT NULL,
    message_count   integer     NOT NULL,
    create_time     timestamptz NOT NULL,
    CONSTRAINT append_requests_pkey PRIMARY KEY (user_id, conversation_id, request_id),
    CONSTRAINT append_requests_conversation_fkey FOREIGN KEY (user_id, conversation_id)
        REFERENCES conversations (user_id, id) ON DELETE CASCADE,
    CONSTRAINT append_requests_request_id_format CHECK (request_id ~ '^[!-~]{1,128}$'),
    CONSTRAINT append_requests_range CHECK (first_sequence >= 1 AND message_count BETWEEN 1 AND 100)
);
