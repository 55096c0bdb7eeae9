-- Several appliances on one database (issue 19): each machine is served by a site, the
-- appliances of one provisioning network (one, or an HA pair), which alone reach its BMC.
-- A power action asked through an appliance of another site waits in power_requests until
-- an appliance of the machine's site takes it. On SQLite there is one appliance and the
-- table stays empty; the pair of this file is PostgreSQL's V2.
ALTER TABLE machines ADD COLUMN site TEXT;
CREATE TABLE power_requests (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    site         TEXT NOT NULL,
    machine_id   TEXT NOT NULL,
    action       TEXT NOT NULL,
    requested_at INTEGER NOT NULL,
    requested_by TEXT NOT NULL
);
CREATE INDEX power_requests_site ON power_requests(site, id);
-- The DHCP leases of an HA pair (two appliances of one site sharing a network's pool),
-- which only PostgreSQL holds; here for the schemas to match (`stork db migrate`).
CREATE TABLE dhcp_leases (
    site    TEXT NOT NULL,
    ip      INTEGER NOT NULL,
    mac     TEXT NOT NULL,
    expires INTEGER NOT NULL,
    kind    TEXT NOT NULL,
    PRIMARY KEY (site, ip)
);
