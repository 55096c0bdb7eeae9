//! Which appliance runs the periodic duties (busy-status timeouts, heartbeat deadlines,
//! power polls, finishing interrupted releases) when several share one database: exactly
//! one at a time, and another as soon as it is gone.
//!
//! On PostgreSQL the duty is a session advisory lock, held on a connection of its own: the
//! server frees it the moment that session ends (the appliance killed, its host cut off),
//! and the next appliance to ask takes it. On SQLite the one appliance always has it.

use std::time::Duration;

use super::sql::PgConn;

/// The advisory lock key of the duties ("stork" and 0x0d, apart from the migration lock).
const DUTY_LOCK: i64 = 0x7374_6f72_6b0d;

/// This appliance's hold on the duties.
pub struct Duty(Hold);

enum Hold {
    Always,
    Postgres(Box<PgHold>),
}

struct PgHold {
    config: postgres::Config,
    key: i64,
    conn: Option<PgConn>,
    held: bool,
}

impl Duty {
    pub(super) fn always() -> Self {
        Duty(Hold::Always)
    }

    /// The duties of every appliance: the timeouts.
    pub(super) fn postgres(config: postgres::Config) -> Self {
        Self::postgres_keyed(config, DUTY_LOCK)
    }

    /// The duties of the appliances of one site (its power polls): a lock of its own,
    /// keyed by the site's name.
    pub(super) fn postgres_site(config: postgres::Config, site: &str) -> Self {
        Self::postgres_keyed(config, named_lock(&format!("site/{site}")))
    }

    fn postgres_keyed(mut config: postgres::Config, key: i64) -> Self {
        // A dead server is noticed by the keepalive as well as by the next check.
        config.keepalives_idle(Duration::from_secs(10));
        Duty(Hold::Postgres(Box::new(PgHold {
            config,
            key,
            conn: None,
            held: false,
        })))
    }

    /// Whether this appliance has the duties now: keeps the lock it has (after checking
    /// its session is alive) or tries to take it. Blocking: run it on the blocking pool.
    pub fn held(&mut self) -> bool {
        let Hold::Postgres(hold) = &mut self.0 else {
            return true;
        };
        let PgHold {
            config,
            key,
            conn,
            held,
        } = &mut **hold;
        if let Some(c) = conn
            && (c.client.is_closed() || c.client.simple_query("").is_err())
        {
            // The session is gone, and the lock with it.
            *conn = None;
            *held = false;
        }
        if conn.is_none() {
            match config.connect(postgres::NoTls) {
                Ok(client) => *conn = Some(PgConn::new(client)),
                Err(e) => {
                    tracing::warn!(error = %e, "duty lock: cannot reach PostgreSQL");
                    return false;
                }
            }
        }
        if !*held && let Some(c) = conn {
            match c
                .client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&*key])
            {
                Ok(row) => *held = row.get(0),
                Err(e) => {
                    tracing::warn!(error = %e, "duty lock: cannot ask PostgreSQL");
                    *conn = None;
                }
            }
        }
        *held
    }
}

/// The advisory lock key of `name` (`site/rack-a`, `dhcp-ha/rack-a/first`): FNV-1a of
/// the name, with the top byte set apart from the duty and migration keys (whose top bytes
/// are zero).
pub fn named_lock(name: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Top byte 0x53 ("S"): never a key with a zero top byte.
    i64::from_be_bytes(((h & 0x00ff_ffff_ffff_ffff) | 0x5300_0000_0000_0000).to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_locks_differ_by_site_and_from_the_duty_lock() {
        assert_ne!(named_lock("site/rack-a"), named_lock("site/rack-b"));
        assert_eq!(named_lock("site/rack-a"), named_lock("site/rack-a"));
        assert_ne!(named_lock(""), DUTY_LOCK);
    }
}
