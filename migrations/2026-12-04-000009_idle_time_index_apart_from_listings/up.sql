-- The retention sweep's index, keyed by update_time in UTC rather than by
-- update_time itself. Keyed by the column, it was also a way to read any
-- query ordered by update_time, and a generic plan for ListConversations
-- chose it on a database of few users: it estimates one owner's rows as the
-- table's share per distinct user (a third of the table with three users),
-- so walking every user's conversations newest first, keeping the owner's,
-- looked as cheap as the owner's own index. It read every newer conversation
-- of the other users for each page (46,978 rows for a page of 51). Keyed by
-- an expression that only the sweep writes, it serves the sweep and nothing
-- else. timezone('UTC', ...) is immutable, so it can be indexed, and it
-- keeps the column's order.
DROP INDEX conversations_by_idle_time;
CREATE INDEX conversations_by_idle_time ON conversations (timezone('UTC', update_time));
