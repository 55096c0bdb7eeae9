//! The flashable appliance image's host side: what its systemd units run around `stork
//! serve` (`stork appliance ...`). The units, GRUB's script and the image itself are
//! `image-builder`'s; this is the Rust they call.
//!
//! - [`setup`]: at every boot, before `stork serve`: reads `stork.toml` from the STORK
//!   partition, configures the network ([`network`], through networkd and hostnamed over
//!   D-Bus: [`dbus`]), writes the effective config for `stork serve`, prepares the data
//!   directory, the certificate and the first admin token, and tells the person at the
//!   console where to go ([`console`]). A config it cannot use puts the appliance in the
//!   safe state: DHCP client on the NICs, Stork's DHCP server off.
//! - [`grow`]: the data partition to the end of the disk, before it is mounted.
//! - [`slots`]: the A/B system slots in GRUB's environment block: commit after an upgrade
//!   booted, status.
//! - [`notify`]: `READY=1` to systemd once `stork serve` listens.
//! - [`config`]: the `[appliance]` section of `stork.toml`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

pub mod bundled;
pub mod config;
pub mod console;
pub mod dbus;
pub mod grow;
pub mod network;
pub mod notify;
pub mod setup;
pub mod slots;

/// What setup needs from the running system beyond files: behind a trait so the tests run
/// setup in a temporary directory and record the calls (the real D-Bus peers are proven in
/// the image's VM test).
pub trait Host {
    /// networkd re-reads its `.network` files (`org.freedesktop.network1.Manager.Reload`).
    fn reload_networkd(&self) -> Result<(), dbus::BusError>;
    /// The transient host name (`org.freedesktop.hostname1.SetHostname(name, false)`).
    fn set_hostname(&self, name: &str) -> Result<(), dbus::BusError>;
    /// The interface's IPv4 addresses now, link-local ones left out.
    fn ipv4_addresses(&self, interface: &str) -> Vec<network::Ipv4Cidr>;
}

/// Writes `bytes` to `path` whole or not at all: a temporary file beside it (`mode` from
/// its creation), synced, renamed over `path`, the directory synced. A FAT stick pulled
/// or a power cut leaves the old file or the new one.
pub(crate) fn write_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    // A leftover of a run that died keeps no mode of its own: the file is made anew. (No
    // chmod after: FAT refuses it.)
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
