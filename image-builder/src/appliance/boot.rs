//! GRUB on the appliance disk: one script on the ESP boots system A or B, falls back to the other
//! when the chosen one does not load, and tries a freshly upgraded system once.
//!
//! Both GRUB images (BIOS core.img, UEFI BOOTX64.EFI) embed the same early configuration: find
//! the ESP by its FAT volume id and read `grub/grub.cfg` there. The script takes the disk from
//! `$root` (the ESP it was found on) and addresses the systems by partition number on that disk,
//! so it never boots a system from another disk with a Stork image on it.
//!
//! The environment block `grub/grubenv` (1024 bytes, GRUB's format) carries the A/B state:
//!
//! | variable | meaning |
//! |---|---|
//! | `stork_slot` | the committed system, `a` or `b` (empty: `a`) |
//! | `stork_try` | a system to try once (set by an upgrade) |
//! | `stork_trying` | `1` once GRUB has started that try |
//!
//! GRUB sets `stork_trying` before it boots the try, so a try that never reaches
//! `stork appliance commit` (the kernel panics and reboots, the system hangs and is reset) is
//! not tried again: the next boot takes the committed system, whose commit clears the try and
//! says the upgrade failed. A try whose kernel GRUB cannot even load falls back within the same
//! boot (`fallback`).

use super::layout::{CONFIG, DATA, ESP, SYSTEM_A, SYSTEM_B};

/// The kernel command line after the partitions GRUB names.
pub const CMDLINE: &str = "console=tty0 console=ttyS0,115200n8 panic=10";

/// GRUB modules built into both images: enough to find the ESP and read the script there.
pub const EARLY_MODULES: &[&str] = &["part_gpt", "fat", "search", "search_fs_uuid", "normal"];

/// The configuration embedded in both GRUB images.
pub fn early_config(esp_id: &str) -> String {
    format!("search --no-floppy --fs-uuid --set=root {esp_id}\nset prefix=($root)/grub\n")
}

/// `grub/grub.cfg` on the ESP.
pub fn grub_cfg() -> String {
    format!(
        r#"# Written by stork-image: boots system A or B of the disk this GRUB was loaded from.
# grub/grubenv: stork_slot (committed system, a when empty), stork_try (a system to try once,
# after an upgrade), stork_trying (1 once that try started). `stork appliance commit` ends a try.
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
set timeout=1
insmod part_gpt
insmod fat
insmod ext2
insmod regexp
insmod probe
insmod loadenv
insmod gzio
insmod all_video
# $root is the ESP the early configuration found, e.g. hd0,gpt{ESP}.
regexp --set=1:stork_disk '^([^,]+),' "$root"
set stork_env=($root)/grub/grubenv
load_env --file $stork_env stork_slot stork_try stork_trying
if [ "$stork_slot" = b ]; then set stork_boot=b; else set stork_boot=a; fi
if [ -n "$stork_try" ]; then
    if [ -z "$stork_trying" ]; then
        set stork_trying=1
        save_env --file $stork_env stork_trying
        set stork_boot=$stork_try
    fi
fi
if [ "$stork_boot" = b ]; then set stork_other=a; else set stork_other=b; fi
export stork_disk stork_boot stork_other

function stork_system {{
    if [ "$1" = b ]; then set n={SYSTEM_B}; else set n={SYSTEM_A}; fi
    probe --set=stork_sys --part-uuid ($stork_disk,gpt$n)
    probe --set=stork_esp --part-uuid ($stork_disk,gpt{ESP})
    probe --set=stork_config --part-uuid ($stork_disk,gpt{CONFIG})
    probe --set=stork_data --part-uuid ($stork_disk,gpt{DATA})
    echo "Stork: system $1 (partition $n of $stork_disk)"
    linux ($stork_disk,gpt$n)/vmlinuz root=PARTUUID=$stork_sys ro stork.slot=$1 stork.esp=$stork_esp stork.config=$stork_config stork.data=$stork_data {CMDLINE}
    initrd ($stork_disk,gpt$n)/initrd.img
}}

set default=0
set fallback=1
menuentry "Stork (system $stork_boot)" {{
    stork_system $stork_boot
}}
menuentry "Stork (system $stork_other)" {{
    stork_system $stork_other
}}
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_names_every_partition_by_number_on_its_own_disk() {
        let cfg = grub_cfg();
        for n in [ESP, CONFIG, SYSTEM_A, SYSTEM_B, DATA] {
            assert!(cfg.contains(&format!("{n}")), "{n}");
        }
        assert!(cfg.contains("root=PARTUUID=$stork_sys ro stork.slot=$1"));
        assert!(cfg.contains("set fallback=1"));
        // The try is marked before it is booted, never after.
        let mark = cfg.find("save_env --file $stork_env stork_trying").unwrap();
        let boot = cfg.find("set stork_boot=$stork_try").unwrap();
        assert!(mark < boot);
        assert!(early_config("ABCD-1234").contains("--set=root ABCD-1234"));
    }
}
