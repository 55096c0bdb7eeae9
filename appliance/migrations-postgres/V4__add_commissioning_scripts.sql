-- Commissioning scripts and their results (issue 22): users' scripts run on every machine
-- commissioned (in name order), the hardware tests a commissioning asked for recorded on the
-- machine, and each run's result per machine (the last commissioning's; a new one clears
-- them). The pair of this file is SQLite's V12.
CREATE TABLE scripts (
    name       TEXT COLLATE "C" PRIMARY KEY,
    body       TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
ALTER TABLE machines ADD COLUMN commission_tests TEXT NOT NULL DEFAULT '[]';
CREATE TABLE script_results (
    machine_id TEXT COLLATE "C" NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
    name       TEXT COLLATE "C" NOT NULL,
    body       TEXT NOT NULL,
    at         BIGINT NOT NULL,
    PRIMARY KEY (machine_id, name)
);
