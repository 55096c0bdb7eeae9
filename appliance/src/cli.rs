//! Client commands: talk to a running appliance over its API. Human tables by default,
//! `--json` for scripts.

use std::io::IsTerminal;

use anyhow::Result;
use comfy_table::{CellAlignment, Table, presets};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
pub use stork_client::Client;
use stork_proto::api::{MachineFilter, StatsResponse};
use stork_proto::units::human_bytes;

use crate::lifecycle::Status;
use crate::store::{EventRecord, Machine};

/// Prints a line of the CLI's human output with its control characters escaped: machine
/// details, events and inventories carry text that machines sent (agent reports, an
/// enlistment's inventory), which must not drive the terminal. JSON output escapes them by
/// itself.
macro_rules! out {
    ($($arg:tt)*) => {
        println!("{}", printable(&format!($($arg)*)))
    };
}

/// `s` with every control character but newline and tab written as an escape (`\u{1b}`).
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// What to add to an API error the user can mend: how to get a token.
pub fn hint(e: &anyhow::Error) -> Option<&'static str> {
    if e.chain().any(|c| c.to_string().contains("not the pinned")) {
        return Some(
            "the appliance's certificate is not the one pinned: if it was replaced on purpose, \
             check the new fingerprint with `stork config show` on the appliance and remove \
             the old line from the pins file (or pass --fingerprint)",
        );
    }
    let status = e.downcast_ref::<stork_client::Error>()?.status()?;
    (status == 401).then_some("set --token or STORK_TOKEN; `stork token create` makes one")
}

/// `stork config show`: the URLs clients use and the HTTPS certificate's fingerprint.
pub fn config_show(cfg: &crate::config::Config) -> anyhow::Result<()> {
    println!("boot files:   {}/boot/", cfg.base_url());
    println!("API:          {}/api/v1", cfg.api_url());
    match &cfg.tls {
        None => println!("TLS:          off"),
        Some(t) => {
            println!("certificate:  {}", t.cert.display());
            match t.fingerprint() {
                Ok(fp) => println!("fingerprint:  {fp}"),
                Err(_) if t.generate => {
                    println!("fingerprint:  none yet (generated at the first `stork serve`)")
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// A table as the CLI prints it: no borders, rules or colours, the columns two spaces apart
/// and no trailing blanks, so that a terminal, a log and `awk` read it alike. The widths come
/// from the cells alone, never from the terminal: no cell is wrapped or cut. `header` may be
/// empty (no header row); `right` lists the columns aligned right (numbers). Ends without a
/// newline; an empty table is an empty string.
pub fn plain_table<R: Into<comfy_table::Row>>(
    header: &[&str],
    right: &[usize],
    rows: impl IntoIterator<Item = R>,
) -> String {
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    if !header.is_empty() {
        t.set_header(header.to_vec());
    }
    t.add_rows(rows);
    for (i, column) in t.column_iter_mut().enumerate() {
        // No blank before the first column; each column's padding makes the two between.
        column.set_padding((u16::from(i > 0), 1));
        if right.contains(&i) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    t.trim_fmt()
}

/// Prints a table and its newline; nothing for an empty one.
fn print_table(table: &str) {
    if !table.is_empty() {
        out!("{table}");
    }
}

pub fn print_json(v: &impl serde::Serialize) -> Result<()> {
    out!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn time(ms: i64) -> String {
    let secs = ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}", ms % 1000)
}

pub fn machine_table(machines: &[Machine]) {
    let rows = machines.iter().map(|m| {
        let inv = m.inventory.as_ref();
        vec![
            m.id.clone(),
            m.status.to_string(),
            m.boot_mac
                .map(|b| b.to_string())
                .unwrap_or_else(|| "-".into()),
            m.hostname.clone().unwrap_or_else(|| "-".into()),
            inv.map_or(0, |i| i.cpu.count).to_string(),
            inv.map_or("-".into(), |i| human_bytes(i.memory.total_bytes)),
            inv.map_or(0, |i| i.disks.len()).to_string(),
        ]
    });
    print_table(&plain_table(
        &[
            "ID", "STATUS", "BOOT MAC", "HOSTNAME", "CPUS", "MEMORY", "DISKS",
        ],
        &[4, 5, 6],
        rows,
    ));
}

pub fn machine_details(m: &Machine, events: &[EventRecord]) {
    let show = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    out!("id:        {}", m.id);
    out!("status:    {}", m.status);
    if let Some(msg) = &m.status_message {
        out!("reason:    {msg}");
    }
    out!("hostname:  {}", show(&m.hostname));
    out!(
        "macs:      {}",
        m.macs
            .iter()
            .map(|m| m.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    out!("power:     {}", m.power.driver);
    if let Some(o) = &m.owner {
        out!("owner:     {o}");
    }
    if let Some(l) = &m.default_layout {
        out!("layout:    {l} (the default of a deploy to disk that gives none)");
    }
    if let Some(k) = &m.min_kernel {
        out!("kernel:    at least {k}");
    }
    if let Some(d) = &m.deploy {
        let layout = d
            .layout
            .as_ref()
            .map_or_else(String::new, |l| format!(", layout: {}", layout_summary(l)));
        let kernel = d
            .kernel
            .as_ref()
            .map_or_else(String::new, |k| format!(", kernel {k}"));
        out!("deploy:    {} to {:?}{layout}{kernel}", d.image, d.target);
        if let Some(n) = &d.network {
            out!("network:   {}", network_summary(n));
        }
    }
    if let Some(at) = m.last_heartbeat {
        let step = m.heartbeat_step.as_deref().unwrap_or("-");
        let due = match m.heartbeat_deadline {
            Some(d) => format!("next due by {}", time(d)),
            None => "none expected".to_string(),
        };
        out!("heartbeat: {} (step {step}), {due}", time(at));
    }
    if let Some(inv) = &m.inventory {
        out!("firmware:  {:?}", inv.firmware);
        let c = &inv.cpu;
        let topology = match (c.sockets, c.cores) {
            (Some(s), Some(k)) => format!(" ({s} sockets, {k} cores)"),
            _ => String::new(),
        };
        out!("cpu:       {} x {}{topology}", c.count, c.model);
        if !c.flags.is_empty() {
            out!("cpu flags: {}", c.flags.join(" "));
        }
        out!(
            "memory:    {} (usable {})",
            human_bytes(inv.memory.total_bytes),
            human_bytes(inv.memory.usable_bytes)
        );
        let d = &inv.dmi;
        out!(
            "system:    {} {} (serial {})",
            show(&d.sys_vendor),
            show(&d.product_name),
            show(&d.product_serial)
        );
        for disk in &inv.disks {
            out!(
                "disk:      {:<8} {:>10}  model {}  serial {}  {}{}",
                disk.name,
                human_bytes(disk.size_bytes),
                show(&disk.model),
                show(&disk.serial),
                show(&disk.transport),
                if disk.removable == Some(true) {
                    " removable"
                } else {
                    ""
                }
            );
            if let Some(path) = &disk.path {
                out!("           at {path}");
            }
            for p in &disk.partitions {
                out!(
                    "           {:<10} {:>10}  at {}  {}",
                    p.name,
                    human_bytes(p.size_bytes),
                    p.start_bytes,
                    show(&p.label)
                );
            }
        }
        for nic in &inv.nics {
            out!(
                "nic:       {:<8} {}  driver {}  link {}{}",
                nic.name,
                nic.mac,
                show(&nic.driver),
                nic.link.map_or("-", |l| if l { "up" } else { "down" }),
                nic.speed_mbps
                    .map_or_else(String::new, |s| format!(" {s} Mb/s"))
            );
        }
    }
    print_table(&event_table(events));
}

/// Events as a table without a header: time, actor, message.
fn event_table(events: &[EventRecord]) -> String {
    plain_table(
        &[],
        &[],
        events
            .iter()
            .map(|e| vec![time(e.at), e.actor.clone(), e.message.clone()]),
    )
}

/// One event as it comes, for `watch` (a table needs every row before its widths).
pub fn print_event(e: &EventRecord) {
    out!("{} {:<12} {}", time(e.at), e.actor, e.message);
}

/// The percentage an agent's progress event carries in its text: the API writes them as
/// "STEP Progress (42%): MESSAGE".
fn progress_percent(message: &str) -> Option<f32> {
    let (_, rest) = message.split_once('(')?;
    rest.split('%').next()?.trim().parse().ok()
}

/// How `watch` shows the agent's progress events. On a terminal: one indicatif bar per step,
/// redrawn in place, the other events printed as lines. Anywhere else (a pipe, a log, a
/// test): one line per progress event with its bar drawn in 20 `#`, as it always was.
struct WatchOutput {
    terminal: bool,
    /// The step the live bar follows (its message up to the percentage) and the bar.
    bar: Option<(String, ProgressBar)>,
}

impl WatchOutput {
    fn new(terminal: bool) -> Self {
        Self {
            terminal,
            bar: None,
        }
    }

    fn event(&mut self, e: &EventRecord) {
        let Some(pct) = progress_percent(&e.message) else {
            self.finish();
            print_event(e);
            return;
        };
        if !self.terminal {
            let filled = ((pct / 5.0) as usize).min(20);
            out!(
                "{} [{}{}] {}",
                time(e.at),
                "#".repeat(filled),
                " ".repeat(20 - filled),
                e.message
            );
            return;
        }
        let step = e.message.split('(').next().unwrap_or_default().to_string();
        if self.bar.as_ref().is_some_and(|(s, _)| *s != step) {
            self.finish();
        }
        let (_, bar) = self.bar.get_or_insert_with(|| {
            let bar = ProgressBar::with_draw_target(Some(100), ProgressDrawTarget::stdout());
            // The message fills what the terminal has left and is cut there: a wrapped line
            // would break the redraw.
            if let Ok(style) = ProgressStyle::with_template("{prefix} [{bar:20}] {wide_msg}") {
                bar.set_style(style.progress_chars("# "));
            }
            (step, bar)
        });
        bar.set_prefix(time(e.at));
        bar.set_message(printable(&e.message).into_owned());
        bar.set_position(pct.clamp(0.0, 100.0).round() as u64);
    }

    /// Leaves the live bar where it stands (its last percentage, not a made-up 100%).
    fn finish(&mut self) {
        if let Some((_, bar)) = self.bar.take() {
            bar.abandon();
        }
    }
}

/// `stork machine watch`: prints events live; with `until_settled`, stops once the machine
/// leaves its busy status.
pub fn watch(c: &Client, id: &str, until_settled: bool) -> Result<()> {
    let m = c.machine(id)?;
    // The stream replays the history first: only what happens after the newest event seen
    // now can settle the machine (its history starts with `created`, a status that is not
    // busy, whatever it is doing now).
    let newest = if until_settled {
        newest_event(c, &m.id)?
    } else {
        0
    };
    let mut last_status = m.status;
    let mut out = WatchOutput::new(std::io::stdout().is_terminal());
    let followed = c.follow_events(Some(&m.id), |e| {
        out.event(&e);
        if e.id <= newest {
            // History: settled already if it is not busy now.
            return !(until_settled && e.id == newest && !busy(last_status));
        }
        if let Some(s) = e.new_status {
            last_status = s;
        }
        !(until_settled && e.new_status.is_some() && !busy(last_status))
    });
    out.finish();
    followed?;
    if until_settled {
        out!("status: {last_status}");
    }
    Ok(())
}

/// Whether a status is one the machine leaves by itself (it has a timeout).
fn busy(s: Status) -> bool {
    crate::lifecycle::failure_on_timeout(s).is_some()
}

/// The id of the machine's newest event (0 without any).
fn newest_event(c: &Client, machine_id: &str) -> Result<i64> {
    let mut newest = 0;
    loop {
        let page = c.machine_events(machine_id, newest)?;
        match page.last() {
            Some(e) => newest = e.id,
            None => return Ok(newest),
        }
    }
}

pub fn leases(c: &Client, json: bool) -> Result<()> {
    let leases = c.dhcp_leases()?;
    if json {
        return print_json(&leases);
    }
    let now = crate::store::now_ms() / 1000;
    for l in leases {
        let left = i64::try_from(l.expires).unwrap_or(i64::MAX) - now;
        out!("{}  {:<15}  {} s", l.mac, l.ip.to_string(), left.max(0));
    }
    Ok(())
}

pub fn stats(c: &Client, json: bool) -> Result<()> {
    let stats = c.stats()?;
    let health = c.health()?;
    if json {
        // The counters by service as the API has them, and the health beside them.
        #[derive(serde::Serialize)]
        struct WithHealth {
            #[serde(flatten)]
            stats: StatsResponse,
            health: crate::supervise::HealthReport,
        }
        return print_json(&WithHealth { stats, health });
    }
    for (service, counters) in [
        ("dhcp", &stats.dhcp),
        ("tftp", &stats.tftp),
        ("http", &stats.http),
    ] {
        for (name, value) in counters {
            out!("{service}.{name} {value}");
        }
    }
    out!("health {}", health.status);
    for (name, s) in &health.services {
        let state = s.state.as_str();
        match &s.last_error {
            Some(e) => out!(
                "health.{name} {state} restarts={} last_error={e}",
                s.restarts
            ),
            None => out!("health.{name} {state} restarts={}", s.restarts),
        }
    }
    Ok(())
}

pub fn images(c: &Client, json: bool) -> Result<()> {
    let list = c.boot_resources()?;
    if json {
        return print_json(&list);
    }
    let rows = list.iter().map(|r| {
        let files: Vec<String> = r
            .files
            .iter()
            .map(|f| format!("{}={}", f.role, f.path))
            .collect();
        // The default first, as `name=version` (an uploaded image's are named by version).
        let kernels: Vec<String> = r
            .kernels
            .iter()
            .map(|k| match k.name == k.version {
                true => k.version.clone(),
                false => format!("{}={}", k.name, k.version),
            })
            .collect();
        vec![
            r.name.clone(),
            r.kind.clone(),
            r.arch.clone().unwrap_or_else(|| "-".into()),
            if kernels.is_empty() {
                "-".into()
            } else {
                kernels.join(" ")
            },
            files.join(" "),
        ]
    });
    print_table(&plain_table(
        &["NAME", "KIND", "ARCH", "KERNELS", "FILES"],
        &[],
        rows,
    ));
    Ok(())
}

/// What a machine's setting is after `machine layout` or `machine min-kernel`.
pub fn setting_line(id: &str, what: &str, value: Option<&str>) {
    match value {
        Some(v) => println!("{id}: {what} {v}"),
        None => println!("{id}: no {what}"),
    }
}

/// Machines filtered by status, for `machine list --status`.
pub fn list(c: &Client, status: Option<Status>, json: bool) -> Result<()> {
    let filter = MachineFilter {
        status: status.map(|s| s.to_string()),
        ..MachineFilter::default()
    };
    let machines = c.machines(&filter)?;
    if json {
        return print_json(&machines);
    }
    machine_table(&machines);
    Ok(())
}

pub fn show(c: &Client, id: &str, json: bool) -> Result<()> {
    let m = c.machine(id)?;
    if json {
        return print_json(&m);
    }
    let events = c.machine_events(&m.id, 0)?;
    machine_details(&m, &events);
    let results = c.machine_scripts(&m.id)?;
    if !results.is_empty() {
        println!(
            "scripts (`stork machine scripts {}` for their output):",
            m.id
        );
        for r in &results {
            println!("  {}", script_line(r));
        }
    }
    Ok(())
}

/// The machine's last commissioning's script results, each with its output.
pub fn script_results(c: &Client, id: &str, json: bool) -> Result<()> {
    let results = c.machine_scripts(id)?;
    if json {
        return print_json(&results);
    }
    if results.is_empty() {
        println!("no script results (none ran, or none since the last commissioning began)");
    }
    for r in &results {
        println!("== {}", script_line(r));
        for line in r.output.lines() {
            println!("   {}", printable(line));
        }
    }
    Ok(())
}

/// One result in a line: name, kind, outcome, time.
pub fn script_line(r: &stork_proto::api::ScriptResult) -> String {
    let outcome = match (r.timed_out, r.exit_status) {
        (true, _) => "timed out".to_string(),
        (false, Some(0)) => "passed".to_string(),
        (false, Some(n)) => format!("failed (exit {n})"),
        (false, None) => "did not run".to_string(),
    };
    format!(
        "{} ({}): {outcome} in {:.1} s",
        r.name,
        if r.test { "hardware test" } else { "script" },
        r.duration_ms as f64 / 1000.0
    )
}

/// Prints the machine an action or a creation answered with.
pub fn machine_line(m: &Machine, json: bool) -> Result<()> {
    if json {
        return print_json(m);
    }
    out!("{} {}", m.id, m.status);
    Ok(())
}

pub fn events(c: &Client, id: &str, json: bool) -> Result<()> {
    let events = c.machine_events(id, 0)?;
    if json {
        return print_json(&events);
    }
    print_table(&event_table(&events));
    Ok(())
}

/// `--json`: the answer as the API gave it; else one line made from it.
pub fn json_or_line<T: serde::Serialize>(
    v: &T,
    json: bool,
    line: impl FnOnce(&T) -> String,
) -> Result<()> {
    if json {
        print_json(v)
    } else {
        out!("{}", line(v));
        Ok(())
    }
}

pub fn audit(c: &Client, after: i64, json: bool) -> Result<()> {
    let entries = c.audit(&stork_proto::api::AuditQuery { after, limit: None })?;
    if json {
        return print_json(&entries);
    }
    let rows = entries.iter().map(|a| {
        vec![
            a.id.to_string(),
            time(a.at),
            a.actor.clone(),
            a.method.clone(),
            a.path.clone(),
            a.status.to_string(),
        ]
    });
    print_table(&plain_table(
        &["ID", "TIME", "ACTOR", "METHOD", "PATH", "STATUS"],
        &[0, 5],
        rows,
    ));
    Ok(())
}

/// A layout in one line: `ESP 512 MiB, data 3000 MiB on vda+vdb, RAID 1, LVM vg0: root
/// rest ext4 /, var 500 MiB xfs /var`.
pub fn layout_summary(l: &stork_proto::DiskLayout) -> String {
    let mut s = format!(
        "ESP {} MiB, {} {}",
        l.esp(),
        if l.raid.is_some() || l.lvm.is_some() {
            "data"
        } else {
            "root"
        },
        l.root_mib
            .map_or_else(|| "the rest".to_string(), |r| format!("{r} MiB"))
    );
    if !l.disks.is_empty() {
        s.push_str(&format!(" on {}", l.disks.join("+")));
    }
    if let Some(level) = l.raid {
        s.push_str(&format!(", RAID {level}"));
    }
    match &l.lvm {
        Some(lvm) => {
            let vols: Vec<String> = lvm
                .volumes
                .iter()
                .map(|v| {
                    let size = match (v.size_mib, v.percent) {
                        (Some(m), _) => format!("{m} MiB"),
                        (None, Some(p)) => format!("{p}%"),
                        (None, None) => "rest".to_string(),
                    };
                    format!("{} {size} {} {}", v.name, v.fs.name(), v.mount)
                })
                .collect();
            s.push_str(&format!(", LVM {}: {}", lvm.vg, vols.join(", ")));
        }
        None if !l.is_flat() => s.push_str(&format!(", {} /", l.root_fs().name())),
        None => {}
    }
    s
}

/// A network config in one line, an interface at a time: `en0 52:54:00:77:01:31 in bond0;
/// bond0 active-backup: 10.77.0.50/24 via 10.77.0.1; bond0.100 VLAN 100 on bond0:
/// 10.78.0.50/24; DNS 10.77.0.1`.
pub fn network_summary(n: &stork_proto::NetworkConfig) -> String {
    let mut parts: Vec<String> = n
        .interfaces
        .iter()
        .map(|i| {
            use stork_proto::netconf::What;
            let what = match i.what() {
                Some(What::Nic(mac)) => format!("{} {mac}", i.name),
                Some(What::Bond(b)) => format!("{} {}", i.name, b.mode.name()),
                Some(What::Vlan(v)) => format!("{} VLAN {} on {}", i.name, v.id, v.link),
                _ => format!("{} bridge", i.name),
            };
            if let Some(master) = n.master_of(&i.name) {
                return format!("{what} in {}", master.name);
            }
            let mut how: Vec<String> = Vec::new();
            if i.dhcp4 {
                how.push("DHCPv4".into());
            }
            if i.dhcp6 {
                how.push("DHCPv6".into());
            }
            how.extend(i.addresses.iter().cloned());
            let mut line = match how.is_empty() {
                true => what,
                false => format!("{what}: {}", how.join(" ")),
            };
            for g in i
                .gateway4
                .map(|g| g.to_string())
                .into_iter()
                .chain(i.gateway6.map(|g| g.to_string()))
            {
                line.push_str(&format!(" via {g}"));
            }
            line
        })
        .collect();
    if !n.dns.servers.is_empty() {
        let servers: Vec<String> = n.dns.servers.iter().map(|s| s.to_string()).collect();
        parts.push(format!("DNS {}", servers.join(" ")));
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_network_config_reads_in_one_line() {
        let n: stork_proto::NetworkConfig = serde_json::from_str(
            r#"{"interfaces": [
            {"name": "en0", "mac": "52:54:00:77:01:31"},
            {"name": "bond0", "bond": {"members": ["en0"], "mode": "active-backup"},
             "addresses": ["10.77.0.50/24"], "gateway4": "10.77.0.1"},
            {"name": "bond0.100", "vlan": {"link": "bond0", "id": 100}, "dhcp4": true}],
            "dns": {"servers": ["10.77.0.1"]}}"#,
        )
        .unwrap();
        assert_eq!(
            network_summary(&n),
            "en0 52:54:00:77:01:31 in bond0; bond0 active-backup: 10.77.0.50/24 via 10.77.0.1; \
             bond0.100 VLAN 100 on bond0: DHCPv4; DNS 10.77.0.1"
        );
    }

    #[test]
    fn control_characters_are_escaped_but_lines_and_tabs_kept() {
        assert_eq!(printable("plain text"), "plain text");
        assert_eq!(printable("a\tb\nc"), "a\tb\nc");
        assert_eq!(printable("\u{1b}[2Jgone\u{7}\r"), "\\u{1b}[2Jgone\\u{7}\\r");
    }

    #[test]
    fn a_layout_reads_in_one_line() {
        let l: stork_proto::DiskLayout = serde_json::from_str(
            r#"{"root_mib": 3000, "disks": ["vda", "vdb"], "raid": 1, "lvm": {"volumes": [
                {"name": "root", "mount": "/"},
                {"name": "var", "mount": "/var", "fs": "xfs", "size_mib": 500}]}}"#,
        )
        .unwrap();
        assert_eq!(
            layout_summary(&l),
            "ESP 512 MiB, data 3000 MiB on vda+vdb, RAID 1, LVM vg0: root rest ext4 /, var 500 MiB xfs /var"
        );
        assert_eq!(
            layout_summary(&stork_proto::DiskLayout::default()),
            "ESP 512 MiB, root the rest"
        );
        let btrfs: stork_proto::DiskLayout = serde_json::from_str(r#"{"fs": "btrfs"}"#).unwrap();
        assert_eq!(
            layout_summary(&btrfs),
            "ESP 512 MiB, root the rest, btrfs /"
        );
    }
}
