-- Every agent request finds its machine by the hash of its bearer token: without an index
-- that is a scan of every machine (6 ms at 10,000) for each heartbeat, event and log line,
-- and for each wrong token a hostile host sends. The pair of this file is SQLite's V15.
CREATE INDEX machines_by_agent_token ON machines(agent_token) WHERE agent_token IS NOT NULL;
