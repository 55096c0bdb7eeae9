//! Known machines. In memory for now; the durable store replaces the inside of
//! [`Machines`] without changing its callers.

use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use stork_proto::{Inventory, MacAddr};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    New,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::New => "new",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// Who or what caused it: `agent`, `api`, `dhcp`.
    pub source: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub id: String,
    pub status: Status,
    pub boot_mac: MacAddr,
    /// Every interface's MAC, the boot NIC first.
    pub macs: Vec<MacAddr>,
    pub inventory: Option<Inventory>,
    pub created_at: u64,
    pub updated_at: u64,
    pub events: Vec<Event>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Default)]
pub struct Machines {
    inner: RwLock<Vec<Machine>>,
}

impl Machines {
    pub fn list(&self) -> Vec<Machine> {
        self.read().clone()
    }

    /// Finds a machine by id, or by any of its MAC addresses.
    pub fn get(&self, key: &str) -> Option<Machine> {
        let mac: Option<MacAddr> = key.parse().ok();
        self.read()
            .iter()
            .find(|m| m.id == key || mac.is_some_and(|mac| m.macs.contains(&mac)))
            .cloned()
    }

    /// Records an enlisting machine as New with its inventory; a machine already known by
    /// its boot MAC is updated in place and keeps its id.
    pub fn enlist(&self, boot_mac: MacAddr, inventory: Inventory) -> Machine {
        let now = unix_now();
        let mut macs = vec![boot_mac];
        macs.extend(
            inventory
                .nics
                .iter()
                .map(|n| n.mac)
                .filter(|m| *m != boot_mac),
        );
        let mut all = self.write();
        if let Some(m) = all.iter_mut().find(|m| m.macs.contains(&boot_mac)) {
            m.inventory = Some(inventory);
            m.macs = macs;
            m.updated_at = now;
            m.events.push(Event {
                at: now,
                source: "agent".into(),
                message: "enlisted again; inventory updated".into(),
            });
            return m.clone();
        }
        let id = loop {
            let candidate = short_id();
            if !all.iter().any(|m| m.id == candidate) {
                break candidate;
            }
        };
        let m = Machine {
            id,
            status: Status::New,
            boot_mac,
            macs,
            inventory: Some(inventory),
            created_at: now,
            updated_at: now,
            events: vec![Event {
                at: now,
                source: "agent".into(),
                message: "enlisted".into(),
            }],
        };
        all.push(m.clone());
        m
    }

    /// Appends an event to the machine that booted from `mac`; false if none is known.
    pub fn record(&self, mac: MacAddr, source: &str, message: String) -> bool {
        let mut all = self.write();
        let Some(m) = all.iter_mut().find(|m| m.macs.contains(&mac)) else {
            return false;
        };
        m.events.push(Event {
            at: unix_now(),
            source: source.into(),
            message,
        });
        true
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Machine>> {
        // A panic while holding the lock leaves plain data behind, still consistent.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Machine>> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Eight lowercase hex characters: short enough to type, random enough for a site.
fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enlisting_twice_keeps_the_id_and_finds_by_mac() {
        let ms = Machines::default();
        let mac: MacAddr = "52:54:00:00:00:01".parse().unwrap();
        let a = ms.enlist(mac, Inventory::default());
        let b = ms.enlist(mac, Inventory::default());
        assert_eq!(a.id, b.id);
        assert_eq!(ms.list().len(), 1);
        assert_eq!(ms.get("52-54-00-00-00-01").unwrap().id, a.id);
        assert_eq!(ms.get(&a.id).unwrap().events.len(), 2);
        assert!(ms.get("nope").is_none());
    }
}
