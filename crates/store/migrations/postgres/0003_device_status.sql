-- Version 3: each device's live status as the resource manager last saw it (available, unknown,
-- quarantined), why, and since when; written on changes only.
ALTER TABLE devices ADD COLUMN status TEXT NOT NULL DEFAULT 'unknown';
ALTER TABLE devices ADD COLUMN status_reason TEXT;
ALTER TABLE devices ADD COLUMN status_ms BIGINT;
CREATE INDEX devices_status ON devices(status, idx);
