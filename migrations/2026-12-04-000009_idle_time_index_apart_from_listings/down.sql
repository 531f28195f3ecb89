DROP INDEX conversations_by_idle_time;
CREATE INDEX conversations_by_idle_time ON conversations (update_time);
