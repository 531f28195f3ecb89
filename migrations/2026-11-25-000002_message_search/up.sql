-- Full-text search over messages.
--
-- Configuration `simple`: lower-cases and splits on non-letters, with no
-- stemming and no stop words. Chat is multilingual; a language's stemmer would
-- mangle every other language, and `simple` treats them all alike. The cost is
-- that "running" does not match "run", and scripts written without spaces
-- (Chinese, Japanese) are matched by whole runs of characters, not words.
--
-- A tsvector has a size limit of its own (about 1 MB), which a 1 MiB message of
-- distinct words can exceed, so only the first 65,536 characters of a message
-- are indexed. The column is generated, so no write path can forget it.

-- Lets one GIN index hold user_id beside the words: a search reads only the
-- caller's entries, never other users' rows.
CREATE EXTENSION IF NOT EXISTS btree_gin;

ALTER TABLE messages
    ADD COLUMN search_document tsvector
    GENERATED ALWAYS AS (to_tsvector('simple'::regconfig, left(content, 65536))) STORED;

CREATE INDEX messages_search ON messages USING gin (user_id, search_document);
