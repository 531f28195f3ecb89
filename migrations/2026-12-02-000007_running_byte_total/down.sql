ALTER TABLE messages DROP COLUMN bytes_through;
ALTER TABLE conversations DROP COLUMN total_bytes;
