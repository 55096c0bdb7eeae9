//! One machine: its status and the actions the lifecycle table allows in it, power,
//! inventory, the last operation's timeline, the deploy form and the event history.

use axum::extract::{Path, Query, State};
use maud::{Markup, html};
use serde::Deserialize;
use stork_proto::api::{
    BootResource, EventRecord, HardwareSummary, Machine, PowerState, ScriptResult, Status,
    TokenScope,
};

use super::machines::{hardware, is_busy, is_failed};
use super::timeline::{Phase, phases};
use super::{Session, UiError, UiResult, bytes, duration, field_error, layout, maud_html, when};
use crate::http::AppState;
use crate::lifecycle::{Event, transition};
use crate::store::{StoreError, now_ms};

/// The newest events a page shows; the API has the rest.
const EVENTS_SHOWN: usize = 200;

#[derive(Deserialize, Default)]
pub struct MachineQuery {
    /// Only `#detail`, for the live update.
    #[serde(default)]
    fragment: Option<u8>,
}

/// The buttons a machine page may show, each the lifecycle event it sends.
const ACTIONS: &[(&str, Event, &str)] = &[
    ("commission", Event::Commission, "Commission"),
    ("allocate", Event::Allocate, "Allocate"),
    ("release", Event::Release, "Release"),
    ("abort", Event::Abort, "Abort"),
    ("mark-broken", Event::MarkBroken, "Mark broken"),
    ("mark-fixed", Event::MarkFixed, "Mark fixed"),
];

/// The actions the lifecycle table allows in `m`'s status.
pub fn legal_actions(m: &Machine) -> Vec<(&'static str, &'static str)> {
    ACTIONS
        .iter()
        .filter(|(_, event, _)| transition(m.status, *event, m.inventory.is_some()).is_ok())
        .map(|(name, _, label)| (*name, *label))
        .collect()
}

pub async fn page(
    State(s): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    Query(q): Query<MachineQuery>,
) -> UiResult {
    let m = match s.controller.machine(&id).await {
        Ok(m) => m,
        Err(StoreError::NotFound(_)) => {
            return Err(UiError(
                axum::http::StatusCode::NOT_FOUND,
                format!("There is no machine {id:?}."),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    let after = s.controller.last_event_id().await?;
    // The whole history (the timeline needs the last operation's start), newest shown.
    let events = s.controller.events(Some(m.id.clone()), 0, 100_000).await?;
    let images = if m.status == Status::Ready || m.status == Status::Allocated {
        s.controller
            .boot_resources()
            .await?
            .into_iter()
            .filter(|r| r.kind == "os")
            .collect()
    } else {
        Vec::new()
    };
    let scripts = s.controller.script_results(&m.id).await?;
    let detail = detail(&m.redacted(), &events, &images, &scripts, &session);
    if q.fragment == Some(1) {
        return Ok(maud_html(detail));
    }
    let name = m.hostname.clone().unwrap_or_else(|| m.id.clone());
    let body = html! {
        p .crumbs { a href="/ui/machines" { "Machines" } " / " (name) }
        div #detail { (detail) }
    };
    Ok(layout(&name, "machine", &session, after, body))
}

fn detail(
    m: &Machine,
    events: &[EventRecord],
    images: &[BootResource],
    scripts: &[ScriptResult],
    s: &Session,
) -> Markup {
    let now = now_ms();
    let name = m.hostname.clone().unwrap_or_else(|| m.id.clone());
    let operator = s.may(TokenScope::Operator);
    html! {
        section #machine data-machine-id=(m.id) data-status=(m.status.as_str()) aria-labelledby="machine-name" {
            div .head {
                h1 #machine-name { (name) }
                span #status class={ "badge status-" (m.status.as_str()) } { (m.status.as_str()) }
                @if is_busy(m.status) {
                    span .elapsed { "for " (duration(now - m.status_since)) }
                }
            }
            @if operator {
                div #actions .actions role="toolbar" aria-label="Actions" {
                    @for (action, label) in legal_actions(m) {
                        button type="button" data-action=(action) data-machine=(m.id) { (label) }
                    }
                    @if m.status == Status::Deployed || m.status == Status::Allocated {
                        label .inline { input #release-erase type="checkbox" checked; " erase disks on release" }
                    }
                    button type="button" .danger data-action="delete" data-machine=(m.id) { "Delete" }
                    span #action-result .form-error role="alert" {}
                }
            }
            @if let Some(msg) = &m.status_message {
                @if is_failed(m.status) {
                    div #failure .failure role="alert" {
                        h2 { "Why it failed" }
                        pre { (msg) }
                        (log_tail(events))
                    }
                } @else {
                    p .status-message { (msg) }
                }
            }
        }
        div .cards {
            (timeline_card(&phases(events, now)))
            @if operator && (m.status == Status::Ready || m.status == Status::Allocated) {
                (deploy_form(m, images))
            }
            (power_card(m, operator))
            (summary_card(m))
            (inventory_card(m))
            @if !scripts.is_empty() {
                (scripts_card(scripts))
            }
        }
        section #events-card .card aria-labelledby="events-h" {
            h2 #events-h { "Events" }
            ol #events reversed {
                @for e in events.iter().rev().take(EVENTS_SHOWN) {
                    li .event data-event-id=(e.id) {
                        time { (when(e.at)) }
                        span .actor { (e.actor) }
                        @if let Some(to) = e.new_status { span class={ "badge status-" (to.as_str()) } { (to.as_str()) } }
                        span .msg { (e.message) }
                    }
                }
            }
        }
    }
}

/// The last commissioning's scripts and hardware tests: outcome, time, output.
fn scripts_card(scripts: &[ScriptResult]) -> Markup {
    html! {
        section #scripts-card .card aria-labelledby="scripts-h" {
            h2 #scripts-h { "Commissioning scripts" }
            ul #scripts {
                @for r in scripts {
                    li .script data-script=(r.name) data-passed=(r.passed()) {
                        details open[!r.passed()] {
                            summary { (crate::cli::script_line(r)) }
                            pre .log { (r.output) }
                        }
                    }
                }
            }
        }
    }
}

/// The agent's last lines before a failure: its events since the operation began.
fn log_tail(events: &[EventRecord]) -> Markup {
    let start = events
        .iter()
        .rposition(|e| e.new_status.is_some_and(is_busy))
        .unwrap_or(0);
    let lines: Vec<&EventRecord> = events[start..]
        .iter()
        .filter(|e| e.actor == "agent")
        .collect();
    html! {
        @if !lines.is_empty() {
            h3 { "The agent's last reports" }
            pre .log { @for e in lines.iter().rev().take(20).rev() { (when(e.at)) "  " (e.message) "\n" } }
        }
    }
}

fn timeline_card(phases: &[Phase]) -> Markup {
    let (Some(first), Some(last)) = (phases.first(), phases.last()) else {
        return html! {
            section #timeline .card aria-labelledby="timeline-h" {
                h2 #timeline-h { "Timeline" }
                p .empty { "No commission, deploy or release yet." }
            }
        };
    };
    let t0 = first.start;
    let total = (last.end - t0).max(1) as f64;
    html! {
        section #timeline .card aria-labelledby="timeline-h" {
            h2 #timeline-h { "Timeline " small { (duration(last.end - t0)) } }
            ol .phases {
                @for p in phases {
                    @let left = (p.start - t0) as f64 / total * 100.0;
                    @let width = (p.ms() as f64 / total * 100.0).max(0.5);
                    li .phase data-phase=(p.name) .running[p.running] .failed[p.failed] title=(p.label) {
                        span .name { (p.name) }
                        span .track {
                            span .bar style=(format!("margin-left:{left:.2}%;width:{width:.2}%")) {}
                        }
                        span .ms { (duration(p.ms())) @if p.running { " …" } }
                    }
                }
            }
        }
    }
}

fn deploy_form(m: &Machine, images: &[BootResource]) -> Markup {
    // Every image's kernels by name and by version, the defaults first.
    let mut kernels: Vec<(String, String)> = Vec::new();
    for r in images {
        for k in &r.kernels {
            for (value, label) in [
                (&k.name, format!("{} ({})", k.version, r.name)),
                (&k.version, format!("{} of {}", k.name, r.name)),
            ] {
                if !kernels.iter().any(|(v, _)| v == value) {
                    kernels.push((value.clone(), label));
                }
            }
        }
    }
    let disks = m
        .inventory
        .as_ref()
        .map(|i| i.disks.clone())
        .unwrap_or_default();
    html! {
        section .card aria-labelledby="deploy-h" {
            h2 #deploy-h { "Deploy" }
            form #deploy-form data-machine=(m.id) data-status=(m.status.as_str()) novalidate {
                label { "Image"
                    select name="image" required {
                        @for i in images { option value=(i.name) { (i.name) } }
                    }
                    (field_error("image"))
                }
                label { "Hostname"
                    input name="hostname" value=[m.hostname.as_deref()] placeholder={ "stork-" (m.id) } autocomplete="off" spellcheck="false";
                    (field_error("hostname"))
                }
                label { "Target"
                    select name="target" {
                        option value="disk" { "disk (install)" }
                        option value="memory" { "memory (no disk touched)" }
                    }
                    (field_error("target"))
                }
                label { "Disk"
                    select name="disk" {
                        option value="" { "the smallest that fits" }
                        @for d in &disks {
                            option value=(d.name) { (d.name) " · " (bytes(d.size_bytes)) @if let Some(model) = &d.model { " · " (model) } }
                        }
                    }
                    (field_error("disk"))
                }
                label { "Kernel " small { "(disk deploys; empty: the image's default)" }
                    input name="kernel" list="deploy-kernels" autocomplete="off" spellcheck="false";
                    datalist #deploy-kernels {
                        @for (value, label) in &kernels { option value=(value) label=(label) {} }
                    }
                    (field_error("kernel"))
                }
                fieldset .layout {
                    legend { "Partitions " small { "(disk deploys; empty: the image's own layout)" } }
                    label { "ESP, MiB"
                        input name="layout.esp_mib" inputmode="numeric" placeholder="512" autocomplete="off";
                        (field_error("layout.esp_mib"))
                    }
                    label { "Root, MiB"
                        input name="layout.root_mib" inputmode="numeric" placeholder="the rest of the disk" autocomplete="off";
                        (field_error("layout.root_mib"))
                    }
                    (field_error("layout"))
                }
                label { "SSH keys " small { "(one per line; the registered keys are always added)" }
                    textarea name="ssh_keys" rows="2" spellcheck="false" {}
                    (field_error("ssh_keys"))
                }
                label { "User-data " small { "(cloud-init, optional)" }
                    textarea name="user_data" rows="3" spellcheck="false" placeholder="#cloud-config" {}
                    (field_error("user_data"))
                }
                p .form-error role="alert" {}
                button #deploy-submit type="submit" { "Deploy" }
            }
        }
    }
}

fn power_card(m: &Machine, operator: bool) -> Markup {
    let state = m.power_state.unwrap_or(PowerState::Unknown);
    let address = ["host", "address", "url", "socket"]
        .iter()
        .find_map(|k| m.power.params.get(*k))
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string())
        });
    html! {
        section #power .card aria-labelledby="power-h" {
            h2 #power-h { "Power" }
            dl {
                dt { "State" }
                dd { span #power-state class={ "power power-" (state.as_str()) } { (state.as_str()) }
                    @if let Some(at) = m.power_seen_at { small { " seen " (when(at)) } } }
                dt { "Driver" } dd { (m.power.driver) }
                @if let Some(a) = address { dt { "BMC" } dd { code { (a) } } }
            }
            @if operator && m.power.driver != "manual" {
                div .actions {
                    button type="button" data-power="on" data-machine=(m.id) { "On" }
                    button type="button" data-power="off" data-machine=(m.id) { "Off" }
                    button type="button" data-power="cycle" data-machine=(m.id) { "Cycle" }
                    button type="button" data-power="query" data-machine=(m.id) { "Query" }
                }
            }
        }
    }
}

fn summary_card(m: &Machine) -> Markup {
    html! {
        section .card aria-labelledby="summary-h" {
            h2 #summary-h { "Machine" }
            dl {
                dt { "Id" } dd { code { (m.id) } }
                dt { "MACs" } dd { @for (i, mac) in m.macs.iter().enumerate() { @if i > 0 { ", " } code { (mac) } } }
                dt { "Arch" } dd { (m.arch) }
                @if let Some(o) = &m.owner { dt { "Owner" } dd { (o) } }
                @if !m.tags.is_empty() { dt { "Tags" } dd { (m.tags.join(", ")) } }
                @if let Some(l) = &m.default_layout { dt { "Default layout" } dd { code { (l) } } }
                @if let Some(k) = &m.min_kernel { dt { "Minimum kernel" } dd { code { (k) } } }
                @if let Some(d) = &m.deploy {
                    dt { "Deploy" } dd { (d.image) " to " (d.target.as_str()) }
                    @if let Some(l) = &d.layout { dt { "Layout" } dd { (crate::cli::layout_summary(l)) } }
                    @if let Some(n) = &d.network { dt { "Network" } dd { (crate::cli::network_summary(n)) } }
                }
                dt { "Added" } dd { (when(m.created_at)) }
                dt { "Status since" } dd { (when(m.status_since)) }
            }
        }
    }
}

fn inventory_card(m: &Machine) -> Markup {
    let Some(inv) = &m.inventory else {
        return html! {
            section #inventory .card aria-labelledby="inventory-h" {
                h2 #inventory-h { "Inventory" }
                p .empty { "Not enlisted or commissioned yet." }
            }
        };
    };
    html! {
        section #inventory .card aria-labelledby="inventory-h" {
            h2 #inventory-h { "Inventory " small { (hardware(m.inventory.as_ref().map(HardwareSummary::of).as_ref())) } }
            dl {
                dt { "CPU" } dd { (inv.cpu.count) " × " (inv.cpu.model)
                    @if let (Some(s), Some(c)) = (inv.cpu.sockets, inv.cpu.cores) { " (" (s) " sockets, " (c) " cores)" } }
                dt { "Memory" } dd { (bytes(inv.memory.total_bytes)) " (" (bytes(inv.memory.usable_bytes)) " usable)" }
                dt { "System" } dd { (inv.dmi.sys_vendor.as_deref().unwrap_or("?")) " " (inv.dmi.product_name.as_deref().unwrap_or("")) }
                dt { "Firmware" } dd { (format!("{:?}", inv.firmware).to_lowercase())
                    @if let Some(v) = &inv.dmi.bios_version { " · " (v) }
                    @match (inv.firmware, inv.secure_boot) {
                        (stork_proto::inventory::Firmware::Uefi, Some(true)) => { " · Secure Boot on" }
                        (stork_proto::inventory::Firmware::Uefi, Some(false)) => { " · Secure Boot off" }
                        _ => {}
                    } }
                dt { "Kernel" } dd { (inv.kernel) }
            }
            h3 { "Disks" }
            div .table-wrap { table .disks {
                thead { tr { th { "Name" } th { "Size" } th { "Model" } th { "Serial" } th { "Bus" } } }
                tbody { @for d in &inv.disks { tr {
                    td { (d.name) } td { (bytes(d.size_bytes)) }
                    td { (d.model.as_deref().unwrap_or("")) } td { (d.serial.as_deref().unwrap_or("")) }
                    td { (d.transport.as_deref().unwrap_or("")) @if d.rotational == Some(true) { " · hdd" } }
                } } }
            } }
            h3 { "NICs" }
            div .table-wrap { table .nics {
                thead { tr { th { "Name" } th { "MAC" } th { "Driver" } th { "Link" } } }
                tbody { @for n in &inv.nics { tr {
                    td { (n.name) } td { code { (n.mac) } } td { (n.driver.as_deref().unwrap_or("")) }
                    td { @match n.link { Some(true) => { "up" @if let Some(sp) = n.speed_mbps { " · " (sp) " Mb/s" } }, Some(false) => "down", None => "?" } }
                } } }
            } }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_decides_the_buttons() {
        let mut m = Machine::new("m".into(), vec![], 0);
        let names = |m: &Machine| {
            legal_actions(m)
                .into_iter()
                .map(|(a, _)| a)
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&m), vec!["commission", "mark-broken"]);
        m.status = Status::Deploying;
        assert!(names(&m).contains(&"abort"));
        assert!(!names(&m).contains(&"commission"));
        m.status = Status::Broken;
        assert_eq!(names(&m), vec!["mark-fixed"]);
    }

    #[test]
    fn the_summary_shows_the_deploys_layout_and_network() {
        let mut m = Machine::new("m".into(), vec![], 0);
        m.deploy = Some(stork_proto::api::DeployRequest {
            image: "debian-12".into(),
            layout: Some(serde_json::from_str(r#"{"root_mib": 2048}"#).unwrap()),
            network: Some(
                serde_json::from_str(
                    r#"{"interfaces": [{"name": "en0", "mac": "52:54:00:00:00:01",
                        "addresses": ["10.77.0.50/24"]}]}"#,
                )
                .unwrap(),
            ),
            ..Default::default()
        });
        let page = summary_card(&m).into_string();
        assert!(
            page.contains("<dt>Layout</dt><dd>ESP 512 MiB, root 2048 MiB</dd>"),
            "{page}"
        );
        assert!(
            page.contains("<dt>Network</dt><dd>en0 52:54:00:00:00:01: 10.77.0.50/24</dd>"),
            "{page}"
        );
    }
}
