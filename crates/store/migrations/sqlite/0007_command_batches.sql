-- Version 7: the agent link's command batches, stored as sent (hcp_fleet::wire bytes) before
-- they are published: one row per batch (up to 20,000 commands of one site), so a whole-fleet
-- plan is a few rows written in one transaction instead of 250,000. The per-command rows of
-- `commands` (outcomes, the device's history) follow off the signal's path.
CREATE TABLE command_batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    epoch BIGINT NOT NULL,
    site_id TEXT NOT NULL,
    issued_ms BIGINT NOT NULL,
    first_id BIGINT NOT NULL,
    last_id BIGINT NOT NULL,
    commands BIGINT NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX command_batches_site ON command_batches(site_id, issued_ms);
