-- Version 5: the gateway and billing.
-- A replica's power cap per GPU as the plan set it (the simulated backend's speed follows it).
ALTER TABLE replicas ADD COLUMN cap_w DOUBLE PRECISION NOT NULL DEFAULT 0;

-- Metering: one row per served request (kind 'tokens') or finished job (kind 'gpu'). id is the
-- idempotency key (request id, the tenant's Idempotency-Key, or the job id): a retried or replayed
-- write of the same usage is ignored. at_ms (when it finished) places it in a billing period;
-- seq pages the list in write order.
CREATE TABLE usage (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    tenant_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    tier BIGINT NOT NULL,
    model TEXT NOT NULL,
    site_id TEXT NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    gpu_ms BIGINT NOT NULL,
    spot BIGINT NOT NULL,
    status TEXT NOT NULL,
    tag TEXT,
    at_ms BIGINT NOT NULL
);
CREATE INDEX usage_tenant_at ON usage(tenant_id, at_ms);
CREATE INDEX usage_tag ON usage(tag, seq) WHERE tag IS NOT NULL;

-- Price plans by tenant, each in force from effective_ms (a change applies from the next billing
-- period, so an invoice is rated by one plan).
CREATE TABLE price_plans (
    tenant_id TEXT NOT NULL,
    effective_ms BIGINT NOT NULL,
    body TEXT NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, effective_ms)
);

-- Site P&L per engine interval (micro-USD).
CREATE TABLE site_pnl (
    site_id TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    hours DOUBLE PRECISION NOT NULL,
    mining_revenue BIGINT NOT NULL,
    inference_revenue BIGINT NOT NULL,
    energy_cost BIGINT NOT NULL,
    grid_credits BIGINT NOT NULL,
    PRIMARY KEY (site_id, at_ms)
);
