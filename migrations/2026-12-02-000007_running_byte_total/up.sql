-- Resume bounds its window in bytes as well as in messages: walking back from
-- the newest message, it keeps those that begin within the response limit.
-- Summed at read time, that bound was a window function over every resumed
-- row (about a fifth of resume's cost in PostgreSQL, BENCHMARKS.md). Stored,
-- it is a filter on the key range: each message keeps the size of the
-- conversation up to and including itself, the conversation keeps its total,
-- and "the newer messages add up to less than the budget" reads
-- `total_bytes - bytes_through < budget`.
--
-- A message's size is what the reads count: octet_length(content) plus
-- octet_length(parts). Messages are removed only from the end (truncate) and
-- never edited, so a stored prefix sum stays true; a fork copies a prefix
-- and its sums with it.
--
-- The expand step of README's "Migrations": replicas of the previous release
-- keep running beside this one during a rolling upgrade, and they neither
-- write bytes_through (so it stays nullable) nor keep total_bytes. Resume
-- reads a message without a total as one to keep, and a total an old
-- replica did not raise only makes resume read more, which the service then
-- trims; a truncation by an old replica leaves the total too high, so
-- resume may return fewer messages than would fit (has_more says there are
-- more). Setting bytes_through NOT NULL is a later release's contract step.
--
-- The backfill rewrites every message once (PostgreSQL also recomputes the
-- generated search_document): on a large table, expect it to take as long
-- as rebuilding the search index.
ALTER TABLE conversations ADD COLUMN total_bytes bigint NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN bytes_through bigint;

UPDATE messages m
   SET bytes_through = s.through
  FROM (SELECT user_id, conversation_id, sequence,
               sum(octet_length(content) + coalesce(octet_length(parts), 0))
                   OVER (PARTITION BY user_id, conversation_id ORDER BY sequence) AS through
          FROM messages) AS s
 WHERE m.user_id = s.user_id AND m.conversation_id = s.conversation_id
   AND m.sequence = s.sequence;

UPDATE conversations c
   SET total_bytes = s.total
  FROM (SELECT user_id, conversation_id,
               sum(octet_length(content) + coalesce(octet_length(parts), 0)) AS total
          FROM messages GROUP BY user_id, conversation_id) AS s
 WHERE c.user_id = s.user_id AND c.id = s.conversation_id;

-- What the database can check of a running total on its own row: it covers
-- at least the message itself. One constraint per ALTER TABLE (Citus).
ALTER TABLE messages ADD CONSTRAINT messages_bytes_through_covers_message
    CHECK (bytes_through >= octet_length(content) + coalesce(octet_length(parts), 0));
ALTER TABLE conversations ADD CONSTRAINT conversations_total_bytes_nonnegative
    CHECK (total_bytes >= 0);
