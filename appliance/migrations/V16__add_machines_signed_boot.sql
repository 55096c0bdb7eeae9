-- Whether a machine network-boots the signed chain (shim, GRUB) under UEFI PXE: its tag
-- `secure-boot` or Secure Boot on in its inventory (`SignedBoot::machine_wants`), written
-- by the store with every save. The DHCP servers' set of such MACs is read through it:
-- read from every whole machine (inventories parsed, secrets opened), that set cost a walk
-- of the table once a second while events came. The pair of this file is PostgreSQL's V8.
ALTER TABLE machines ADD COLUMN signed_boot INTEGER NOT NULL DEFAULT 0;
UPDATE machines SET signed_boot = 1
WHERE json_extract(inventory, '$.secure_boot') = 1
   OR EXISTS (SELECT 1 FROM json_each(tags) WHERE value = 'secure-boot');
CREATE INDEX machines_signed_boot ON machines(id) WHERE signed_boot = 1;
