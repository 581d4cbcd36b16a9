-- Idempotency keys of API requests, shared by the members of a cluster: a retry that reaches
-- another node is answered from here too.
CREATE TABLE idempotency_keys (
    token      uuid NOT NULL,
    key        text COLLATE "C" NOT NULL,
    -- While in progress: when the claim lapses; once answered: when the response stops being
    -- replayed. Rows before now are purged.
    expires_us bigint NOT NULL,
    doc        text NOT NULL,
    PRIMARY KEY (token, key)
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_us);
