-- The retention sweeper finds conversations idle since before a cut-off,
-- across all users, oldest first. Without this index every sweep would read
-- the whole table.
CREATE INDEX conversations_by_idle_time ON conversations (update_time);
