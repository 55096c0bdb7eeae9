//! The I/O half of an HA pair (`dhcp::ha` is the logic): each server holds a PostgreSQL
//! session lock of its own role while it runs, and looks once a second whether its
//! partner's is held. PostgreSQL frees a lock the moment its session ends (the partner
//! killed, its host or its link to the database gone), so a free lock is a partner gone.
//! Gone for the failover time, the survivor reads every lease back from the database and
//! answers everyone; the partner's lock held again, it answers its own clients only.
//!
//! A server cut off from the database loses its lock, and the writes of its leases fail,
//! so it withholds every ACK: it never leases on its own while the survivor serves all.

use std::time::{Duration, Instant, SystemTime};

use postgres::{Client, NoTls};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::ha::Role;
use super::journal::Record;
use super::journal::postgres::PgLeases;

/// What the link tells the socket loop.
#[derive(Debug)]
pub enum HaEvent {
    /// The partner has been gone for the failover time: every lease of the site, read back.
    PartnerDown(Vec<Record>),
    /// The partner is back.
    PartnerBack,
}

const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The session lock of `role` in site `site`'s pair.
fn lock_key(site: &str, role: Role) -> i64 {
    crate::store::named_lock(&format!("dhcp-ha/{site}/{}", role.as_str()))
}

/// Starts the link's thread; it stops when the receiver is dropped.
pub fn start(
    config: postgres::Config,
    site: String,
    role: Role,
    failover: Duration,
) -> std::io::Result<UnboundedReceiver<HaEvent>> {
    let (tx, rx) = unbounded_channel();
    std::thread::Builder::new()
        .name("dhcp-ha".into())
        .spawn(move || watch(&config, &site, role, failover, &tx))?;
    Ok(rx)
}

fn watch(
    config: &postgres::Config,
    site: &str,
    role: Role,
    failover: Duration,
    tx: &UnboundedSender<HaEvent>,
) {
    let (mine, theirs) = (lock_key(site, role), lock_key(site, role.partner()));
    let mut client: Option<Client> = None;
    let mut held = false;
    let mut gone_since: Option<Instant> = None;
    let mut down = false;
    let mut warned = false;
    // What the last check found of the partner (None: not looked yet), for the log.
    let mut seen: Option<bool> = None;
    let mut first = true;
    while !tx.is_closed() {
        if !std::mem::take(&mut first) {
            std::thread::sleep(CHECK_EVERY);
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            held = false;
            client = match config.connect(NoTls) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "DHCP HA: cannot reach PostgreSQL");
                    continue;
                }
            };
        }
        let Some(c) = client.as_mut() else { continue };
        let checked = (|| -> Result<bool, postgres::Error> {
            if !held {
                held = c
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&mine])?
                    .get(0);
                if !held && !warned {
                    warned = true;
                    tracing::error!(
                        role = role.as_str(),
                        "DHCP HA: another server holds this role's lock: two servers with one role?"
                    );
                }
            }
            // Taken, the partner's lock is free: let it go at once.
            let free: bool = c
                .query_one("SELECT pg_try_advisory_lock($1)", &[&theirs])?
                .get(0);
            if free {
                c.execute("SELECT pg_advisory_unlock($1)", &[&theirs])?;
            }
            Ok(!free)
        })();
        let partner_up = match checked {
            Ok(up) => up,
            Err(e) => {
                tracing::warn!(error = %e, "DHCP HA: lost the database session");
                client = None;
                continue;
            }
        };
        if seen.replace(partner_up) != Some(partner_up) {
            tracing::info!(
                role = role.as_str(),
                holds_own_lock = held,
                partner = if partner_up { "up" } else { "not seen" },
                "DHCP HA: partner checked"
            );
        }
        if partner_up {
            gone_since = None;
            if down {
                down = false;
                tracing::info!(
                    "DHCP HA: the partner is back: answering this server's clients only"
                );
                let _ = tx.send(HaEvent::PartnerBack);
            }
            continue;
        }
        let since = *gone_since.get_or_insert_with(Instant::now);
        if down || since.elapsed() < failover {
            continue;
        }
        match PgLeases::open(config.clone(), site, SystemTime::now()) {
            Ok((_, live)) => {
                down = true;
                tracing::warn!(
                    failover_s = failover.as_secs(),
                    leases = live.len(),
                    "DHCP HA: the partner is gone: answering every client"
                );
                let _ = tx.send(HaEvent::PartnerDown(live));
            }
            Err(e) => tracing::warn!(error = %e, "DHCP HA: cannot read the leases to take over"),
        }
    }
}
