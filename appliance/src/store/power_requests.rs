//! Power actions waiting for an appliance of the machine's site. With several appliances
//! on one database each provisioning network (a site) has its own: only they reach its
//! BMCs (another site's BMC network may even use the same addresses). An action asked
//! through an appliance of another site is queued here, and an appliance of the machine's
//! site takes it, woken by the event that says it was asked (`NOTIFY`).

use super::sql::{Dialect, args};
use super::{NewEvent, Store, StoreError};

/// A queued power action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PowerRequest {
    pub id: i64,
    pub machine_id: String,
    /// `netboot_and_power_on` or `power_off`.
    pub action: String,
    pub requested_at: i64,
    /// The site of the appliance that asked.
    pub requested_by: String,
}

/// At most this many requests are taken at once: the rest wait for the next round (or for
/// another appliance of the site).
const CLAIM_BATCH: i64 = 16;

impl Store {
    /// Queues `action` on machine `machine_id` for site `site`, with `event` saying so in
    /// the machine's history (whose notification wakes the site's appliances).
    pub fn queue_power(
        &self,
        site: &str,
        machine_id: &str,
        action: &str,
        requested_by: &str,
        event: &NewEvent,
    ) -> Result<(), StoreError> {
        self.transaction(|db| {
            db.execute(
                "INSERT INTO power_requests (site, machine_id, action, requested_at, requested_by)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                &args![site, machine_id, action, event.at, requested_by],
            )?;
            Self::insert_event(db, machine_id, event)
        })
    }

    /// Takes (removes) the oldest requests for site `site`, oldest first. Of two
    /// appliances of the site asking at once each gets its own (`SKIP LOCKED`). A request
    /// taken by an appliance that dies before acting is gone: the machine's busy-status
    /// timeout covers it, as it covers a BMC that did not answer.
    pub fn claim_power(&self, site: &str) -> Result<Vec<PowerRequest>, StoreError> {
        self.run(|db| {
            let skip = match db.dialect() {
                Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
                Dialect::Sqlite => "",
            };
            let rows = db.query(
                &format!(
                    "DELETE FROM power_requests WHERE id IN (
                         SELECT id FROM power_requests WHERE site = ?1
                         ORDER BY id LIMIT ?2{skip})
                     RETURNING id, machine_id, action, requested_at, requested_by"
                ),
                &args![site, CLAIM_BATCH],
            )?;
            let mut out = rows
                .iter()
                .map(|r| {
                    Ok(PowerRequest {
                        id: r.get(0)?,
                        machine_id: r.get(1)?,
                        action: r.get(2)?,
                        requested_at: r.get(3)?,
                        requested_by: r.get(4)?,
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            out.sort_by_key(|r| r.id);
            Ok(out)
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::Machine;

    fn event(at: i64) -> NewEvent {
        NewEvent {
            at,
            actor: "controller".into(),
            old_status: None,
            new_status: None,
            message: "power: asked of site b".into(),
        }
    }

    #[test]
    fn requests_are_taken_once_by_their_site_oldest_first_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        requests_are_taken_once_by_their_site_oldest_first(&|| {
            Store::open(&dir.path().join("s.db")).unwrap()
        });
    }

    /// Also a case of `store::backends` (on PostgreSQL: `FOR UPDATE SKIP LOCKED`).
    pub(crate) fn requests_are_taken_once_by_their_site_oldest_first(open: &dyn Fn() -> Store) {
        let store = open();
        let m = Machine::new("m1".into(), vec!["52:54:00:00:00:01".parse().unwrap()], 0);
        let created = NewEvent {
            message: "created".into(),
            ..event(0)
        };
        store.create_machine(&m, &created).unwrap();
        store
            .queue_power("b", "m1", "power_off", "a", &event(1))
            .unwrap();
        store
            .queue_power("b", "m1", "netboot_and_power_on", "a", &event(2))
            .unwrap();
        store
            .queue_power("c", "m1", "power_off", "a", &event(3))
            .unwrap();
        assert!(store.claim_power("a").unwrap().is_empty());
        let b = store.claim_power("b").unwrap();
        let actions: Vec<&str> = b.iter().map(|r| r.action.as_str()).collect();
        assert_eq!(actions, ["power_off", "netboot_and_power_on"]);
        assert_eq!((b[0].requested_at, b[0].requested_by.as_str()), (1, "a"));
        assert!(store.claim_power("b").unwrap().is_empty(), "taken once");
        assert_eq!(store.claim_power("c").unwrap().len(), 1);
        // Each queued request left its line in the machine's history.
        let history = store.events(Some("m1"), 0, 100).unwrap();
        assert_eq!(
            history
                .iter()
                .filter(|e| e.message.contains("asked of site"))
                .count(),
            3
        );
    }
}
