//! The machines page: one page of the store's machines, filtered, sorted and paged by the
//! store (the same query as `GET /api/v1/machines`), updated live by the page script, which
//! fetches this page's `#list` again (`fragment=1`) when an event arrives.

use std::collections::HashMap;

use axum::extract::{Query, State};
use maud::{Markup, html};
use serde::Deserialize;
use stork_proto::api::{
    EventRecord, HardwareSummary, MachineFilter, MachineSummary, PowerState, Status, TokenScope,
};

use super::{Session, UiResult, bytes, duration, layout, maud_html};
use crate::http::AppState;
use crate::store::{MachineQuery, now_ms};

/// The page's query string: the API's filter, with pages instead of offsets.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    q: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    power: Option<String>,
    #[serde(default)]
    sort: Option<String>,
    #[serde(default)]
    order: Option<String>,
    #[serde(default)]
    page: Option<u64>,
    #[serde(default)]
    per_page: Option<u64>,
    /// Only the `#list` part, for the live update.
    #[serde(default)]
    fragment: Option<u8>,
}

const PER_PAGE: u64 = 50;
const PER_PAGE_CHOICES: &[u64] = &[25, 50, 100, 200];

impl ListQuery {
    fn per_page(&self) -> u64 {
        self.per_page.unwrap_or(PER_PAGE).clamp(1, 500)
    }

    fn page(&self) -> u64 {
        self.page.unwrap_or(1).max(1)
    }

    fn filter(&self) -> MachineFilter {
        MachineFilter {
            status: self.status.clone(),
            tag: self.tag.clone(),
            power: self.power.clone(),
            q: self.q.clone(),
            sort: self.sort.clone(),
            order: self.order.clone(),
            offset: Some((self.page() - 1).saturating_mul(self.per_page())),
            limit: Some(self.per_page()),
            view: Some("summary".into()),
        }
    }

    /// This page's URL with some parameters changed (`None` removes one).
    fn with(&self, changes: &[(&str, Option<String>)]) -> String {
        let mut pairs: Vec<(&str, String)> = [
            ("q", self.q.clone()),
            ("status", self.status.clone()),
            ("tag", self.tag.clone()),
            ("power", self.power.clone()),
            ("sort", self.sort.clone()),
            ("order", self.order.clone()),
            ("page", self.page.map(|p| p.to_string())),
            ("per_page", self.per_page.map(|p| p.to_string())),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.filter(|v| !v.is_empty()).map(|v| (k, v)))
        .collect();
        for (k, v) in changes {
            pairs.retain(|(key, _)| key != k);
            if let Some(v) = v {
                pairs.push((k, v.clone()));
            }
        }
        let query: Vec<String> = pairs
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k}={}",
                    percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC)
                )
            })
            .collect();
        if query.is_empty() {
            "/ui/machines".into()
        } else {
            format!("/ui/machines?{}", query.join("&"))
        }
    }
}

pub async fn page(
    State(s): State<AppState>,
    session: Session,
    Query(q): Query<ListQuery>,
) -> UiResult {
    let after = s.controller.last_event_id().await?;
    let (list, error) = match MachineQuery::from_filter(&q.filter()) {
        Ok(query) => {
            let (total, machines) = s.controller.machine_summaries(query).await?;
            let busy: Vec<String> = machines
                .iter()
                .filter(|m| is_busy(m.status))
                .map(|m| m.id.clone())
                .collect();
            let steps = s.controller.latest_agent_events(busy).await?;
            (list(&q, total, &machines, &steps, &session), None)
        }
        Err(e) => (html! {}, Some(e)),
    };
    if q.fragment == Some(1) {
        // The live update swaps `#list` only: the filter form keeps its focus and text.
        return Ok(maud_html(list));
    }
    let body = html! {
        h1 { "Machines" }
        (filter_form(&q, error.as_deref()))
        @if session.may(TokenScope::Operator) { (bulk_bar()) }
        div #list aria-live="polite" { (list) }
    };
    Ok(layout("Machines", "machines", &session, after, body))
}

pub fn is_busy(s: Status) -> bool {
    crate::lifecycle::failure_on_timeout(s).is_some()
}

fn filter_form(q: &ListQuery, error: Option<&str>) -> Markup {
    let field = error.and_then(|e| e.split_once(':')).map(|(f, _)| f.trim());
    html! {
        form #filter method="get" action="/ui/machines" role="search" {
            label { span .sr { "Search" }
                input type="search" name="q" value=[q.q.as_deref()] placeholder="hostname, MAC or id" autocomplete="off"; }
            label { "Status "
                select name="status" {
                    option value="" { "any" }
                    @for st in Status::ALL {
                        option value=(st.as_str()) selected[q.status.as_deref() == Some(st.as_str())] { (st.as_str().replace('_', " ")) }
                    }
                }
            }
            label { "Power "
                select name="power" {
                    option value="" { "any" }
                    @for p in PowerState::ALL {
                        option value=(p.as_str()) selected[q.power.as_deref() == Some(p.as_str())] { (p.as_str()) }
                    }
                }
            }
            label { "Tag " input name="tag" size="10" value=[q.tag.as_deref()]; }
            label { "Per page "
                select name="per_page" {
                    @for n in PER_PAGE_CHOICES {
                        option value=(n) selected[q.per_page() == *n] { (n) }
                    }
                }
            }
            @if let Some(s) = &q.sort { input type="hidden" name="sort" value=(s); }
            @if let Some(o) = &q.order { input type="hidden" name="order" value=(o); }
            button type="submit" { "Filter" }
            @if let Some(e) = error {
                p .form-error role="alert" { (e) }
                @if let Some(f) = field { span .field-error data-field=(f) { (e) } }
            }
        }
    }
}

fn bulk_bar() -> Markup {
    html! {
        div #bulk role="toolbar" aria-label="Actions on the selected machines" {
            span #bulk-count { "0 selected" }
            button type="button" data-bulk="commission" { "Commission" }
            button type="button" data-bulk="deploy" { "Deploy" }
            button type="button" data-bulk="release" { "Release" }
            button type="button" data-bulk="power-on" { "Power on" }
            button type="button" data-bulk="power-off" { "Power off" }
            button type="button" data-bulk="mark-broken" { "Mark broken" }
            span #bulk-result role="status" {}
        }
    }
}

fn sort_link(q: &ListQuery, key: &str, label: &str) -> Markup {
    let current = q.sort.as_deref().unwrap_or("created") == key;
    let desc = q.order.as_deref() == Some("desc");
    let next = if current && !desc { "desc" } else { "asc" };
    let href = q.with(&[
        ("sort", Some(key.to_string())),
        ("order", Some(next.to_string())),
        ("page", None),
    ]);
    let aria = current.then_some(if desc { "descending" } else { "ascending" });
    html! {
        th scope="col" aria-sort=[aria] {
            a href=(href) { (label) @if current { (if desc { " ▼" } else { " ▲" }) } }
        }
    }
}

fn list(
    q: &ListQuery,
    total: u64,
    machines: &[MachineSummary],
    steps: &HashMap<String, EventRecord>,
    session: &Session,
) -> Markup {
    let per = q.per_page();
    let pages = total.div_ceil(per).max(1);
    let page = q.page().min(pages);
    let now = now_ms();
    html! {
        p #machine-count { (total) (if total == 1 { " machine" } else { " machines" }) }
        div .table-wrap {
            table #machines {
                thead {
                    tr {
                        th scope="col" {
                            @if session.may(TokenScope::Operator) {
                                input #select-all type="checkbox" aria-label="Select every machine on this page";
                            }
                        }
                        (sort_link(q, "hostname", "Hostname"))
                        (sort_link(q, "status", "Status"))
                        (sort_link(q, "power", "Power"))
                        th scope="col" { "MACs" }
                        th scope="col" { "Hardware" }
                        th scope="col" { "Step" }
                    }
                }
                tbody {
                    @for m in machines { (row(m, steps.get(&m.id), now, session)) }
                }
            }
        }
        @if machines.is_empty() { p .empty { "No machine matches." } }
        nav #pager aria-label="Pages" {
            @if page > 1 {
                a rel="prev" href=(q.with(&[("page", Some((page - 1).to_string()))])) { "← Previous" }
            }
            span { "Page " (page) " of " (pages) }
            @if page < pages {
                a rel="next" href=(q.with(&[("page", Some((page + 1).to_string()))])) { "Next →" }
            }
        }
    }
}

/// A hardware summary: `2 CPU · 1.0 GiB · 2 disks 40.0 GiB`.
pub fn hardware(h: Option<&HardwareSummary>) -> String {
    let Some(h) = h else {
        return String::new();
    };
    let disks = match h.disks {
        0 => "no disk".to_string(),
        1 => format!("1 disk {}", bytes(h.disk_bytes)),
        n => format!("{n} disks {}", bytes(h.disk_bytes)),
    };
    format!("{} CPU · {} · {disks}", h.cpus, bytes(h.memory_bytes))
}

/// The percentage in an agent progress line (`image Progress (45%): ...`).
pub fn progress_of(message: &str) -> Option<u32> {
    let (_, rest) = message.split_once(" Progress (")?;
    let (pct, _) = rest.split_once("%)")?;
    pct.trim().parse().ok()
}

fn row(m: &MachineSummary, step: Option<&EventRecord>, now: i64, session: &Session) -> Markup {
    let name = m.hostname.clone().unwrap_or_else(|| m.id.clone());
    let power = m.power_state.unwrap_or(PowerState::Unknown);
    html! {
        tr .machine data-machine-id=(m.id) data-status=(m.status.as_str()) {
            td {
                @if session.may(TokenScope::Operator) {
                    input .select type="checkbox" value=(m.id) aria-label={ "Select " (name) };
                }
            }
            td .hostname { a href={ "/ui/machines/" (m.id) } { (name) } }
            td .status {
                span class={ "badge status-" (m.status.as_str()) } { (m.status.as_str().replace('_', " ")) }
                @if let Some(msg) = m.status_message.as_ref().filter(|_| is_failed(m.status)) {
                    span .why title=(msg) { (msg.lines().next().unwrap_or("")) }
                }
            }
            td .power {
                span class={ "power power-" (power.as_str()) } { (power.as_str()) }
                small { " " (m.power_driver) }
            }
            td .macs {
                @if let Some(first) = m.macs.first() { code { (first) } }
                @if m.macs.len() > 1 { small { " +" (m.macs.len() - 1) } }
            }
            td .hw { (hardware(m.hardware.as_ref())) }
            td .step {
                @if is_busy(m.status) {
                    span .elapsed { (duration(now - m.status_since)) }
                    @if let Some(e) = step {
                        " · " span .msg { (e.message.chars().take(80).collect::<String>()) }
                        @if let Some(p) = progress_of(&e.message) {
                            progress max="100" value=(p) { (p) "%" }
                        }
                    } @else if let Some(s) = &m.heartbeat_step {
                        " · " span .msg { (s) }
                    }
                }
            }
        }
    }
}

pub fn is_failed(s: Status) -> bool {
    matches!(
        s,
        Status::FailedCommissioning
            | Status::FailedDeployment
            | Status::FailedReleasing
            | Status::Broken
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_read_from_an_agent_line() {
        assert_eq!(progress_of("image Progress (45%): 512 MiB"), Some(45));
        assert_eq!(progress_of("image Started: x"), None);
    }

    #[test]
    fn links_keep_the_filter_and_change_one_thing() {
        let q = ListQuery {
            status: Some("ready".into()),
            q: Some("a b".into()),
            page: Some(3),
            ..ListQuery::default()
        };
        let next = q.with(&[("page", Some("4".into()))]);
        assert_eq!(next, "/ui/machines?q=a%20b&status=ready&page=4");
        assert_eq!(
            q.with(&[("page", None)]),
            "/ui/machines?q=a%20b&status=ready"
        );
    }
}
