-- The static addresses deploys give installed OSes (a deploy's network config, issue 22),
-- each held by one machine of a site across every appliance on the database: the key
-- refuses a second holder even when two appliances allocate at once. Sites are separate
-- networks and may use the same addresses. A machine's rows follow its deploy (set with it,
-- gone when it is cleared). The pair of this file is PostgreSQL's V3.
CREATE TABLE static_addresses (
    site       TEXT NOT NULL,
    ip         TEXT NOT NULL,
    machine_id TEXT NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
    PRIMARY KEY (site, ip)
);
CREATE INDEX static_addresses_machine ON static_addresses(machine_id);
