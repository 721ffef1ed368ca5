-- Version 4: the router's capacity as the engine last set it: one row per replica (the served
-- model on its GPUs), its site, GPUs, sequences it may hold now (0: out of service) and KV-cache
-- tokens; written on changes only, read by API processes when they start.
CREATE TABLE replicas (
    id BIGINT PRIMARY KEY,
    site_id TEXT NOT NULL,
    gpus BIGINT NOT NULL,
    slots BIGINT NOT NULL,
    kv_tokens BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
