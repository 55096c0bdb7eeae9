//! The leases of an HA pair, in the shared PostgreSQL database (`dhcp_leases`), written the
//! way the file journal is: each group of records in one transaction, acknowledged by its
//! commit before the replies that depend on it leave (PostgreSQL's default
//! `synchronous_commit = on`: the commit is on the server's disk).
//!
//! A bound lease is written only if the address is free in the database: held by the same
//! client, by nobody, or by a lease that has expired. Otherwise the record is a
//! [`Conflict`]: its reply is withheld, and the server learns who holds the address. So
//! the database, not either server's memory, decides who holds an address.

use std::net::Ipv4Addr;
use std::time::SystemTime;

use postgres::{Client, NoTls, Statement};
use stork_proto::MacAddr;

use super::{JournalError, Record, unix_secs};

/// What a refused record ran into: the record that holds the address now (a binding of
/// another client, or a probation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict {
    /// The refused record's index in the batch.
    pub index: usize,
    pub holder: Record,
}

/// Expired rows are swept after this many appends.
const SWEEP_EVERY: u64 = 1000;

pub struct PgLeases {
    config: postgres::Config,
    site: String,
    conn: Option<Conn>,
    appends: u64,
}

/// A connection and the statements prepared on it once, for every append after.
struct Conn {
    client: Client,
    st: Statements,
}

struct Statements {
    bind: Statement,
    holder: Statement,
    release: Statement,
    probation: Statement,
}

impl Statements {
    fn prepare(c: &mut Client) -> Result<Self, postgres::Error> {
        Ok(Self {
            // One round trip per binding: written if free, and then the client's lease on
            // another address (it moved) ends.
            bind: c.prepare(
                "WITH bound AS (
                     INSERT INTO dhcp_leases (site, ip, mac, expires, kind)
                     VALUES ($1, $2, $3, $4, 'bound')
                     ON CONFLICT (site, ip) DO UPDATE
                     SET mac = excluded.mac, expires = excluded.expires, kind = 'bound'
                     WHERE dhcp_leases.mac = excluded.mac OR dhcp_leases.expires <= $5
                     RETURNING ip),
                 moved AS (
                     DELETE FROM dhcp_leases
                     WHERE site = $1 AND mac = $3 AND ip <> $2 AND kind = 'bound'
                       AND EXISTS (SELECT 1 FROM bound))
                 SELECT 1 FROM bound",
            )?,
            holder: c.prepare(
                "SELECT mac, expires, kind FROM dhcp_leases WHERE site = $1 AND ip = $2",
            )?,
            release: c
                .prepare("DELETE FROM dhcp_leases WHERE site = $1 AND ip = $2 AND mac = $3")?,
            probation: c.prepare(
                "INSERT INTO dhcp_leases (site, ip, mac, expires, kind)
                 VALUES ($1, $2, '', $3, 'probation')
                 ON CONFLICT (site, ip) DO UPDATE
                 SET mac = '', expires = excluded.expires, kind = 'probation'",
            )?,
        })
    }
}

impl PgLeases {
    /// Connects, and reads every live lease and probation of `site`.
    pub fn open(
        config: postgres::Config,
        site: &str,
        now: SystemTime,
    ) -> Result<(Self, Vec<Record>), JournalError> {
        let mut me = Self {
            config,
            site: site.to_string(),
            conn: None,
            appends: 0,
        };
        let live = me.load(now)?;
        tracing::info!(
            site,
            live = live.len(),
            "DHCP leases read from the database"
        );
        Ok((me, live))
    }

    fn conn(&mut self) -> Result<&mut Conn, JournalError> {
        if self.conn.as_ref().is_none_or(|c| c.client.is_closed()) {
            self.conn = None;
            let mut client = self.config.connect(NoTls)?;
            let st = Statements::prepare(&mut client)?;
            self.conn = Some(Conn { client, st });
        }
        self.conn
            .as_mut()
            .ok_or_else(|| JournalError::Database("no connection".into()))
    }

    /// Every live lease and probation of the site, as records (oldest expiry first, so a
    /// client's newest lease is applied last).
    pub fn load(&mut self, now: SystemTime) -> Result<Vec<Record>, JournalError> {
        let site = self.site.clone();
        let now = to_i64(unix_secs(now));
        let rows = self.guard(|c| {
            c.client.query(
                "SELECT ip, mac, expires, kind FROM dhcp_leases
                 WHERE site = $1 AND expires > $2 ORDER BY expires, ip",
                &[&site, &now],
            )
        })?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let ip = Ipv4Addr::from(u32::try_from(r.get::<_, i64>(0)).ok()?);
                let expires = u64::try_from(r.get::<_, i64>(2)).ok()?;
                row_record(ip, r.get(1), expires, r.get(3))
            })
            .collect())
    }

    /// Writes `records` in one transaction; returns the bindings refused, with who holds
    /// their addresses.
    pub fn append(
        &mut self,
        records: &[Record],
        now: SystemTime,
    ) -> Result<Vec<Conflict>, JournalError> {
        let site = self.site.clone();
        let now = to_i64(unix_secs(now));
        let sweep = self.appends.is_multiple_of(SWEEP_EVERY);
        self.appends += 1;
        self.guard(|c| {
            let Conn { client, st } = c;
            let mut tx = client.transaction()?;
            let mut conflicts = Vec::new();
            for (index, r) in records.iter().enumerate() {
                let ip = i64::from(u32::from(r.ip()));
                match *r {
                    Record::Bound { mac, expires, .. } => {
                        let mac_text = mac.to_string();
                        let written = tx
                            .query_opt(&st.bind, &[&site, &ip, &mac_text, &to_i64(expires), &now])?
                            .is_some();
                        if !written && let Some(row) = tx.query_opt(&st.holder, &[&site, &ip])? {
                            let until = u64::try_from(row.get::<_, i64>(1)).unwrap_or(0);
                            if let Some(holder) = row_record(r.ip(), row.get(0), until, row.get(2))
                            {
                                conflicts.push(Conflict { index, holder });
                            }
                        }
                    }
                    Record::Released { mac, .. } => {
                        tx.execute(&st.release, &[&site, &ip, &mac.to_string()])?;
                    }
                    Record::Probation { until, .. } => {
                        tx.execute(&st.probation, &[&site, &ip, &to_i64(until)])?;
                    }
                }
            }
            if sweep {
                tx.execute(
                    "DELETE FROM dhcp_leases WHERE site = $1 AND expires <= $2",
                    &[&site, &now],
                )?;
            }
            tx.commit()?;
            Ok(conflicts)
        })
    }

    /// Runs `f` on the connection; a failure drops the connection, so the next call makes
    /// a new one (after a PostgreSQL restart).
    fn guard<T>(
        &mut self,
        f: impl FnOnce(&mut Conn) -> Result<T, postgres::Error>,
    ) -> Result<T, JournalError> {
        let result = f(self.conn()?);
        if result.is_err() {
            self.conn = None;
        }
        Ok(result?)
    }
}

/// A stored row as the record that rebuilds it.
fn row_record(ip: Ipv4Addr, mac: String, expires: u64, kind: String) -> Option<Record> {
    match kind.as_str() {
        "bound" => Some(Record::Bound {
            mac: mac.parse::<MacAddr>().ok()?,
            ip,
            expires,
        }),
        "probation" => Some(Record::Probation { ip, until: expires }),
        _ => None,
    }
}

fn to_i64(secs: u64) -> i64 {
    i64::try_from(secs).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn mac(n: u8) -> MacAddr {
        MacAddr([0x52, 0x54, 0, 0, 0, n])
    }
    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, n)
    }
    fn bound(m: u8, i: u8, expires: u64) -> Record {
        Record::Bound {
            mac: mac(m),
            ip: ip(i),
            expires,
        }
    }
    const NOW: u64 = 1_000_000;

    /// The database decides: an address another client holds is refused (with who holds
    /// it), a freed or expired one is not, a moved client's old address is freed, a
    /// probation blocks, and each site has its own rows.
    #[test]
    fn the_database_refuses_an_address_another_client_holds() {
        let pg = stork_lab::postgres::ScratchPostgres::start().unwrap();
        let url = pg.create_database("leases").unwrap();
        let keys = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open_postgres(&url, &keys.path().join("k")).unwrap();
        let config = store.postgres_config().unwrap();
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(NOW);
        let (mut a, live) = PgLeases::open(config.clone(), "pair", at).unwrap();
        assert!(live.is_empty());
        let (mut b, _) = PgLeases::open(config.clone(), "pair", at).unwrap();
        let (mut other_site, _) = PgLeases::open(config.clone(), "elsewhere", at).unwrap();

        assert!(a.append(&[bound(1, 100, NOW + 60)], at).unwrap().is_empty());
        // The other server of the pair, same address, another client: refused.
        let refused = b
            .append(&[bound(2, 101, NOW + 60), bound(3, 100, NOW + 60)], at)
            .unwrap();
        assert_eq!(
            refused,
            [Conflict {
                index: 1,
                holder: bound(1, 100, NOW + 60)
            }]
        );
        // Another site's pool is its own.
        assert!(
            other_site
                .append(&[bound(3, 100, NOW + 60)], at)
                .unwrap()
                .is_empty()
        );
        // The holder renews (its own row), then moves: its old address is free.
        assert!(
            b.append(&[bound(1, 100, NOW + 120)], at)
                .unwrap()
                .is_empty()
        );
        assert!(
            a.append(&[bound(1, 102, NOW + 120)], at)
                .unwrap()
                .is_empty()
        );
        assert!(b.append(&[bound(3, 100, NOW + 60)], at).unwrap().is_empty());
        // Released: free.
        a.append(
            &[Record::Released {
                mac: mac(3),
                ip: ip(100),
            }],
            at,
        )
        .unwrap();
        // Declined: on probation, refused to anyone until it ends.
        let until = NOW + 600;
        a.append(&[Record::Probation { ip: ip(100), until }], at)
            .unwrap();
        let refused = b.append(&[bound(4, 100, NOW + 60)], at).unwrap();
        assert_eq!(refused[0].holder, Record::Probation { ip: ip(100), until });
        // Expired: free again.
        let later = SystemTime::UNIX_EPOCH + Duration::from_secs(until + 1);
        assert!(
            b.append(&[bound(4, 100, until + 60)], later)
                .unwrap()
                .is_empty()
        );

        let mut live = b.load(at).unwrap();
        live.sort_by_key(|r| r.ip());
        assert_eq!(
            live,
            [
                bound(4, 100, until + 60),
                bound(2, 101, NOW + 60),
                bound(1, 102, NOW + 120)
            ]
        );
    }
}
