DROP TABLE append_requests;
DROP TABLE messages;
DROP TABLE conversations;
DROP TABLE users;
