//! GRUB for BIOS and UEFI without grub-install, which needs a block device to probe.
//!
//! - BIOS: `grub-mkimage -O i386-pc` makes core.img; we place it in the BIOS boot partition and
//!   patch boot.img into sector 0, doing by hand what `grub-bios-setup` does when it embeds
//!   core.img in a GPT BIOS boot partition (GRUB 2.06 `util/setup.c`): boot.img gets the
//!   disk's partition table, the hard-disk drive-check patch and the LBA of core.img; the
//!   blocklist at the end of core.img's first sector (diskboot.img) points at the rest.
//!   No Reed-Solomon redundancy is added: that only repairs a core.img damaged by other tools
//!   writing into the embedding area, which a dedicated BIOS boot partition does not have.
//! - UEFI: `grub-mkimage -O x86_64-efi` makes `EFI/BOOT/BOOTX64.EFI` (the removable-media
//!   path every firmware tries without a boot entry).
//!
//! Both images embed the same early config: find the root file system by UUID and read
//! `/boot/grub/grub.cfg` (and modules from `/boot/grub/<platform>`) there. `grub-mkimage` runs
//! inside the image's own root, so core and modules come from the same GRUB build.

use crate::gpt::SECTOR;

/// Modules built into both images: enough to find and read the root file system. The rest is
/// loaded from `/boot/grub/<platform>/` on demand.
pub const EARLY_MODULES: &[&str] = &["part_gpt", "ext2", "search", "search_fs_uuid", "normal"];
/// Extra for BIOS: the firmware disk driver.
pub const BIOS_MODULES: &[&str] = &["biosdisk"];

// Offsets in boot.img (GRUB 2 `include/grub/i386/pc/boot.h`).
const BPB_START: usize = 0x03;
const BPB_END: usize = 0x5a;
const KERNEL_SECTOR: usize = 0x5c;
const BOOT_DRIVE: usize = 0x64;
const DRIVE_CHECK: usize = 0x66;
const WINDOWS_NT_MAGIC: usize = 0x1b8;
const PART_END: usize = 0x1fe;

/// Size of one blocklist entry at the end of diskboot.img: u64 start, u16 length, u16 segment.
const BLOCKLIST: usize = 12;
/// Where diskboot loads the sectors after its own: `GRUB_BOOT_I386_PC_KERNEL_SEG` (0x800) plus
/// one sector (0x20 paragraphs), as `save_blocklists` starts its `current_segment`.
const FIRST_SEGMENT: u16 = 0x820;
/// core.img must fit below 0x78000 when loaded at 0x9000 (`maxsec` in setup.c).
const MAX_CORE_SECTORS: usize = (0x78000 - 0x9000) / SECTOR as usize;

#[derive(Debug, thiserror::Error)]
pub enum GrubError {
    #[error("boot.img is {len} bytes, not one sector")]
    BootImgSize { len: usize },
    #[error("boot.img lacks the 0x55AA signature")]
    BootImgSignature,
    #[error("core.img is {len} bytes: between 2 and {MAX_CORE_SECTORS} sectors expected")]
    CoreImgSize { len: usize },
    #[error(
        "core.img's blocklist slot at {offset} is not empty: not an i386-pc grub-mkimage output"
    )]
    CoreImgBlocklist { offset: usize },
}

/// Sector 0 for a GPT disk: boot.img's code with `mbr`'s partition table (the protective MBR)
/// and BPB area, booting core.img from `core_lba`.
pub fn boot_sector(
    boot_img: &[u8],
    mbr: &[u8; 512],
    core_lba: u64,
) -> Result<[u8; 512], GrubError> {
    let mut s: [u8; 512] = boot_img.try_into().map_err(|_| GrubError::BootImgSize {
        len: boot_img.len(),
    })?;
    if s[510..] != [0x55, 0xAA] {
        return Err(GrubError::BootImgSignature);
    }
    s[BPB_START..BPB_END].copy_from_slice(&mbr[BPB_START..BPB_END]);
    // A hard disk: nop out the jump that skips the workaround for BIOSes passing a bad drive.
    s[DRIVE_CHECK] = 0x90;
    s[DRIVE_CHECK + 1] = 0x90;
    s[WINDOWS_NT_MAGIC..PART_END].copy_from_slice(&mbr[WINDOWS_NT_MAGIC..PART_END]);
    // 0xff: use the drive number the BIOS passes in DL.
    s[BOOT_DRIVE] = 0xff;
    s[KERNEL_SECTOR..KERNEL_SECTOR + 8].copy_from_slice(&core_lba.to_le_bytes());
    Ok(s)
}

/// core.img padded to whole sectors, its blocklist pointing at sectors `core_lba + 1 ..` where
/// the rest of it is written contiguously.
pub fn embed_core(core_img: &[u8], core_lba: u64) -> Result<Vec<u8>, GrubError> {
    let sectors = core_img.len().div_ceil(SECTOR as usize);
    if !(2..=MAX_CORE_SECTORS).contains(&sectors) {
        return Err(GrubError::CoreImgSize {
            len: core_img.len(),
        });
    }
    let mut core = core_img.to_vec();
    core.resize(sectors * SECTOR as usize, 0);
    let first = SECTOR as usize - BLOCKLIST;
    // grub-mkimage fills the first slot (for its default layout) and leaves the one below it
    // empty, as the terminator; anything else means we would misread the layout.
    let below = first - BLOCKLIST;
    if core[below + 8..below + 10] != [0, 0] {
        return Err(GrubError::CoreImgBlocklist { offset: below });
    }
    let rest = u16::try_from(sectors - 1).map_err(|_| GrubError::CoreImgSize {
        len: core_img.len(),
    })?;
    core[first..first + 8].copy_from_slice(&(core_lba + 1).to_le_bytes());
    core[first + 8..first + 10].copy_from_slice(&rest.to_le_bytes());
    core[first + 10..first + 12].copy_from_slice(&FIRST_SEGMENT.to_le_bytes());
    // The next entry down is the terminator.
    core[first - BLOCKLIST..first].fill(0);
    Ok(core)
}

/// Makes both GRUB images with the tree's own `grub-mkimage` (so they match its modules):
/// i386-pc at `core_img` (with [`BIOS_MODULES`]) and x86_64-efi at `core_efi` (paths inside
/// the tree), each embedding `early` and `modules`, looking for the rest under `prefix`.
pub fn make_images(
    tree: &std::path::Path,
    early: &str,
    prefix: &str,
    modules: &[&str],
    core_img: &str,
    core_efi: &str,
) -> Result<(), crate::rootfs::RootfsError> {
    use crate::rootfs;
    let early_path = "/tmp/stork-early.cfg";
    rootfs::write_file(&tree.join(early_path.trim_start_matches('/')), early, 0o644)?;
    for (format, out, extra) in [
        ("i386-pc", core_img, BIOS_MODULES),
        ("x86_64-efi", core_efi, &[][..]),
    ] {
        if let Some(dir) = tree.join(out).parent() {
            std::fs::create_dir_all(dir).map_err(rootfs::io_err(dir))?;
        }
        crate::cmd::run(
            rootfs::chroot(tree, None)
                .args(["grub-mkimage", "-O", format, "-c", early_path, "-p", prefix])
                .arg("-o")
                .arg(format!("/{out}"))
                .args(modules)
                .args(extra),
        )?;
    }
    Ok(())
}

/// Embedded in both images: root by file-system UUID, prefix on it.
pub fn early_config(root_uuid: &str) -> String {
    format!("search --no-floppy --fs-uuid --set=root {root_uuid}\nset prefix=($root)/boot/grub\n")
}

/// `/boot/grub/grub.cfg`. Boots `/vmlinuz` and `/initrd.img`, the symlinks Debian's
/// linux-base keeps pointing at the newest kernel, so a kernel upgrade needs no new grub.cfg.
pub fn grub_cfg(title: &str, root_uuid: &str, cmdline: &str) -> String {
    stork_proto::grub::grub_cfg(
        "# Written by stork-image. Boots the newest kernel through the /vmlinuz and /initrd.img
# symlinks; regenerate with grub-mkconfig (it reads /etc/default/grub) if you prefer.",
        title,
        &stork_proto::grub::ext4_root(root_uuid),
        cmdline,
        "/vmlinuz",
        "/initrd.img",
    )
}

/// `/etc/default/grub`, for `grub-mkconfig` on the installed system.
pub fn default_grub(cmdline: &str) -> String {
    format!(
        "# Written by stork-image.
GRUB_DEFAULT=0
GRUB_TIMEOUT=1
GRUB_DISTRIBUTOR=`lsb_release -i -s 2> /dev/null || echo Debian`
GRUB_CMDLINE_LINUX_DEFAULT=\"\"
GRUB_CMDLINE_LINUX=\"{cmdline}\"
GRUB_TERMINAL=\"console serial\"
GRUB_SERIAL_COMMAND=\"serial --unit=0 --speed=115200\"
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_boot_img() -> Vec<u8> {
        let mut b = vec![0xAB; 512];
        b[DRIVE_CHECK] = 0xEB; // jmp
        b[510] = 0x55;
        b[511] = 0xAA;
        b
    }

    #[test]
    fn boot_sector_keeps_the_partition_table() {
        let mut mbr = [0u8; 512];
        mbr[0x1BE + 4] = 0xEE;
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        let s = boot_sector(&fake_boot_img(), &mbr, 2048).unwrap();
        assert_eq!(&s[0x1BE..], &mbr[0x1BE..]);
        assert_eq!(s[0x1BE + 4], 0xEE);
        assert_eq!(&s[KERNEL_SECTOR..KERNEL_SECTOR + 8], &2048u64.to_le_bytes());
        assert_eq!(s[BOOT_DRIVE], 0xff);
        assert_eq!(&s[DRIVE_CHECK..DRIVE_CHECK + 2], &[0x90, 0x90]);
        assert_eq!(&s[BPB_START..BPB_END], &mbr[BPB_START..BPB_END]);
        // Code outside the patched ranges is boot.img's.
        assert_eq!(s[0], 0xAB);
        assert_eq!(s[0x100], 0xAB);

        assert!(matches!(
            boot_sector(&[0u8; 100], &mbr, 1),
            Err(GrubError::BootImgSize { len: 100 })
        ));
        assert!(matches!(
            boot_sector(&[0u8; 512], &mbr, 1),
            Err(GrubError::BootImgSignature)
        ));
    }

    #[test]
    fn core_blocklist_covers_the_rest() {
        let core = vec![0x11u8; 512 * 40 + 100];
        let mut fresh = core.clone();
        fresh[488..512].fill(0);
        let out = embed_core(&fresh, 2048).unwrap();
        assert_eq!(out.len(), 512 * 41);
        assert_eq!(&out[500..508], &2049u64.to_le_bytes());
        assert_eq!(&out[508..510], &40u16.to_le_bytes());
        assert_eq!(&out[510..512], &0x820u16.to_le_bytes());
        assert_eq!(&out[488..500], &[0u8; 12]);
        assert_eq!(&out[512..512 * 41 - 412], &core[512..512 * 41 - 412]);
        assert!(out[512 * 40 + 100..].iter().all(|b| *b == 0));

        assert!(matches!(
            embed_core(&[0u8; 512], 1),
            Err(GrubError::CoreImgSize { .. })
        ));
        // A second filled slot: not what grub-mkimage writes.
        assert!(matches!(
            embed_core(&core, 1),
            Err(GrubError::CoreImgBlocklist { .. })
        ));
    }

    #[test]
    fn configs_name_the_root_by_uuid() {
        let u = "0d1e2f3a-1111-4222-8333-444455556666";
        assert!(early_config(u).contains(&format!("--set=root {u}")));
        let cfg = grub_cfg("Debian", u, "console=ttyS0");
        assert!(cfg.contains(&format!("root=UUID={u} ro console=ttyS0")));
        assert!(default_grub("console=ttyS0").contains("GRUB_CMDLINE_LINUX=\"console=ttyS0\""));
    }
}
