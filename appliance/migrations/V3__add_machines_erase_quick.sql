-- Release with erase: signatures and partition tables only (1), or every byte (0).
ALTER TABLE machines ADD COLUMN erase_quick INTEGER NOT NULL DEFAULT 1;
