//! Which machines network-boot the signed chain (Debian's shim and GRUB) instead of iPXE under
//! UEFI PXE: iPXE is not signed, so a machine with Secure Boot on can only boot the chain.
//!
//! A machine gets it when the appliance sends it to every UEFI PXE client
//! (`boot.secure_boot`), when the machine carries the tag [`TAG`] (set when it is added, before
//! its first boot: a machine with Secure Boot on cannot enlist through iPXE), or when its last
//! inventory says Secure Boot was on. The DHCP servers ask [`SignedBoot::wants`] for each
//! offer: a set in memory, kept from the store by [`SignedBoot::follow`].

use std::collections::HashSet;
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use stork_proto::MacAddr;

use super::Controller;
use crate::store::Machine;

/// The machine tag that asks for the signed chain.
pub const TAG: &str = "secure-boot";

/// How often the set is read again even with no change seen here (another appliance on a
/// shared database may have added a machine).
const REFRESH: Duration = Duration::from_secs(10);
/// Changes come in bursts (a deploy's progress events): read at most this often.
const SETTLE: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct SignedBoot {
    /// `boot.secure_boot`: every UEFI PXE client.
    all: bool,
    macs: RwLock<HashSet<MacAddr>>,
}

impl SignedBoot {
    pub fn new(all: bool) -> Self {
        Self {
            all,
            macs: RwLock::default(),
        }
    }

    /// Whether a UEFI PXE client with `mac` gets the signed chain.
    pub fn wants(&self, mac: MacAddr) -> bool {
        self.all
            || self
                .macs
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&mac)
    }

    /// Whether `m` asks for the signed chain by itself (its tag, its inventory).
    pub fn machine_wants(m: &Machine) -> bool {
        m.tags.iter().any(|t| t == TAG)
            || m.inventory.as_ref().and_then(|i| i.secure_boot) == Some(true)
    }

    /// Takes the set: every MAC of each machine that wants the chain, as the store keeps
    /// them (`Store::signed_boot_macs`, written from [`SignedBoot::machine_wants`]).
    pub fn load(&self, macs: impl IntoIterator<Item = MacAddr>) {
        let macs: HashSet<MacAddr> = macs.into_iter().collect();
        *self.macs.write().unwrap_or_else(PoisonError::into_inner) = macs;
    }

    /// Adds `m`'s MACs at once if it wants the chain: a machine added with [`TAG`] and
    /// powered on straight away gets it at its first DHCP offer, before the next
    /// [`SignedBoot::follow`] read.
    pub fn note(&self, m: &Machine) {
        if Self::machine_wants(m) {
            self.macs
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(m.macs.iter().copied());
        }
    }

    /// Keeps the set current: read from the store at start, after changes (at most once
    /// per `SETTLE`, a second) and every `REFRESH` (10 s). Runs until the task is dropped.
    pub async fn follow(self: std::sync::Arc<Self>, controller: Controller) {
        let mut changes = controller.subscribe();
        loop {
            match controller.signed_boot_macs().await {
                Ok(macs) => self.load(macs),
                Err(e) => tracing::warn!(error = %e, "cannot read which machines boot signed"),
            }
            tokio::time::sleep(SETTLE).await;
            // Woken by a change or the refresh, whichever comes first.
            let _ = tokio::time::timeout(REFRESH, changes.changed()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(mac: &str, tags: &[&str], secure_boot: Option<bool>) -> Machine {
        let mut m = Machine::new("m".into(), vec![mac.parse().unwrap()], 0);
        m.tags = tags.iter().map(|t| t.to_string()).collect();
        m.inventory = secure_boot.map(|sb| stork_proto::inventory::Inventory {
            secure_boot: Some(sb),
            ..Default::default()
        });
        m
    }

    #[test]
    fn tagged_machines_and_those_seen_with_secure_boot_on_get_the_chain() {
        let machines = [
            machine("52:54:00:00:00:01", &[TAG], None),
            machine("52:54:00:00:00:02", &[], Some(true)),
            machine("52:54:00:00:00:03", &["rack-a"], Some(false)),
        ];
        let wanted: Vec<bool> = machines.iter().map(SignedBoot::machine_wants).collect();
        assert_eq!(wanted, [true, true, false]);
        // What the store answers for those (its test checks it does).
        let s = SignedBoot::new(false);
        s.load(machines[..2].iter().flat_map(|m| m.macs.clone()));
        let mac = |m: &str| m.parse::<MacAddr>().unwrap();
        assert!(s.wants(mac("52:54:00:00:00:01")));
        assert!(s.wants(mac("52:54:00:00:00:02")));
        assert!(!s.wants(mac("52:54:00:00:00:03")));
        assert!(!s.wants(mac("52:54:00:00:00:04")));
        s.note(&machine("52:54:00:00:00:04", &[TAG], None));
        assert!(s.wants(mac("52:54:00:00:00:04")));
        // The appliance-wide setting: everyone.
        assert!(SignedBoot::new(true).wants(mac("52:54:00:00:00:04")));
    }
}
