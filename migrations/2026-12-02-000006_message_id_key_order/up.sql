-- A message id is unique per user; the index that enforces it now leads with
-- the id. Led by user_id, it was a second way to reach "this user's
-- messages", and on a table PostgreSQL had not yet analyzed, the planner
-- could not tell it from the primary key: a prepared lookup of one message
-- by (user_id, conversation_id, sequence) was planned on it and then read
-- every message of the user, for as long as the session kept that plan
-- (found under load on a fresh database: each append scanned the whole
-- user). Led by id, it serves no query that names a user and not an id.
-- The constraint still holds user_id, the distribution column (scale-out.md).
-- Two statements: Citus refuses ADD CONSTRAINT beside other subcommands.
ALTER TABLE messages DROP CONSTRAINT messages_id_key;
ALTER TABLE messages ADD CONSTRAINT messages_id_key UNIQUE (id, user_id);
