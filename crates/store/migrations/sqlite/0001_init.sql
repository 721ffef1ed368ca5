-- The schema, version 1, for sqlite. Kept in step with ../postgres/0001_init.sql: the two differ only
-- in the auto-numbered keys (INTEGER PRIMARY KEY here). Times are milliseconds since the Unix epoch
-- (BIGINT), money is integer micro-USD, power in W, flags are 0/1.

CREATE TABLE sites (
    id TEXT PRIMARY KEY,
    idx BIGINT NOT NULL UNIQUE,
    power_cap_w DOUBLE PRECISION NOT NULL,
    settlement_point TEXT NOT NULL
);

CREATE TABLE devices (
    idx BIGINT PRIMARY KEY,
    site_id TEXT NOT NULL REFERENCES sites(id),
    feeder_id TEXT NOT NULL,
    rack_idx BIGINT NOT NULL,
    model TEXT NOT NULL,
    kind TEXT NOT NULL,
    maintenance BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX devices_site ON devices(site_id, idx);

CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    weight DOUBLE PRECISION NOT NULL,
    guaranteed_gpus DOUBLE PRECISION NOT NULL,
    borrow_limit_gpus DOUBLE PRECISION NOT NULL,
    created_ms BIGINT NOT NULL
);

CREATE TABLE accounts (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    secret_hash TEXT NOT NULL,
    default_band BIGINT NOT NULL,
    rate_per_s DOUBLE PRECISION NOT NULL,
    created_ms BIGINT NOT NULL,
    revoked_ms BIGINT
);
CREATE INDEX api_keys_tenant ON api_keys(tenant_id);

CREATE TABLE policies (
    name TEXT PRIMARY KEY,
    version BIGINT NOT NULL,
    body TEXT NOT NULL,
    updated_ms BIGINT NOT NULL
);

CREATE TABLE plans (
    id INTEGER PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX plans_at ON plans(at_ms);

CREATE TABLE decisions (
    id INTEGER PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    site_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX decisions_site ON decisions(site_id, id);

CREATE TABLE commands (
    id BIGINT PRIMARY KEY,
    device_idx BIGINT NOT NULL,
    target TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    issued_ms BIGINT NOT NULL,
    outcome TEXT,
    outcome_ms BIGINT
);
CREATE INDEX commands_device ON commands(device_idx, id);

CREATE TABLE signals (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    value DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (kind, key, at_ms)
);

CREATE TABLE telemetry_device_minute (
    device_idx BIGINT NOT NULL,
    minute_ms BIGINT NOT NULL,
    samples BIGINT NOT NULL,
    power_w_avg DOUBLE PRECISION NOT NULL,
    hashrate_ths_avg DOUBLE PRECISION,
    temp_c_max DOUBLE PRECISION NOT NULL,
    errors BIGINT NOT NULL,
    PRIMARY KEY (device_idx, minute_ms)
);

CREATE TABLE telemetry_site_second (
    site_id TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    power_w DOUBLE PRECISION NOT NULL,
    mining_w DOUBLE PRECISION NOT NULL,
    inference_w DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (site_id, at_ms)
);

CREATE TABLE workloads (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    body TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE INDEX workloads_tenant ON workloads(tenant_id, created_ms);

CREATE TABLE audit (
    id INTEGER PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    before_json TEXT,
    after_json TEXT
);
CREATE INDEX audit_at ON audit(at_ms);
