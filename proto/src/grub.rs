//! The `/boot/grub/grub.cfg` of every disk Stork makes bootable, by `stork-image` (the raw
//! image) or by the agent (a deploy by layout): one text, so both disks boot alike.

/// How grub.cfg finds the root and how the kernel is told it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root<'a> {
    /// The root file system's UUID: GRUB searches by it.
    pub uuid: &'a str,
    /// The kernel's `root=`: `None` for `UUID=<uuid>`; a device path (`/dev/mapper/vg0-root`)
    /// where the initramfs activates the root by its name (LVM).
    pub device: Option<&'a str>,
    /// GRUB modules loaded before the search: the partition table, the file system, and
    /// what the root sits on (`mdraid1x`, `lvm`).
    pub modules: &'a [&'a str],
}

/// An ext4 root on a GPT partition, by UUID: the raw image's.
pub fn ext4_root(uuid: &str) -> Root<'_> {
    Root {
        uuid,
        device: None,
        modules: &["part_gpt", "ext2"],
    }
}

/// GRUB on the console and the first serial port, the root file system found by UUID, one
/// entry booting `kernel` and `initrd` (paths on the root) with `cmdline`. `header` is the
/// comment lines that open the file (each starting with `#`).
pub fn grub_cfg(
    header: &str,
    title: &str,
    root: &Root,
    cmdline: &str,
    kernel: &str,
    initrd: &str,
) -> String {
    let args = if cmdline.is_empty() {
        String::new()
    } else {
        format!(" {cmdline}")
    };
    let insmod: String = root
        .modules
        .iter()
        .map(|m| format!("insmod {m}\n"))
        .collect();
    let (uuid, kernel_root) = (
        root.uuid,
        root.device
            .map_or_else(|| format!("UUID={}", root.uuid), str::to_string),
    );
    format!(
        "{header}
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
set timeout=1
set default=0
{insmod}search --no-floppy --fs-uuid --set=root {uuid}
menuentry '{title}' {{
    insmod all_video
    insmod gzio
    linux {kernel} root={kernel_root} ro{args}
    initrd {initrd}
}}
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boots_by_uuid_with_the_command_line() {
        let cfg = grub_cfg(
            "# h",
            "Debian",
            &ext4_root("u-1"),
            "console=ttyS0",
            "/vmlinuz",
            "/initrd.img",
        );
        assert!(cfg.starts_with("# h\nserial --unit=0"));
        assert!(cfg.contains("insmod part_gpt\ninsmod ext2\nsearch "));
        assert!(cfg.contains("search --no-floppy --fs-uuid --set=root u-1\n"));
        assert!(cfg.contains("    linux /vmlinuz root=UUID=u-1 ro console=ttyS0\n"));
        assert!(cfg.contains("    initrd /initrd.img\n"));
        let bare = grub_cfg("# h", "x", &ext4_root("u"), "", "/vmlinuz", "/initrd.img");
        assert!(bare.contains("root=UUID=u ro\n"));
        let lvm = Root {
            uuid: "u-2",
            device: Some("/dev/mapper/vg0-root"),
            modules: &["part_gpt", "mdraid1x", "lvm", "xfs"],
        };
        let cfg = grub_cfg("# h", "x", &lvm, "", "/vmlinuz", "/initrd.img");
        assert!(cfg.contains(
            "insmod mdraid1x\ninsmod lvm\ninsmod xfs\nsearch --no-floppy --fs-uuid --set=root u-2\n"
        ));
        assert!(cfg.contains("root=/dev/mapper/vg0-root ro\n"), "{cfg}");
    }
}
