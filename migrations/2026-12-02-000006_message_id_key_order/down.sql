-- Citus refuses ADD CONSTRAINT beside other subcommands of one ALTER TABLE.
ALTER TABLE messages DROP CONSTRAINT messages_id_key;
ALTER TABLE messages ADD CONSTRAINT messages_id_key UNIQUE (user_id, id);
