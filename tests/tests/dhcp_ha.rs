//! An HA pair on one network: two appliances (site `pair`, roles first and second) on the
//! lab's bridge share one pool, their leases in a scratch PostgreSQL. busybox udhcpc
//! clients run on hosts of their own, renewing all along.
//!
//! - Both answering: each client gets its lease from the server its MAC hashes to, each
//!   server hands out its own share of the addresses (first: even, second: odd).
//! - The first is killed (SIGKILL) while clients renew and new ones arrive: after the
//!   failover time the second answers everyone. Every old client keeps its address (its
//!   rebinding answered by the survivor, which read the partner's leases back from the
//!   database), every new client gets one.
//! - No address is leased twice: not among the clients, not in either server's view of the
//!   leases (the first's after it restarted and read them back), not in the database.

mod dhcp_common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use dhcp_common::{client_script, parse_lease, run_ok};
use stork_lab::appliance::Shared;
use stork_lab::postgres::ScratchPostgres;
use stork_lab::{Appliance, Host, Lab, Spawned, wait_for};
use stork_proto::api::DhcpLease;
use stork_tests::{boot_files, lab_dir, stork_bin};

const FIRST: &str = "10.77.0.1";
const SECOND: &str = "10.77.0.2";
/// Clients there from the start, and clients that arrive after the kill.
const OLD: u8 = 6;
const NEW: u8 = 2;

fn config(role: &str) -> String {
    format!(
        "site = \"pair\"\n\
         [dhcp]\nrange = [\"10.77.0.100\", \"10.77.0.139\"]\nlease_time = 60\n\
         [dhcp.ha]\nrole = \"{role}\"\nfailover = 3\n"
    )
}

#[test]
#[ignore = "needs root, busybox and PostgreSQL: run `cargo xtask test`"]
fn an_ha_pair_shares_one_pool_and_the_survivor_serves_every_client_with_no_address_twice() {
    let pg = ScratchPostgres::start().expect("a scratch PostgreSQL");
    let keys = tempfile::tempdir().expect("a directory for the secrets key");
    let shared = Shared {
        url: pg.create_database("stork").expect("createdb"),
        key: keys.path().join("secrets.key"),
    };
    let mut lab = Lab::new("dhcp_ha", &lab_dir()).unwrap();
    let result = run(&mut lab, &shared);
    if let Err(e) = result {
        lab.keep_dir();
        panic!("{e:#}\n(logs kept in {})", lab.dir().display());
    }
}

struct Pair {
    first: Appliance,
    second: Appliance,
}

fn run(lab: &mut Lab, shared: &Shared) -> Result<()> {
    let (bin, boot) = (stork_bin(), boot_files());
    let conf = |role: &str| -> Result<String> {
        let path = lab.dir().join(format!("{role}.toml"));
        std::fs::write(&path, config(role))?;
        Ok(path.display().to_string())
    };
    let (conf_first, conf_second) = (conf("first")?, conf("second")?);
    let first = Appliance::start_on(lab, &bin, &boot, Some(shared), &["--config", &conf_first])?;
    let b = lab.add_host_at("second", &format!("{SECOND}/24"))?;
    let second = Appliance::start_at(
        lab,
        &b.netns,
        "second",
        &bin,
        &boot,
        Some(shared),
        &[
            "--config",
            &conf_second,
            "--interface",
            "eth0",
            "--address",
            SECOND,
        ],
    )?;
    let mut pair = Pair { first, second };
    let outcome = serve(lab, &mut pair);
    outcome.with_context(|| {
        format!(
            "--- first (last 30 lines) ---\n{}\n--- second (last 30 lines) ---\n{}",
            pair.first.log_tail(30),
            pair.second.log_tail(30)
        )
    })
}

fn serve(lab: &mut Lab, pair: &mut Pair) -> Result<()> {
    // Each holds its role's lock and sees the other's.
    for a in [&pair.first, &pair.second] {
        wait_for(
            "both servers of the pair to see each other",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                let log = a.logs();
                Ok(log
                    .lines()
                    .any(|l| l.contains("DHCP HA: partner checked") && l.contains("partner=\"up\""))
                    .then_some(()))
            },
        )?;
    }
    let script = client_script(lab);
    let mut clients = Vec::new();
    for n in 1..=OLD {
        clients.push(Client::start(lab, n, &script)?);
    }
    // Both answering: each from the server its MAC hashes to, from that server's share.
    let mut leased = BTreeMap::new();
    for c in &clients {
        let (ip, server) = c.wait_lease(1)?;
        let last: u8 = ip.rsplit('.').next().unwrap_or_default().parse()?;
        let want = if server == FIRST { 0 } else { 1 };
        if last % 2 != want {
            bail!("{} got {ip} from {server}: not that server's share", c.mac);
        }
        leased.insert(c.mac.clone(), (ip, server));
    }
    let by_first = leased.values().filter(|(_, s)| s == FIRST).count();
    if by_first == 0 || by_first == leased.len() {
        bail!("one server answered every client: {leased:?}");
    }
    eprintln!("both answering: {leased:?}");

    // The first dies; new clients arrive while the old ones renew.
    let before: Vec<usize> = clients.iter().map(Client::leases).collect::<Result<_>>()?;
    pair.first.kill()?;
    for n in OLD + 1..=OLD + NEW {
        clients.push(Client::start(lab, n, &script)?);
    }
    wait_for(
        "the second to take over",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            Ok(pair
                .second
                .logs()
                .contains("the partner is gone")
                .then_some(()))
        },
    )?;
    // Every old client of the first rebinds with the second and keeps its address (lease
    // 60 s: renewing from 30 s, unicast to the dead server; rebinding, broadcast, from
    // 52.5 s), every new one gets an address. (udhcpc names the server it first got the
    // lease from on every renewal, whoever answered: the first is dead, so the second did.)
    for (i, c) in clients.iter().enumerate() {
        let had = before.get(i).copied().unwrap_or(0);
        let ip = wait_for(
            &format!("{} to hold a lease granted after the kill", c.mac),
            Duration::from_secs(120),
            Duration::from_millis(500),
            || {
                let log = std::fs::read_to_string(c.process.log())?;
                let n = log.matches("obtained from").count();
                Ok(parse_lease(&log).filter(|_| n > had).map(|(ip, _)| ip))
            },
        )?;
        if let Some((want, _)) = leased.get(&c.mac)
            && *want != ip
        {
            bail!("{} held {want} and now holds {ip}", c.mac);
        }
    }
    eprintln!("after the kill every client holds an address from the second");

    // No address twice: the clients' own, the second's view, the first's after a restart.
    let mut holders: HashMap<String, String> = HashMap::new();
    for c in &clients {
        let (ip, _) = c.wait_lease(1)?;
        if let Some(other) = holders.insert(ip.clone(), c.mac.clone()) {
            bail!("{ip} is held by {other} and {}", c.mac);
        }
    }
    pair.first.restart()?;
    for (who, a) in [("second", &pair.second), ("first", &pair.first)] {
        let view: Vec<DhcpLease> = a.cli_json(&["leases", "--json"])?;
        for l in &view {
            if let Some(client) = holders.get(&l.ip.to_string())
                && *client != l.mac.to_string()
            {
                bail!(
                    "the {who}'s view has {} on {}, which client {client} holds",
                    l.ip,
                    l.mac
                );
            }
        }
        let mine: Vec<&DhcpLease> = view
            .iter()
            .filter(|l| l.mac.to_string().starts_with("52:54:00:aa"))
            .collect();
        if mine.len() != clients.len() {
            bail!(
                "the {who}'s view has {} of the {} clients' leases: {view:?}",
                mine.len(),
                clients.len()
            );
        }
    }
    eprintln!("no address twice: clients, the second's view, the first's after its restart");
    Ok(())
}

/// A busybox udhcpc on a host of its own, with a MAC the test chose, running (and
/// renewing) until dropped.
struct Client {
    mac: String,
    process: Spawned,
    _host: Host,
}

impl Client {
    fn start(lab: &mut Lab, n: u8, script: &std::path::Path) -> Result<Self> {
        let host = lab.add_host(&format!("c{n}"))?;
        let mac = format!("52:54:00:aa:00:{n:02x}");
        run_ok(
            host.command("ip")
                .args(["link", "set", "eth0", "address", &mac]),
        );
        let mut cmd = host.command("busybox");
        cmd.args([
            "udhcpc", "-i", "eth0", "-f", "-t", "10", "-T", "1", "-A", "1", "-s",
        ])
        .arg(script);
        let process = Spawned::start("udhcpc", cmd, &lab.dir().join(format!("udhcpc-{n}.log")))?;
        Ok(Self {
            mac,
            process,
            _host: host,
        })
    }

    /// How many leases (grants and renewals) it has been given so far.
    fn leases(&self) -> Result<usize> {
        Ok(std::fs::read_to_string(self.process.log())?
            .matches("obtained from")
            .count())
    }

    /// The newest lease once there are `count`: (address, server).
    fn wait_lease(&self, count: usize) -> Result<(String, String)> {
        wait_for(
            &format!("{} to get a lease", self.mac),
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                let log = std::fs::read_to_string(self.process.log())?;
                Ok((log.matches("obtained from").count() >= count)
                    .then(|| parse_lease(&log))
                    .flatten())
            },
        )
    }
}
