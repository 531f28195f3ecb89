-- One statement, as a distributed (Citus) cluster requires of a migration.
ALTER TABLE messages
    DROP CONSTRAINT messages_id_key,
    ADD CONSTRAINT messages_id_key UNIQUE (user_id, id);
