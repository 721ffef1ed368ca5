-- Version 6: dashboard sessions kept by the server, and tenant rate windows shared by every API
-- process.

-- A dashboard session: the cookie carries a random secret, stored here only as its SHA-256 (a
-- copy of this table logs nobody in). The subject is re-read on every cache miss, so a role
-- change or a revoked key takes effect on the session too; logout deletes the row.
CREATE TABLE sessions (
    id_hash TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);
CREATE INDEX sessions_expires ON sessions(expires_ms);

-- Requests and tokens each tenant used in each one-minute window, summed over every API
-- process (each adds what it admitted a few times a second and reads the total back).
CREATE TABLE rate_windows (
    tenant_id TEXT NOT NULL,
    window_ms BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    tokens BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, window_ms)
);

-- Each tenant's allowance per minute, over all its keys and every API process together.
ALTER TABLE tenants ADD COLUMN requests_per_min BIGINT NOT NULL DEFAULT 60000;
ALTER TABLE tenants ADD COLUMN tokens_per_min BIGINT NOT NULL DEFAULT 20000000;

-- The answer a request with an Idempotency-Key was given (its status, type and body) and its
-- usage record as JSON, kept 24 hours: a retry with the same key gets this answer again, and is
-- billed once (the usage is written from here if the process stopped before it was).
CREATE TABLE outcomes (
    id TEXT PRIMARY KEY,
    status BIGINT NOT NULL,
    content_type TEXT NOT NULL,
    body TEXT NOT NULL,
    usage TEXT NOT NULL,
    at_ms BIGINT NOT NULL
);
CREATE INDEX outcomes_at ON outcomes(at_ms);
