-- comodit store, schema version 1 (the layout's story is in store/src/postgres.rs).
--
-- Records are kept whole as JSON text in `doc` (text, not jsonb: jsonb refuses the NUL character
-- that a command or a file's content may carry); the columns beside it are what queries key on.
-- Text keys use the "C" collation, so listings come in byte order, like the embedded backend's.
-- Applied inside one transaction, recorded in schema_migrations.

CREATE TABLE orgs (
    id   uuid PRIMARY KEY,
    name text COLLATE "C" NOT NULL UNIQUE,
    doc  text NOT NULL
);

CREATE TABLE envs (
    id   uuid PRIMARY KEY,
    org  uuid NOT NULL REFERENCES orgs (id),
    name text COLLATE "C" NOT NULL,
    doc  text NOT NULL,
    UNIQUE (org, name)
);

-- `fence`: the highest epoch any fenced write for the host carried (runtime, change append,
-- change update). Fenced writes lock the host's row, compare, write, and raise it.
CREATE TABLE hosts (
    id      uuid PRIMARY KEY,
    org     uuid NOT NULL,
    env     uuid NOT NULL REFERENCES envs (id),
    shard   bigint NOT NULL,
    labels  jsonb NOT NULL,
    version bigint NOT NULL,
    fence   bigint NOT NULL DEFAULT 0,
    doc     text NOT NULL
);
CREATE INDEX hosts_by_org ON hosts (org, id);
CREATE INDEX hosts_by_env ON hosts (env, id);
CREATE INDEX hosts_by_shard ON hosts (shard, id);
CREATE INDEX hosts_by_label ON hosts USING gin (labels jsonb_path_ops);

CREATE TABLE runtime (
    host   uuid PRIMARY KEY REFERENCES hosts (id) ON DELETE CASCADE,
    online boolean NOT NULL,
    doc    text NOT NULL
);

CREATE TABLE changes (
    host    uuid NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    seq     bigint NOT NULL,
    id      uuid NOT NULL,
    shard   bigint NOT NULL,
    pending boolean NOT NULL,
    doc     text NOT NULL,
    PRIMARY KEY (host, seq),
    UNIQUE (host, id)
);
CREATE INDEX changes_pending ON changes (shard, host, seq) WHERE pending;

-- Tokens outlive their environment (and are then unusable), not their organization.
-- `uses` and `revoked` change; the rest of the record is `doc`. Times are microseconds since the
-- epoch, compared exactly as the Rust side computes them.
CREATE TABLE enroll_tokens (
    id            uuid PRIMARY KEY,
    org           uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    env           uuid NOT NULL,
    secret_sha256 text NOT NULL UNIQUE,
    created_us    bigint NOT NULL,
    expires_us    bigint NOT NULL,
    max_uses      bigint,
    uses          bigint NOT NULL,
    revoked       boolean NOT NULL,
    doc           text NOT NULL
);
CREATE INDEX enroll_tokens_by_org ON enroll_tokens (org, created_us, id);

CREATE TABLE api_tokens (
    id            uuid PRIMARY KEY,
    secret_sha256 text NOT NULL UNIQUE,
    revoked       boolean NOT NULL,
    doc           text NOT NULL
);

CREATE SEQUENCE audit_seq;
CREATE TABLE audit (
    seq bigint PRIMARY KEY,
    doc text NOT NULL
);

CREATE TABLE apps (
    org     uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    name    text COLLATE "C" NOT NULL,
    version text COLLATE "C" NOT NULL,
    doc     text NOT NULL,
    PRIMARY KEY (org, name, version)
);

-- One scope column per kind, so that each has its foreign key and goes with its parent.
CREATE TABLE settings (
    kind  smallint NOT NULL, -- 0 organization, 1 environment, 2 host
    scope uuid NOT NULL,
    key   text COLLATE "C" NOT NULL,
    org   uuid REFERENCES orgs (id) ON DELETE CASCADE,
    env   uuid REFERENCES envs (id) ON DELETE CASCADE,
    host  uuid REFERENCES hosts (id) ON DELETE CASCADE,
    doc   text NOT NULL,
    PRIMARY KEY (kind, scope, key),
    CHECK (num_nonnulls(org, env, host) = 1)
);
CREATE INDEX settings_by_org ON settings (org) WHERE org IS NOT NULL;
CREATE INDEX settings_by_env ON settings (env) WHERE env IS NOT NULL;
CREATE INDEX settings_by_host ON settings (host) WHERE host IS NOT NULL;

-- Jobs outlive their organization, as in the embedded backend.
CREATE TABLE jobs (
    id      uuid PRIMARY KEY,
    org     uuid NOT NULL,
    version bigint NOT NULL,
    doc     text NOT NULL
);

CREATE TABLE job_results (
    job  uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    host uuid NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    doc  text NOT NULL,
    PRIMARY KEY (job, host)
);
CREATE INDEX job_results_by_host ON job_results (host);
