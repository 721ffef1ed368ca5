-- Version 2: small facts about the stored data itself (the fingerprint of the topology last
-- written, so that a restart with the same fleet file skips rewriting it).
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
