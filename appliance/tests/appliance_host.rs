//! `stork appliance grow-data` on a real block device: a 64 MiB loop device (partitions
//! scanned by the kernel) holding a 32 MiB image's GPT, its first partition mounted while
//! the last one grows, as on the appliance where the running system is mounted. Needs root
//! (loop devices, mount); skipped with a reason otherwise.

// Helpers outside `#[test]` functions panic on setup failures too, on purpose.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use stork::host::grow;

const MIB: u64 = 1 << 20;
/// 512-byte sectors per MiB.
const MIB_LBA: u64 = MIB / 512;

/// Detaches the loop device, also when the test fails.
struct LoopDevice(PathBuf);

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// Unmounts, also when the test fails (dropped before the loop device: declared after it).
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

/// The kernel's size of a partition in bytes (sysfs counts 512-byte sectors).
fn kernel_size(name: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/sys/class/block/{name}/size")).unwrap();
    s.trim().parse::<u64>().unwrap() * 512
}

/// A 32 MiB image: protective MBR, GPT, `stork-system-a` from 1 to 8 MiB and `stork-data`
/// from 8 MiB to the last usable sector; then the file grows to 64 MiB, as an image flashed
/// onto a larger disk.
fn image(path: &Path) {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .unwrap();
    f.set_len(32 * MIB).unwrap();
    gptman::GPT::write_protective_mbr_into(&mut f, 512).unwrap();
    let mut gpt = gptman::GPT::new_from(&mut f, 512, [0x5A; 16]).unwrap();
    let last = gpt.header.last_usable_lba;
    for (i, (name, first, end)) in [
        ("stork-system-a", MIB_LBA, 8 * MIB_LBA - 1),
        ("stork-data", 8 * MIB_LBA, last),
    ]
    .into_iter()
    .enumerate()
    {
        gpt[i as u32 + 1] = gptman::GPTPartitionEntry {
            // Linux file system data.
            partition_type_guid: [
                0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47,
                0x7D, 0xE4,
            ],
            unique_partition_guid: [i as u8 + 1; 16],
            starting_lba: first,
            ending_lba: end,
            attribute_bits: 0,
            partition_name: name.into(),
        };
    }
    gpt.write_into(&mut f).unwrap();
    f.sync_all().unwrap();
    f.set_len(64 * MIB).unwrap();
}

#[test]
fn grow_data_on_a_real_loop_device() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: grow-data needs root (loop devices, mount)");
        return;
    }
    for tool in ["losetup", "partx", "mkfs.ext4", "e2fsck", "mount", "lsblk"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            eprintln!("skipped: {tool} is not installed");
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    image(&img);
    let dev = run(
        "losetup",
        &["--find", "--show", "--partscan", img.to_str().unwrap()],
    );
    let _loop = LoopDevice(PathBuf::from(&dev));
    let disk = dev.trim_start_matches("/dev/").to_string();
    let (p1, p2) = (format!("{disk}p1"), format!("{disk}p2"));
    // devtmpfs makes the partitions' nodes as the kernel registers them. A kernel built
    // without the GPT parser (CONFIG_EFI_PARTITION, as this project's CI VM) registers none:
    // then partx reads the table in user space and adds them with BLKPG, which is what the
    // resize goes through anyway.
    let nodes =
        || Path::new(&format!("/dev/{p1}")).exists() && Path::new(&format!("/dev/{p2}")).exists();
    let wait_nodes = |secs| {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !nodes() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        nodes()
    };
    if !wait_nodes(2) {
        eprintln!("the kernel did not scan the GPT of {dev}: adding its partitions with partx");
        run("partx", &["--add", &dev]);
        assert!(wait_nodes(10), "no partition nodes for {dev}");
    }
    let before = kernel_size(&p2);
    assert!(before < 24 * MIB, "{before}");

    // The data partition holds a file system; the system partition is mounted meanwhile.
    run("mkfs.ext4", &["-q", "-F", &format!("/dev/{p2}")]);
    run("mkfs.ext4", &["-q", "-F", &format!("/dev/{p1}")]);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run("mount", &[&format!("/dev/{p1}"), mnt.to_str().unwrap()]);
    let _mounted = Mounted(mnt.clone());

    let report = grow::grow_data(Path::new(&format!("/dev/{p2}"))).unwrap();
    println!("{report}");
    assert!(
        report.change.grown() && report.change.backup_moved,
        "{report:?}"
    );
    assert!(report.kernel_resized);
    assert_eq!(report.number, 2);
    assert_eq!(report.disk, PathBuf::from(&dev));
    // Up to the last whole MiB before the backup GPT: 55 MiB from 8 MiB.
    let want = (report.change.end_after - report.change.start_lba + 1) * 512;
    assert_eq!(want, 55 * MIB);
    // The kernel sees it without the device being attached again.
    assert_eq!(kernel_size(&p2), want);
    let lsblk = run(
        "lsblk",
        &[
            "--bytes",
            "--noheadings",
            "--output",
            "SIZE",
            &format!("/dev/{p2}"),
        ],
    );
    assert_eq!(lsblk.parse::<u64>().unwrap(), want);
    // The table on the disk agrees, the backup at the end; the data is intact.
    let mut f = std::fs::File::open(&dev).unwrap();
    let gpt = gptman::GPT::read_from(&mut f, 512).unwrap();
    assert_eq!(gpt.header.backup_lba, 64 * MIB_LBA - 1);
    assert_eq!(gpt[2].ending_lba, report.change.end_after);
    assert_eq!(gpt[1].ending_lba, 8 * MIB_LBA - 1);
    run("e2fsck", &["-f", "-n", &format!("/dev/{p2}")]);
    if have("sgdisk") {
        let verify = run("sgdisk", &["--verify", &dev]);
        assert!(verify.contains("No problems found"), "{verify}");
    }

    // The next boot: nothing to do.
    let again = grow::grow_data(Path::new(&format!("/dev/{p2}"))).unwrap();
    println!("{again}");
    assert!(!again.change.grown() && !again.change.backup_moved && !again.kernel_resized);
    assert!(again.to_string().contains("nothing to do"), "{again}");
    assert_eq!(kernel_size(&p2), want);

    // The system partition is not the last: left as it is.
    let first = grow::grow_data(Path::new(&format!("/dev/{p1}"))).unwrap();
    assert!(first.change.not_last && !first.change.grown(), "{first:?}");
}
