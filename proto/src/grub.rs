//! The `/boot/grub/grub.cfg` of every disk Stork makes bootable, by `stork-image` (the raw
//! image) or by the agent (a deploy by layout): one text, so both disks boot alike.

/// GRUB on the console and the first serial port, the root file system found by UUID, one
/// entry booting `kernel` and `initrd` (paths on the root) with `cmdline`. `header` is the
/// comment lines that open the file (each starting with `#`).
pub fn grub_cfg(
    header: &str,
    title: &str,
    root_uuid: &str,
    cmdline: &str,
    kernel: &str,
    initrd: &str,
) -> String {
    let args = if cmdline.is_empty() {
        String::new()
    } else {
        format!(" {cmdline}")
    };
    format!(
        "{header}
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
set timeout=1
set default=0
insmod part_gpt
insmod ext2
search --no-floppy --fs-uuid --set=root {root_uuid}
menuentry '{title}' {{
    insmod all_video
    insmod gzio
    linux {kernel} root=UUID={root_uuid} ro{args}
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
            "u-1",
            "console=ttyS0",
            "/vmlinuz",
            "/initrd.img",
        );
        assert!(cfg.starts_with("# h\nserial --unit=0"));
        assert!(cfg.contains("search --no-floppy --fs-uuid --set=root u-1\n"));
        assert!(cfg.contains("    linux /vmlinuz root=UUID=u-1 ro console=ttyS0\n"));
        assert!(cfg.contains("    initrd /initrd.img\n"));
        let bare = grub_cfg("# h", "x", "u", "", "/vmlinuz", "/initrd.img");
        assert!(bare.contains("root=UUID=u ro\n"));
    }
}
