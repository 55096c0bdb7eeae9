-- Commissioning scripts and their results (issue 22): users' scripts run on every machine
-- commissioned (in name order), the hardware tests a commissioning asked for recorded on the
-- machine, and each run's result per machine (the last commissioning's; a new one clears
-- them). The pair of this file is PostgreSQL's V4.
CREATE TABLE scripts (
    name       TEXT PRIMARY KEY,
    body       TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
ALTER TABLE machines ADD COLUMN commission_tests TEXT NOT NULL DEFAULT '[]';
CREATE TABLE script_results (
    machine_id TEXT NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    body       TEXT NOT NULL,
    at         INTEGER NOT NULL,
    PRIMARY KEY (machine_id, name)
);
