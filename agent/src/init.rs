//! The agent's life as PID 1: each step in order, any failure shown and reported, then power-off.
//!
//! Stage 1 runs from the initrd; when the command line names an ephemeral root it hands over
//! to stage 2 inside it ([`crate::stage`]), which skips what stage 1 already did (mounts,
//! modules, the NIC's address) and runs the task.

use std::fs;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use stork_proto::cmdline::AgentArgs;
use stork_proto::{AgentReport, EnlistRequest, Inventory};

use crate::appliance::ApplianceClient;
use crate::console::{self, say};
use crate::net::{self, Control};
use crate::stage::{self, Stage};
use crate::step::{Failed, Step, at};
use crate::task::{Deployment, Ending, commission, disk, erase, memory};
use crate::{inventory, modules, mounts, power};

const CLASS_NET: &str = "/sys/class/net";
const NIC_TIMEOUT: Duration = Duration::from_secs(30);
const CARRIER_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(100);
/// Console lines sent with a failure report.
const FAILURE_TAIL_LINES: usize = 15;

/// Runs the agent as init. Never returns.
pub fn run(stage: Stage) -> ! {
    power::install_panic_hook();
    if let Stage::Two { .. } = stage {
        // First, so that stage 1's lines stay older than anything stage 2 prints.
        let kept = console::restore(Path::new(stage::CONSOLE_LOG));
        match kept {
            Ok(n) => console::line(&format!("stage 2: {n} console lines kept from stage 1")),
            Err(e) => console::line(&format!("stage 2: stage 1's console lines lost: {e:#}")),
        }
    }
    // Set once the network is up, so a later failure can be reported.
    let mut reporter = None;
    match steps(stage, &mut reporter) {
        Ok(Ending::PowerOff) => {
            nix::unistd::sync();
            console::line("done, powering off");
            power::off()
        }
        Ok(Ending::Reboot) => {
            console::line("done, rebooting");
            power::restart()
        }
        Err(Failed { step, error }) => {
            console::line(&format!("FAILED at {step}: {error:#}"));
            if let Some((client, boot_mac)) = &reporter {
                report_failure(client, *boot_mac, step, &error);
            }
            power::off_after_failure()
        }
    }
}

fn report_failure(
    client: &ApplianceClient,
    boot_mac: stork_proto::MacAddr,
    step: Step,
    error: &anyhow::Error,
) {
    let report = AgentReport {
        boot_mac,
        step: step.clone(),
        ok: false,
        message: format!("{error:#}"),
    };
    let sent = if client.is_known() {
        client.event(&stork_proto::AgentEvent {
            step: report.step.clone(),
            state: stork_proto::StepState::Failed,
            message: report.message.clone(),
            progress: None,
            log_tail: Some(console::tail(FAILURE_TAIL_LINES)),
        })
    } else {
        client.report(&report)
    };
    match sent {
        Ok(()) => say!("report", "failure reported to the appliance"),
        Err(e) => say!("report", "warning: could not report the failure: {e:#}"),
    }
}

fn steps(
    stage: Stage,
    reporter: &mut Option<(ApplianceClient, stork_proto::MacAddr)>,
) -> Result<Ending, Failed> {
    let args = match stage {
        Stage::One => {
            at(Step::Mount, mount())?;
            at(Step::LoadModules, load_modules())?;
            let args = at(Step::Cmdline, cmdline())?;
            at(Step::Network, network(&args))?;
            *reporter = Some((client_for(&args), args.boot_mac));
            args
        }
        Stage::Two { .. } => {
            // /proc and the NIC came over from stage 1: the reporter first, so that any
            // failure from here on is reported, not left to the heartbeat deadline.
            let args = at(Step::Cmdline, cmdline())?;
            *reporter = Some((client_for(&args), args.boot_mac));
            at(Step::Mount, mount())?;
            // The ephemeral root has no modules; stage 1 loaded the initrd's.
            say!(Step::LoadModules, "done by stage 1");
            at(Step::Network, network_kept(&args))?;
            args
        }
    };
    let (client, _) = reporter.get_or_insert_with(|| (client_for(&args), args.boot_mac));
    crate::heartbeat::start(client);
    match (stage, &args.ephemeral) {
        (Stage::One, Some(eph)) => {
            let started = stage::uptime();
            let root = at(Step::Ephemeral, stage::prepare(client, eph))?;
            // Returns only if the switch or the exec failed.
            return Err(Failed {
                step: Step::SwitchRoot,
                error: stage::enter(client, &root, started),
            });
        }
        // The appliance names a root only for tasks that need its tools.
        (Stage::One, None) if client.is_known() => client.step_event(
            Step::Ephemeral,
            stork_proto::StepState::Done,
            "not needed: the task runs from the initrd".into(),
        ),
        (Stage::One, None) => say!(
            Step::Ephemeral,
            "none on the command line; running the task from the initrd"
        ),
        (Stage::Two { fetch_started }, _) => stage::arrived(client, fetch_started),
    }
    if !client.is_known() {
        let inv = inventory::collect_and_show();
        return at(Step::Enlist, enlist(client, &args, inv)).map(|()| Ending::PowerOff);
    }
    let task = at(Step::Task, client.task())?;
    // A summary: user-data and keys are the user's business, not the console's.
    say!(Step::Task, "{}", describe(&task));
    match task {
        stork_proto::Task::Commission { scripts } => commission::run(client, &scripts),
        stork_proto::Task::Deploy(t) => {
            let cx = Deployment::new(client, &args, &t)?;
            match t.target {
                stork_proto::DeployTarget::Disk => disk::run(&cx),
                stork_proto::DeployTarget::Memory => memory::run(&cx),
            }
        }
        stork_proto::Task::Erase { quick } => erase::run(client, quick),
        stork_proto::Task::PowerOff => Ok(Ending::PowerOff),
    }
}

/// The appliance's client, with this boot's identity when the machine is known.
fn client_for(args: &AgentArgs) -> ApplianceClient {
    let client = ApplianceClient::new(&args.url);
    let client = match &args.api {
        Some(api) => client.with_tls(api),
        None => client,
    };
    match (&args.machine_id, &args.token) {
        (Some(id), Some(token)) => client.with_identity(id, token),
        _ => client,
    }
}

fn describe(task: &stork_proto::Task) -> String {
    match task {
        stork_proto::Task::Deploy(t) => format!(
            "deploy to {} as {:?}{}, {} SSH keys, user-data {}, image files: {}",
            t.target,
            t.hostname,
            t.disk
                .as_deref()
                .map_or_else(String::new, |d| format!(" on {d}")),
            t.ssh_keys.len(),
            if t.user_data.is_some() { "yes" } else { "no" },
            t.image
                .iter()
                .map(|f| format!("{} {}", f.role, f.url))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        stork_proto::Task::Commission { scripts } if !scripts.is_empty() => format!(
            "commission, after {} script(s): {}",
            scripts.len(),
            scripts
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => format!("{other:?}"),
    }
}

fn mount() -> Result<()> {
    let done = mounts::mount_all()?;
    // Best effort: without a console there is nobody to tell about this failing either.
    match console::reattach_if_null() {
        Ok(true) => say!(
            Step::Mount,
            "console was /dev/null; reattached to /dev/console"
        ),
        Ok(false) => {}
        Err(e) => say!(Step::Mount, "warning: console check failed: {e:#}"),
    }
    let mut msg = format!("mounted {}", done.mounted.join(" "));
    if !done.already.is_empty() {
        msg.push_str(&format!(" ({} already mounted)", done.already.join(" ")));
    }
    say!(Step::Mount, "{msg}");
    Ok(())
}

fn load_modules() -> Result<()> {
    let text = match fs::read_to_string(modules::LOAD_LIST) {
        Ok(t) => t,
        // A kernel with the needed drivers built in needs no list.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            say!(
                Step::LoadModules,
                "no {}, nothing to load",
                modules::LOAD_LIST
            );
            return Ok(());
        }
        Err(e) => return Err(e).context(format!("read {}", modules::LOAD_LIST)),
    };
    let s = modules::load_all(&modules::parse_load_list(&text));
    say!(
        Step::LoadModules,
        "{} loaded, {} already present, {} not for this machine, {} failed of {} in {} ms",
        s.loaded,
        s.already,
        s.absent,
        s.failed,
        s.listed,
        s.elapsed.as_millis()
    );
    Ok(())
}

fn cmdline() -> Result<AgentArgs> {
    let text = fs::read_to_string("/proc/cmdline").context("read /proc/cmdline")?;
    let args = AgentArgs::parse(&text)?;
    say!(
        Step::Cmdline,
        "url={} boot_mac={} ip={}/{} gateway={}",
        args.url,
        args.boot_mac,
        args.ip,
        args.prefix_len,
        args.gateway
            .map_or_else(|| "none".to_string(), |g| g.to_string())
    );
    Ok(args)
}

fn network(args: &AgentArgs) -> Result<()> {
    let class_net = Path::new(CLASS_NET);
    let start = Instant::now();
    let ifname = net::poll_until(NIC_TIMEOUT, POLL, || {
        net::find_by_mac(class_net, args.boot_mac)
    })
    .ok_or_else(|| {
        let seen: Vec<String> = net::interfaces(class_net)
            .into_iter()
            .map(|(name, mac)| match mac {
                Some(mac) => format!("{name}={mac}"),
                None => name,
            })
            .collect();
        anyhow!(
            "no NIC with MAC {} after {} s (present: {}); is its driver in {}?",
            args.boot_mac,
            NIC_TIMEOUT.as_secs(),
            if seen.is_empty() {
                "none".to_string()
            } else {
                seen.join(", ")
            },
            modules::LOAD_LIST
        )
    })?;
    say!(
        Step::Network,
        "boot NIC {ifname} ({}) found after {} ms",
        args.boot_mac,
        start.elapsed().as_millis()
    );

    let ctl = Control::new()?;
    ctl.set_up("lo")?;
    match args.ip {
        IpAddr::V4(ip) => ctl.set_ipv4(&ifname, ip, args.prefix_len)?,
        // Before the link is up: with DAD off the address is usable as soon as it is.
        IpAddr::V6(ip) => net::Control6::new()?.add_address(&ifname, ip, args.prefix_len)?,
    }
    ctl.set_up(&ifname)?;
    let route = match args.gateway {
        Some(gw) => {
            net::add_default_route(&ifname, gw)?;
            format!("default route via {gw}")
        }
        None => "no gateway".to_string(),
    };
    say!(
        Step::Network,
        "{ifname} up with {}/{}, {route}",
        args.ip,
        args.prefix_len
    );

    let start = Instant::now();
    match net::poll_until(CARRIER_TIMEOUT, POLL, || {
        net::carrier(class_net, &ifname).filter(|c| *c)
    }) {
        Some(_) => say!(
            Step::Network,
            "{ifname} link up after {} ms",
            start.elapsed().as_millis()
        ),
        None => say!(
            Step::Network,
            "warning: no carrier on {ifname} after {} s; trying anyway",
            CARRIER_TIMEOUT.as_secs()
        ),
    }
    Ok(())
}

/// Stage 2: the NIC kept its address and route across the exec; check it is still there.
fn network_kept(args: &AgentArgs) -> Result<()> {
    let class_net = Path::new(CLASS_NET);
    let ifname = net::find_by_mac(class_net, args.boot_mac).ok_or_else(|| {
        anyhow!(
            "the boot NIC {} is gone after the switch to stage 2",
            args.boot_mac
        )
    })?;
    say!(
        Step::Network,
        "{ifname} kept {}/{} from stage 1, link {}",
        args.ip,
        args.prefix_len,
        match net::carrier(class_net, &ifname) {
            Some(true) => "up",
            _ => "down",
        }
    );
    Ok(())
}

fn enlist(client: &ApplianceClient, args: &AgentArgs, inventory: Inventory) -> Result<()> {
    say!(
        Step::Enlist,
        "POST {}{}",
        args.url,
        stork_proto::ENLIST_PATH
    );
    let resp = client.enlist(&EnlistRequest {
        boot_mac: args.boot_mac,
        inventory,
    })?;
    say!(
        Step::Enlist,
        "machine {} status {}",
        resp.machine_id,
        resp.status
    );
    Ok(())
}
