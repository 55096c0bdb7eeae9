-- The hardware columns of V8 are now written by the store with the inventory (the same
-- computation, `HardwareSummary::of`), on SQLite and PostgreSQL alike, so the triggers that
-- kept them go: one way of writing them, not two.
DROP TRIGGER machines_hardware_insert;
DROP TRIGGER machines_hardware_update;
