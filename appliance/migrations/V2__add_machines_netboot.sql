-- Whether the machine should network-boot the agent (cleared once an image is installed).
ALTER TABLE machines ADD COLUMN netboot INTEGER NOT NULL DEFAULT 1;
