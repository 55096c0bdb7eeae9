-- The per-boot agent token's binding: the address it was given to, and whether the agent
-- has used it (then no boot script gives another this boot).
ALTER TABLE machines ADD COLUMN agent_ip TEXT;
ALTER TABLE machines ADD COLUMN agent_token_used INTEGER NOT NULL DEFAULT 0;
