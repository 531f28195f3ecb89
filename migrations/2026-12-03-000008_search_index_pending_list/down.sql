ALTER INDEX messages_search RESET (gin_pending_list_limit);
