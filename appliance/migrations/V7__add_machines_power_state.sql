-- The power state last seen and when: the machine list shows and filters by it without
-- asking every BMC.
ALTER TABLE machines ADD COLUMN power_state TEXT;
ALTER TABLE machines ADD COLUMN power_seen_at INTEGER;
