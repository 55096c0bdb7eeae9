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
-- The DHCP leases of an HA pair: one row per address of the site's pool that is bound
-- (`mac`, until `expires`, Unix seconds) or on probation after a DECLINE (`mac` empty).
-- The conditional upsert in `dhcp::journal::postgres` refuses a lease on an address
-- another client holds: no address goes to two clients, whichever server asks.
CREATE TABLE dhcp_leases (
    site    TEXT COLLATE "C" NOT NULL,
    ip      BIGINT NOT NULL,
    mac     TEXT NOT NULL,
    expires BIGINT NOT NULL,
    kind    TEXT NOT NULL,
    PRIMARY KEY (site, ip)
);
CREATE INDEX dhcp_leases_mac ON dhcp_leases(site, mac);
