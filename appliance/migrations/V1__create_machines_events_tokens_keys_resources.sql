-- The first schema: machines and their interfaces, the event history, API tokens, SSH keys
-- and boot resources.
CREATE TABLE machines (
    id            TEXT PRIMARY KEY,
    hostname      TEXT,
    status        TEXT NOT NULL,
    status_message TEXT,
    status_since  INTEGER NOT NULL,
    version       INTEGER NOT NULL,
    boot_mac      TEXT,
    arch          TEXT NOT NULL,
    power         TEXT NOT NULL,
    inventory     TEXT,
    owner         TEXT,
    deploy        TEXT,
    tags          TEXT NOT NULL,
    agent_token   TEXT,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE TABLE interfaces (
    mac        TEXT PRIMARY KEY,
    machine_id TEXT NOT NULL REFERENCES machines(id) ON DELETE CASCADE
);
CREATE INDEX interfaces_machine ON interfaces(machine_id);
CREATE TABLE events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    machine_id TEXT NOT NULL,
    at         INTEGER NOT NULL,
    actor      TEXT NOT NULL,
    old_status TEXT,
    new_status TEXT,
    message    TEXT NOT NULL
);
CREATE INDEX events_machine ON events(machine_id, id);
CREATE TABLE tokens (
    hash        TEXT PRIMARY KEY,
    id          TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE TABLE ssh_keys (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    key        TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE boot_resources (
    name       TEXT PRIMARY KEY,
    body       TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
