-- Whether a machine network-boots the signed chain (shim, GRUB) under UEFI PXE: its tag
-- `secure-boot` or Secure Boot on in its inventory (`SignedBoot::machine_wants`), written
-- by the store with every save. The DHCP servers' set of such MACs is read through it:
-- read from every whole machine (inventories parsed, secrets opened), that set cost a walk
-- of the table once a second while events came. The pair of this file is SQLite's V16.
ALTER TABLE machines ADD COLUMN signed_boot BIGINT NOT NULL DEFAULT 0;
UPDATE machines SET signed_boot = 1
WHERE (inventory IS NOT NULL AND (inventory::jsonb ->> 'secure_boot') = 'true')
   OR tags::jsonb @> '["secure-boot"]'::jsonb;
CREATE INDEX machines_signed_boot ON machines(id) WHERE signed_boot = 1;
