// @generated automatically by Diesel CLI.

pub mod sql_types {
    #[derive(diesel::query_builder::QueryId, Clone, diesel::sql_types::SqlType)]
    #[diesel(postgres_type(name = "tsvector", schema = "pg_catalog"))]
    pub struct Tsvector;
}

diesel::table! {
    append_requests (user_id, conversation_id, request_id) {
        user_id -> Text,
        conversation_id -> Uuid,
        request_id -> Text,
        first_sequence -> Int8,
        message_count -> Int4,
        create_time -> Timestamptz,
    }
}

diesel::table! {
    conversations (user_id, id) {
        user_id -> Text,
        id -> Uuid,
        title -> Text,
        metadata -> Jsonb,
        create_time -> Timestamptz,
        update_time -> Timestamptz,
        message_count -> Int8,
        forked_from_conversation_id -> Nullable<Uuid>,
        forked_at_sequence -> Nullable<Int8>,
        request_id -> Nullable<Text>,
        usage_input_tokens -> Int8,
        usage_output_tokens -> Int8,
        usage_cached_input_tokens -> Int8,
        usage_reasoning_tokens -> Int8,
        total_bytes -> Int8,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use super::sql_types::Tsvector;

    messages (user_id, conversation_id, sequence) {
        user_id -> Text,
        conversation_id -> Uuid,
        sequence -> Int8,
        id -> Uuid,
        role -> Int2,
        content -> Text,
        metadata -> Jsonb,
        create_time -> Timestamptz,
        search_document -> Tsvector,
        parts -> Nullable<Bytea>,
        name -> Text,
        model -> Text,
        input_tokens -> Nullable<Int8>,
        output_tokens -> Nullable<Int8>,
        cached_input_tokens -> Nullable<Int8>,
        reasoning_tokens -> Nullable<Int8>,
        answers_from -> Nullable<Int8>,
        bytes_through -> Nullable<Int8>,
    }
}

diesel::table! {
    tool_calls (user_id, conversation_id, tool_call_id) {
        user_id -> Text,
        conversation_id -> Uuid,
        tool_call_id -> Text,
        sequence -> Int8,
    }
}

diesel::table! {
    users (user_id) {
        user_id -> Text,
        create_time -> Timestamptz,
    }
}

diesel::joinable!(conversations -> users (user_id));

diesel::allow_tables_to_appear_in_same_query!(
    append_requests,
    conversations,
    messages,
    tool_calls,
    users,
);
