-- The static addresses deploys give installed OSes (a deploy's network config, issue 22),
-- each held by one machine of a site across every appliance on the database: the key
-- refuses a second holder even when two appliances allocate at once. Sites are separate
-- networks and may use the same addresses. A machine's rows follow its deploy (set with it,
-- gone when it is cleared). The pair of this file is SQLite's V11.
CREATE TABLE static_addresses (
    site       TEXT COLLATE "C" NOT NULL,
    ip         TEXT COLLATE "C" NOT NULL,
    machine_id TEXT COLLATE "C" NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
    PRIMARY KEY (site, ip)
);
CREATE INDEX static_addresses_machine ON static_addresses(machine_id);
