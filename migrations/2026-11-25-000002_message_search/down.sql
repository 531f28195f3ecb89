DROP INDEX messages_search;
ALTER TABLE messages DROP COLUMN search_document;
-- btree_gin stays: other objects may have come to depend on it.
