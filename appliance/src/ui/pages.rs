//! The pages beside the machines: images, SSH keys, tokens, DHCP leases, stats. Each lists
//! what the API lists; its forms go to the API through the page script.

use axum::extract::State;
use maud::html;
use stork_proto::api::TokenScope;

use super::{Session, UiResult, field_error, layout, when};
use crate::http::AppState;

pub async fn images(State(s): State<AppState>, session: Session) -> UiResult {
    let after = s.controller.last_event_id().await?;
    let resources = s.controller.boot_resources().await?;
    let body = html! {
        h1 { "Images" }
        p .help { "Boot resources this appliance serves. Add one with " code { "stork image import" } " or " code { "stork image register" } "." }
        div .table-wrap { table #images {
            thead { tr { th { "Name" } th { "Kind" } th { "Arch" } th { "Files" } } }
            tbody { @for r in &resources { tr {
                td { (r.name) } td { (r.kind) } td { (r.arch.as_deref().unwrap_or("")) }
                td { ul .files { @for f in &r.files { li {
                    code { (f.path) } " · " (format!("{:?}", f.role).to_lowercase())
                    " · " (super::bytes(f.size))
                    " · " small title=(f.sha256) { "sha256 " (f.sha256.get(..12).unwrap_or(&f.sha256)) "…" }
                } } } }
            } } }
        } }
        @if resources.is_empty() { p .empty { "No image yet." } }
    };
    Ok(layout("Images", "images", &session, after, body))
}

pub async fn keys(State(s): State<AppState>, session: Session) -> UiResult {
    let after = s.controller.last_event_id().await?;
    let keys = s.controller.ssh_keys().await?;
    let operator = session.may(TokenScope::Operator);
    let body = html! {
        h1 { "SSH keys" }
        p .help { "Every deploy installs these keys for the default user, beside the deploy's own." }
        div .table-wrap { table #keys {
            thead { tr { th { "Name" } th { "Key" } th { "Added" } th {} } }
            tbody { @for k in &keys { tr data-key-id=(k.id) {
                td { (k.name) }
                td { code .key title=(k.key) { (k.key.chars().take(48).collect::<String>()) "…" } }
                td { (when(k.created_at)) }
                td { @if operator { button type="button" .danger data-delete-key=(k.id) { "Delete" } } }
            } } }
        } }
        @if operator {
            section .card {
                h2 { "Add a key" }
                form #key-form novalidate {
                    label { "Name" input name="name" required autocomplete="off"; (field_error("name")) }
                    label { "Public key" textarea name="key" rows="3" required spellcheck="false" placeholder="ssh-ed25519 AAAA... you@laptop" {} (field_error("key")) }
                    p .form-error role="alert" {}
                    button type="submit" { "Add" }
                }
            }
        }
    };
    Ok(layout("SSH keys", "keys", &session, after, body))
}

pub async fn tokens(State(s): State<AppState>, session: Session) -> UiResult {
    let after = s.controller.last_event_id().await?;
    let admin = session.may(TokenScope::Admin);
    let tokens = if admin {
        s.controller.tokens().await?
    } else {
        Vec::new()
    };
    let now = crate::store::now_ms();
    let body = html! {
        h1 { "API tokens" }
        @if !admin {
            p .notice { "Only an admin token lists and manages tokens." }
        } @else {
            div .table-wrap { table #tokens {
                thead { tr { th { "Id" } th { "Description" } th { "Scope" } th { "Created" } th { "State" } th {} } }
                tbody { @for t in &tokens { tr data-token-id=(t.id) {
                    td { code { (t.id) } @if t.id == session.token_id { " " small { "(this session)" } } }
                    td { (t.description) } td { (t.scope.as_str()) } td { (when(t.created_at)) }
                    td {
                        @if let Some(at) = t.revoked_at { "revoked " (when(at)) }
                        @else if !t.live_at(now) { "expired" }
                        @else if let Some(at) = t.expires_at { "expires " (when(at)) }
                        @else { "live" }
                    }
                    td { @if t.revoked_at.is_none() { button type="button" .danger data-revoke=(t.id) { "Revoke" } } }
                } } }
            } }
            section .card {
                h2 { "Create a token" }
                form #token-form novalidate {
                    label { "Description" input name="description" autocomplete="off"; (field_error("description")) }
                    label { "Scope"
                        select name="scope" {
                            @for sc in TokenScope::ALL { option value=(sc.as_str()) selected[sc == TokenScope::ReadOnly] { (sc.as_str()) } }
                        }
                        (field_error("scope"))
                    }
                    label { "Expires after (seconds, empty: never)" input name="expires_in_secs" inputmode="numeric" autocomplete="off"; (field_error("expires_in_secs")) }
                    p .form-error role="alert" {}
                    button type="submit" { "Create" }
                }
                div #new-token hidden {
                    p { "The new token, shown this once:" }
                    code #new-token-value {}
                }
            }
        }
    };
    Ok(layout("Tokens", "tokens", &session, after, body))
}

pub async fn leases(State(s): State<AppState>, session: Session) -> UiResult {
    let after = s.controller.last_event_id().await?;
    let leases = s.leases.all();
    let now = crate::dhcp::journal::unix_secs(std::time::SystemTime::now());
    let mut rows = Vec::with_capacity(leases.len());
    for (mac, ip, expires) in leases {
        let machine = s.controller.machine(&mac.to_string()).await.ok();
        rows.push((mac, ip, expires, machine));
    }
    let body = html! {
        h1 { "DHCP leases" }
        @if !s.cfg.dhcp.serves() || s.cfg.dhcp.proxies() {
            p .notice { "This appliance does not lease addresses (DHCP is off or a proxy): another server does." }
        }
        div .table-wrap { table #leases {
            thead { tr { th { "Address" } th { "MAC" } th { "Machine" } th { "Expires" } } }
            tbody { @for (mac, ip, expires, m) in &rows { tr {
                td { code { (ip) } } td { code { (mac) } }
                td { @if let Some(m) = m { a href={ "/ui/machines/" (m.id) } { (m.hostname.clone().unwrap_or_else(|| m.id.clone())) } } }
                td { @if *expires <= now { "expired" } @else { (super::duration(i64::try_from((expires - now) * 1000).unwrap_or(i64::MAX))) } }
            } } }
        } }
        @if rows.is_empty() { p .empty { "No lease." } }
    };
    Ok(layout("Leases", "leases", &session, after, body))
}

pub async fn stats(State(s): State<AppState>, session: Session) -> UiResult {
    let after = s.controller.last_event_id().await?;
    let health = s.health.report();
    let services = [
        (
            "dhcp",
            crate::http::openapi::counter_map(s.dhcp_stats.snapshot()),
        ),
        (
            "tftp",
            crate::http::openapi::counter_map(s.tftp_stats.snapshot()),
        ),
        (
            "http",
            crate::http::openapi::counter_map(s.http_stats.snapshot()),
        ),
        (
            "dhcp6",
            crate::http::openapi::counter_map(s.dhcp6_stats.snapshot()),
        ),
    ];
    let body = html! {
        h1 { "Stats" }
        p { "Health: " strong #health { (health.status) } }
        div .table-wrap { table #services .stats {
            thead { tr { th { "Service" } th { "State" } th { "Restarts" } th { "Last error" } } }
            tbody { @for (name, h) in &health.services { tr {
                td { (name) } td { (format!("{:?}", h.state).to_lowercase()) } td { (h.restarts) }
                td { (h.last_error.as_deref().unwrap_or("")) }
            } } }
        } }
        div .cards {
            @for (name, counters) in &services {
                section .card {
                    h2 { (name) }
                    table .stats data-service=(name) {
                        tbody { @for (k, v) in counters { tr { th scope="row" { (k.replace('_', " ")) } td .num { (v) } } } }
                    }
                }
            }
        }
    };
    Ok(layout("Stats", "stats", &session, after, body))
}
