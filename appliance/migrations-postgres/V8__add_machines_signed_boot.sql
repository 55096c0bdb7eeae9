-- Whether a machine network-boots the signed chain (shim, GRUB) under UEFI PXE: its tag
-- `secure-boot` or Secure Boot on in its inventory (`SignedBoot::machine_wants`), written
-- by the store with every save. The DHCP servers' set of such MACs is read through it:
-- read from every whole machine (inventories parsed, secrets opened), that set cost a walk
-- of the table once a second while events came. The pair of this file is SQLite's V16.
ALTER TABLE machines ADD COLUMN signed_boot BIGINT NOT NULL DEFAULT 0;
--
-- Both JSON texts are matched as the store writes them (serde_json, compact), not parsed:
-- an inventory is what an agent sent, unauthenticated, and tags are free text, so either
-- may hold `\u0000`, which `jsonb` refuses (a refused cast would stop the migration, and so
-- the appliance). Inside a JSON string every quote is escaped, so `"secure_boot":true` is
-- the top-level key only, and `"secure-boot"` after `[` or `,` is a whole tag only.
UPDATE machines SET signed_boot = 1
WHERE inventory LIKE '%"secure\_boot":true%' ESCAPE '\'
   OR tags LIKE '["secure-boot"%'
   OR tags LIKE '%,"secure-boot"%';
CREATE INDEX machines_signed_boot ON machines(id) WHERE signed_boot = 1;
