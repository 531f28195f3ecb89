-- The append on a Citus cluster: the same decisions as the one statement in
-- store/append.rs, as a function that Citus runs on the worker holding the
-- user's shard (create_distributed_function, delegated by p_user), so a call
-- is one hop and touches no other worker. Citus cannot run that statement on
-- one shard: its data-modifying CTEs are planned as subplans whose results
-- go to every worker (a lost worker then failed everyone's appends).
--
-- Separate statements, each on this user's shard. The row lock comes first,
-- and each later statement reads what was committed before it (READ
-- COMMITTED), so a replay, a stale expectation or a taken tool call id is
-- judged after every earlier append committed. Reads of the batch's own
-- arrays never join a distributed table (Citus would plan such a join in
-- pieces).
--
-- Returns, as one record, what `AppendReport` holds (store/append.rs): base
-- and create_time when written; replay_first and replay_count for a replay;
-- snapshot_count NULL when the conversation does not exist; taken or
-- unanswered for a refused tool exchange. One record, not a table: Citus
-- delegates only a call written `SELECT convo_append_v1(…)`.
--
-- `convo distribute` (and `convo migrate` on a distributed cluster) replaces
-- the body at every run. A change of its arguments or result needs a new
-- name (_v2): replicas still running the old version keep calling theirs.
CREATE OR REPLACE FUNCTION convo_append_v1(
    p_lock_timeout text, p_user text, p_conversation uuid, p_request_id text, p_expected int8, p_count int8,
    p_now timestamptz, p_input_tokens int8, p_output_tokens int8,
    p_cached_input_tokens int8, p_reasoning_tokens int8,
    p_ids uuid[], p_roles int2[], p_contents text[], p_metadata jsonb[], p_parts bytea[],
    p_names text[], p_models text[], p_inputs int8[], p_outputs int8[], p_cached int8[],
    p_reasoning int8[], p_call_ids text[], p_call_at int4[], p_answered_ids text[],
    p_answered_at int4[],
    OUT o_base int8, OUT o_create_time timestamptz, OUT o_written int8, OUT o_follows uuid,
    OUT o_replay_first int8, OUT o_replay_count int4, OUT o_taken text,
    OUT o_unanswered text, OUT o_snapshot_count int8)
LANGUAGE plpgsql AS $body$
DECLARE
    v_current int8;
    v_base int8;
    v_time timestamptz;
    v_first int8;
    v_replayed int4;
    v_known_ids text[];
    v_known_at int8[];
    v_taken text;
    v_unanswered text;
    v_follows uuid;
    v_written int8;
    v_bytes int8;
    v_bytes_before int8;
BEGIN
    -- The replica's lock_timeout: its own session setting stays on the
    -- coordinator, and this runs on a worker.
    PERFORM set_config('lock_timeout', p_lock_timeout, true);
    SELECT c.message_count INTO v_current FROM conversations c
     WHERE c.user_id = p_user AND c.id = p_conversation
       FOR NO KEY UPDATE;
    o_written := 0;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    o_snapshot_count := v_current;

    IF p_request_id IS NOT NULL THEN
        SELECT r.first_sequence, r.message_count INTO v_first, v_replayed
          FROM append_requests r
         WHERE r.user_id = p_user AND r.conversation_id = p_conversation
           AND r.request_id = p_request_id;
        IF FOUND THEN
            o_replay_first := v_first;
            o_replay_count := v_replayed;
            RETURN;
        END IF;
    END IF;

    IF p_expected IS NOT NULL AND p_expected <> v_current THEN
        RETURN;
    END IF;

    IF cardinality(p_call_ids) > 0 OR cardinality(p_answered_ids) > 0 THEN
        SELECT coalesce(array_agg(k.tool_call_id), '{}'), coalesce(array_agg(k.sequence), '{}')
          INTO v_known_ids, v_known_at
          FROM tool_calls k
         WHERE k.user_id = p_user AND k.conversation_id = p_conversation
           AND k.tool_call_id = ANY (p_call_ids || p_answered_ids);
        SELECT c.id INTO v_taken
          FROM unnest(p_call_ids, p_call_at) AS c (id, at)
         WHERE c.id = ANY (v_known_ids)
         ORDER BY c.at LIMIT 1;
        SELECT r.id INTO v_unanswered
          FROM unnest(p_answered_ids, p_answered_at) WITH ORDINALITY AS r (id, at, n)
         WHERE NOT (r.id = ANY (v_known_ids))
           AND NOT EXISTS (SELECT FROM unnest(p_call_ids, p_call_at) AS c (id, at)
                            WHERE c.id = r.id AND c.at < r.at)
         ORDER BY r.n LIMIT 1;
        IF v_taken IS NOT NULL OR v_unanswered IS NOT NULL THEN
            o_taken := v_taken;
            o_unanswered := v_unanswered;
            RETURN;
        END IF;
    END IF;

    -- The batch's size as resume's byte bound counts it; each message stores
    -- the conversation's running total through itself.
    SELECT coalesce(sum(octet_length(x.content) + coalesce(octet_length(x.parts), 0)), 0)
      INTO v_bytes
      FROM unnest(p_contents, p_parts) AS x (content, parts);

    UPDATE conversations
       SET message_count = message_count + p_count,
           total_bytes = total_bytes + v_bytes,
           update_time = greatest(p_now, update_time),
           usage_input_tokens = usage_input_tokens + p_input_tokens,
           usage_output_tokens = usage_output_tokens + p_output_tokens,
           usage_cached_input_tokens = usage_cached_input_tokens + p_cached_input_tokens,
           usage_reasoning_tokens = usage_reasoning_tokens + p_reasoning_tokens
     WHERE user_id = p_user AND id = p_conversation
    RETURNING message_count - p_count, update_time, total_bytes - v_bytes
         INTO v_base, v_time, v_bytes_before;

    SELECT p.id INTO v_follows FROM messages p
     WHERE p.user_id = p_user AND p.conversation_id = p_conversation AND p.sequence = v_base;

    INSERT INTO messages (user_id, conversation_id, sequence, id, role, content, metadata,
                          create_time, parts, name, model, input_tokens, output_tokens,
                          cached_input_tokens, reasoning_tokens, answers_from, bytes_through)
    SELECT p_user, p_conversation, v_base + m.at, m.id, m.role, m.content, m.metadata,
           v_time, m.parts, coalesce(m.name, ''), coalesce(m.model, ''),
           m.input_tokens, m.output_tokens, m.cached_input_tokens, m.reasoning_tokens,
           (SELECT min(coalesce(v_known_at[array_position(v_known_ids, r.id)],
                                v_base + (SELECT min(c.at) FROM unnest(p_call_ids, p_call_at)
                                                         AS c (id, at)
                                           WHERE c.id = r.id AND c.at < r.at)))
              FROM unnest(p_answered_ids, p_answered_at) AS r (id, at)
             WHERE r.at = m.at),
           v_bytes_before + sum(octet_length(m.content) + coalesce(octet_length(m.parts), 0))
                                OVER (ORDER BY m.at)
      FROM unnest(p_ids, p_roles, p_contents, p_metadata, p_parts, p_names, p_models,
                  p_inputs, p_outputs, p_cached, p_reasoning)
             WITH ORDINALITY AS m (id, role, content, metadata, parts, name, model,
                                   input_tokens, output_tokens, cached_input_tokens,
                                   reasoning_tokens, at);
    GET DIAGNOSTICS v_written = ROW_COUNT;

    IF cardinality(p_call_ids) > 0 THEN
        INSERT INTO tool_calls (user_id, conversation_id, tool_call_id, sequence)
        SELECT p_user, p_conversation, c.id, v_base + c.at
          FROM unnest(p_call_ids, p_call_at) AS c (id, at);
    END IF;

    IF p_request_id IS NOT NULL THEN
        INSERT INTO append_requests (user_id, conversation_id, request_id, first_sequence,
                                     message_count, create_time)
        VALUES (p_user, p_conversation, p_request_id, v_base + 1, p_count, v_time);
    END IF;

    o_base := v_base;
    o_create_time := v_time;
    o_written := v_written;
    o_follows := v_follows;
END
$body$
