-- The static addresses deploys give installed OSes (a deploy's network config, issue 22),
-- each held by one machine across every appliance on the database: the key refuses a second
-- holder even when two appliances allocate at once. A machine's rows follow its deploy (set
-- with it, gone when it is cleared). The pair of this file is PostgreSQL's V3.
CREATE TABLE static_addresses (
    ip         TEXT PRIMARY KEY,
    machine_id TEXT NOT NULL REFERENCES machines(id) ON DELETE CASCADE
);
CREATE INDEX static_addresses_machine ON static_addresses(machine_id);
