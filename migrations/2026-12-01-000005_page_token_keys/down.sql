DROP TABLE page_token_keys;
