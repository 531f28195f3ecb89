-- The keys that seal page tokens, shared by every replica through the
-- database, so no secret has to be configured (or could be left at a
-- default). The newest key seals; every key still opens, so a key can be
-- rotated by inserting a newer one and deleting the oldest later.
--
-- Not owned by any user: a small table every replica reads at start-up (a
-- reference table under Citus).
CREATE TABLE page_token_keys (
    id          integer     NOT NULL,
    secret      bytea       NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT page_token_keys_pkey PRIMARY KEY (id),
    CONSTRAINT page_token_keys_secret_length CHECK (octet_length(secret) >= 32)
);

-- 32 bytes from two random UUIDs (244 random bits), so no extension is needed.
INSERT INTO page_token_keys (id, secret)
VALUES (1, decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'));
