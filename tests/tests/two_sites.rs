//! Two appliances on one PostgreSQL database, each serving its own provisioning network (a
//! lab namespace of its own, site `site-a` and site `site-b`), with a SeaBIOS VM behind an
//! `ipmi_sim` BMC on each. Both BMCs answer at 127.0.0.1:623 of their own namespace, as two
//! racks' BMC networks may use the same addresses: a power action done by the wrong
//! appliance would hit the wrong machine.
//!
//! - Both machines enlist through their own network; either appliance's CLI lists both,
//!   each with its site.
//! - Each is commissioned through the *other* appliance's CLI: the power-on is queued for
//!   the machine's site and done by its appliance, and both reach Ready.
//! - Both are deployed into memory, B's machine through A. Once both are powered on, A (on
//!   duty for the timeouts) is killed with SIGKILL: B takes the duty over, and every event
//!   A acknowledged before the kill is still there. A is started again, stands by, and
//!   serves its network's deploy to the end.
//! - While B's machine deploys, PostgreSQL restarts: the appliances reconnect and both
//!   machines reach Deployed.
//! - B's event stream (`/events/stream`, read by curl inside B's namespace) showed A's
//!   machine moving, through the kill and the restart.
//!
//! One VM per network, both running at once, proves all of it in one run.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use stork_lab::appliance::Shared;
use stork_lab::postgres::ScratchPostgres;
use stork_lab::{Appliance, Spawned, wait_for};
use stork_proto::DeployTarget;
use stork_proto::api::{Machine, Status};
use stork_tests::deploy::{IMAGE, Scenario, seabios};

const MAC_A: &str = "52:54:00:77:05:01";
const MAC_B: &str = "52:54:00:77:05:02";
const POLL: Duration = Duration::from_millis(500);

#[test]
#[ignore = "needs root, QEMU, ipmi_sim, PostgreSQL and built images: run `cargo xtask test`"]
fn two_sites_on_one_postgres_commission_and_deploy_through_a_kill_and_a_database_restart() {
    let mut pg = ScratchPostgres::start().expect("a scratch PostgreSQL");
    let keys = tempfile::tempdir().expect("a directory for the secrets key");
    let shared = Shared {
        url: pg.create_database("stork").expect("createdb"),
        key: keys.path().join("secrets.key"),
    };
    let spec = |mac| seabios(mac, 2 << 30);
    let mut a = Scenario::new_on("site-a", spec(MAC_A), None, Some((&shared, "site-a"))).unwrap();
    // A started first: it takes the timeouts.
    if let Err(e) = wait_log(&a.appliance, "on duty: this appliance runs the timeouts") {
        a.fail(e);
    }
    let mut b = Scenario::new_on("site-b", spec(MAC_B), None, Some((&shared, "site-b"))).unwrap();
    let result = run(&mut a, &mut b, &mut pg);
    if let Err(e) = result {
        let other = b.report();
        a.fail(e.context(format!("=== site B ===\n{other}\n=== site A ===")));
    }
    eprintln!("phases, site A:\n{}", a.timings());
    eprintln!("phases, site B:\n{}", b.timings());
}

fn run(a: &mut Scenario, b: &mut Scenario, pg: &mut ScratchPostgres) -> Result<()> {
    if !b
        .appliance
        .logs()
        .contains("standing by: another appliance runs the timeouts")
    {
        wait_log(
            &b.appliance,
            "standing by: another appliance runs the timeouts",
        )?;
    }
    let stream = follow_events(b)?;

    // Enlisted through their own networks, at once.
    let (id_a, id_b) = both(a, b, |s| s.add_and_enlist())?;
    for (via, id, site) in [
        (&a.appliance, &id_b, "site-b"),
        (&b.appliance, &id_a, "site-a"),
    ] {
        let m = via.machine(id)?;
        if m.site.as_deref() != Some(site) || m.inventory.is_none() {
            bail!(
                "the other appliance shows {id} with site {:?}, inventory {}",
                m.site,
                m.inventory.is_some()
            );
        }
    }
    a.say("both enlisted; each appliance lists the other's machine with its site");

    // Commissioned through the other appliance: the power-on goes to the machine's site.
    b.appliance.cli(&["machine", "commission", &id_a])?;
    a.appliance.cli(&["machine", "commission", &id_b])?;
    both(a, b, |s| {
        let id = s.id.clone().context("no machine id")?;
        s.phase_start();
        s.wait_status(
            &id,
            Status::Ready,
            &[Status::Commissioning],
            Duration::from_secs(600),
        )?;
        s.wait_off("the power-off after commissioning", Duration::from_secs(90))?;
        s.phase_done("commission through the other site (to Ready, off)");
        s.appliance.wait_events(
            &id,
            &[
                "netboot_and_power_on asked of site",
                "NetbootAndPowerOn done",
            ],
            Duration::from_secs(30),
        )?;
        // Done by the machine's own site's appliance.
        let site = s.status(&id)?.site.context("no site")?;
        let by = format!("controller@{site}");
        if !s
            .appliance
            .events(&id)?
            .iter()
            .any(|e| e.actor == by && e.message.starts_with("power: NetbootAndPowerOn done"))
        {
            bail!("the commissioning's power-on was not done by {by}");
        }
        Ok(())
    })?;

    // Deployed into memory: A's machine through A, B's through A.
    a.appliance.cli(&["machine", "allocate", &id_b])?;
    b.phase_start();
    a.appliance.cli(&[
        "machine",
        "deploy",
        &id_b,
        "--image",
        IMAGE,
        "--target",
        "memory",
        "--hostname",
        "site-b-1",
    ])?;
    a.deploy(&id_a, DeployTarget::Memory, "site-a-1")?;
    wait_for(
        "B to power its machine on",
        Duration::from_secs(60),
        POLL,
        || Ok(b.machine.qemu_pid()),
    )?;

    // A dies while its machine deploys: B takes the timeouts over, and nothing A
    // acknowledged is lost.
    let acknowledged = a.appliance.events(&id_a)?;
    a.appliance.kill()?;
    a.say("killed appliance A (SIGKILL) while its machine deploys");
    wait_log(&b.appliance, "on duty: this appliance runs the timeouts")?;
    let seen = b.appliance.events(&id_a)?;
    let missing: Vec<_> = acknowledged
        .iter()
        .filter(|e| !seen.iter().any(|s| s.id == e.id && s.message == e.message))
        .collect();
    if !missing.is_empty() {
        bail!("events A acknowledged before the kill are gone: {missing:#?}");
    }
    if b.appliance.machine(&id_a)?.status != Status::Deploying {
        bail!("after the kill B does not show A's machine deploying");
    }
    a.say(&format!(
        "B is on duty; all {} events of A's machine from before the kill are there",
        acknowledged.len()
    ));
    a.appliance.restart()?;
    wait_log(
        &a.appliance,
        "standing by: another appliance runs the timeouts",
    )?;

    // PostgreSQL restarts while B's machine deploys (its agent is reporting).
    wait_for(
        "B's agent to send a heartbeat",
        Duration::from_secs(600),
        POLL,
        || {
            let m = b.status(&id_b)?;
            if m.status != Status::Deploying {
                bail!(
                    "status {} ({:?}) before the agent reported",
                    m.status,
                    m.status_message
                );
            }
            // A heartbeat of this boot: the commissioning agent's last one is still recorded.
            Ok(m.last_heartbeat.filter(|t| *t > m.status_since).map(|_| ()))
        },
    )?;
    pg.restart()?;
    b.say("restarted PostgreSQL while B's machine deploys");

    both(a, b, |s| {
        let id = s.id.clone().context("no machine id")?;
        s.wait_status(
            &id,
            Status::Deployed,
            &[Status::Deploying],
            Duration::from_secs(900),
        )?;
        s.phase_done("deploy in memory (to phone-home), through the kill and the restart");
        Ok(())
    })?;
    for (via, id) in [(&a.appliance, &id_b), (&b.appliance, &id_a)] {
        let m: Machine = via.machine(id)?;
        if m.status != Status::Deployed {
            bail!("the other appliance shows {id} as {}", m.status);
        }
    }

    // B's stream followed A's machine all along.
    let moved = format!("\"machine_id\":\"{id_a}\"");
    wait_for(
        "B's event stream to show A's machine deployed",
        Duration::from_secs(30),
        POLL,
        || {
            let text = std::fs::read_to_string(stream.log())?;
            let lines: Vec<&str> = text.lines().filter(|l| l.contains(&moved)).collect();
            let has = |what: &str| lines.iter().any(|l| l.contains(what));
            Ok((has("commissioning -> ready") && has("deploying -> deployed")).then_some(()))
        },
    )
    .with_context(|| {
        format!(
            "B's stream lacks A's machine's moves; see {}",
            stream.log().display()
        )
    })?;
    a.say("B's event stream showed A's machine commissioned and deployed");
    Ok(())
}

/// Runs `f` on both scenarios at once (each on a thread of its own); both results.
fn both<T: Send>(
    a: &mut Scenario,
    b: &mut Scenario,
    f: impl Fn(&mut Scenario) -> Result<T> + Sync,
) -> Result<(T, T)> {
    std::thread::scope(|scope| {
        let ta = scope.spawn(|| f(a));
        let rb = f(b).context("site B");
        let ra = ta
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("site A's thread panicked")))
            .context("site A");
        Ok((ra?, rb?))
    })
}

/// Waits until the appliance's log (every start's) holds `text`.
fn wait_log(appliance: &Appliance, text: &str) -> Result<()> {
    wait_for(
        &format!("{text:?} in the log"),
        Duration::from_secs(60),
        Duration::from_millis(200),
        || Ok(appliance.logs().contains(text).then_some(())),
    )
}

/// curl inside B's namespace following B's `/events/stream` from the start, verifying
/// the appliance's certificate; its output is the returned process's log.
fn follow_events(b: &Scenario) -> Result<Spawned> {
    let dir = b.lab.dir();
    let header = dir.join("stream-auth");
    std::fs::write(
        &header,
        format!("Authorization: Bearer {}\n", b.appliance.token),
    )?;
    let cert = b.appliance.data_dir.join("tls/cert.pem");
    let mut cmd = b.lab.command("curl");
    cmd.args(["-sS", "-N", "--cacert"])
        .arg(&cert)
        .arg("-H")
        .arg(format!("@{}", path_str(&header)?))
        .arg(format!(
            "https://{}:8443/api/v1/events/stream",
            stork_lab::APPLIANCE_IP
        ));
    Spawned::start("curl", cmd, &dir.join("stream.log"))
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}
