-- A machine's hardware in four numbers, kept from its inventory by triggers: the machine
-- list reads these instead of parsing every inventory (a few KiB of JSON each), so a page
-- of 100 costs the same at 10,000 machines as at 100. `HardwareSummary::of` in proto is the
-- same computation in Rust; a store test checks the two agree.
ALTER TABLE machines ADD COLUMN hw_cpus INTEGER;
ALTER TABLE machines ADD COLUMN hw_memory_bytes INTEGER;
ALTER TABLE machines ADD COLUMN hw_disks INTEGER;
ALTER TABLE machines ADD COLUMN hw_disk_bytes INTEGER;

CREATE TRIGGER machines_hardware_insert AFTER INSERT ON machines
WHEN NEW.inventory IS NOT NULL
BEGIN
    UPDATE machines SET
        hw_cpus = json_extract(NEW.inventory, '$.cpu.count'),
        hw_memory_bytes = json_extract(NEW.inventory, '$.memory.total_bytes'),
        hw_disks = json_array_length(NEW.inventory, '$.disks'),
        hw_disk_bytes = (SELECT COALESCE(SUM(json_extract(value, '$.size_bytes')), 0)
                         FROM json_each(NEW.inventory, '$.disks'))
    WHERE id = NEW.id;
END;

CREATE TRIGGER machines_hardware_update AFTER UPDATE OF inventory ON machines
WHEN NEW.inventory IS NOT OLD.inventory
BEGIN
    UPDATE machines SET
        hw_cpus = json_extract(NEW.inventory, '$.cpu.count'),
        hw_memory_bytes = json_extract(NEW.inventory, '$.memory.total_bytes'),
        hw_disks = json_array_length(NEW.inventory, '$.disks'),
        hw_disk_bytes = (SELECT COALESCE(SUM(json_extract(value, '$.size_bytes')), 0)
                         FROM json_each(NEW.inventory, '$.disks'))
    WHERE id = NEW.id;
END;

UPDATE machines SET
    hw_cpus = json_extract(inventory, '$.cpu.count'),
    hw_memory_bytes = json_extract(inventory, '$.memory.total_bytes'),
    hw_disks = json_array_length(inventory, '$.disks'),
    hw_disk_bytes = (SELECT COALESCE(SUM(json_extract(value, '$.size_bytes')), 0)
                     FROM json_each(inventory, '$.disks'))
WHERE inventory IS NOT NULL;

-- The list's sort keys, each with the id that breaks ties: a page is a walk along one
-- index, not a sort of every row. `power_state` sits after the inventory in the row (added
-- by V7), so without its index filtering on it read every inventory's overflow pages.
CREATE INDEX machines_by_created ON machines(created_at, id);
CREATE INDEX machines_by_hostname ON machines(hostname COLLATE NOCASE, id);
CREATE INDEX machines_by_status ON machines(status, id);
CREATE INDEX machines_by_updated ON machines(updated_at, id);
CREATE INDEX machines_by_power ON machines(power_state, id);
