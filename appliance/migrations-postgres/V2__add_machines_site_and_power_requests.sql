-- SQLite's V10: each machine's site, and the power actions waiting for an appliance of it.
ALTER TABLE machines ADD COLUMN site TEXT COLLATE "C";
CREATE TABLE power_requests (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    site         TEXT COLLATE "C" NOT NULL,
    machine_id   TEXT COLLATE "C" NOT NULL,
    action       TEXT NOT NULL,
    requested_at BIGINT NOT NULL,
    requested_by TEXT NOT NULL
);
CREATE INDEX power_requests_site ON power_requests(site, id);
