-- Agent heartbeats: when the last came, from which step, and by when the next is due.
ALTER TABLE machines ADD COLUMN last_heartbeat INTEGER;
ALTER TABLE machines ADD COLUMN heartbeat_step TEXT;
ALTER TABLE machines ADD COLUMN heartbeat_deadline INTEGER;
