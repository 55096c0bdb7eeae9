//! The web UI under `/ui`: server-rendered HTML (maud) on the API's own listener, with one
//! small script of ours (`assets/ui.js`) for live updates and for sending forms to the JSON
//! API. No Node build and nothing fetched from elsewhere: the assets are compiled in.
//! `docs/ui.md` says why this shape.
//!
//! A session is the API token the user logged in with, kept in an HttpOnly, Secure,
//! SameSite=Strict cookie and checked on every request like a bearer token: a revoked or
//! expired token ends the session at the next click. Changes go through the API itself
//! (the cookie plus the `x-stork-ui` header, see `http::extract`), so the UI can do nothing
//! the API would refuse, and every refusal names its field the way the API's errors do.

mod login;
mod machine;
mod machines;
mod pages;
pub mod timeline;

use axum::Router;
use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use stork_proto::api::TokenScope;

use crate::http::AppState;
use crate::http::extract::session_token;
use crate::store::now_ms;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/machines") }))
        .route("/login", get(login::page).post(login::submit))
        .route("/logout", post(login::logout))
        .route("/machines", get(machines::page))
        .route("/machines/{id}", get(machine::page))
        .route("/images", get(pages::images))
        .route("/keys", get(pages::keys))
        .route("/tokens", get(pages::tokens))
        .route("/leases", get(pages::leases))
        .route("/stats", get(pages::stats))
        .route("/assets/ui.css", get(css))
        .route("/assets/ui.js", get(js))
}

const CSS: &str = include_str!("assets/ui.css");
const JS: &str = include_str!("assets/ui.js");

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            // Assets change only with the binary; an hour keeps reloads cheap.
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", CSS)
}

async fn js() -> Response {
    asset("text/javascript; charset=utf-8", JS)
}

/// A logged-in user: the live API token of the session cookie.
pub struct Session {
    /// The token's id (its hash's first 12 hex digits), shown in the header.
    pub token_id: String,
    pub scope: TokenScope,
}

impl Session {
    /// Whether the session's token may do what `need` allows: the UI shows only the actions
    /// the API would take.
    pub fn may(&self, need: TokenScope) -> bool {
        self.scope.allows(need)
    }
}

/// Why there is no session: the login page says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSession {
    Login,
    Expired,
    Revoked,
}

impl NoSession {
    fn as_str(self) -> &'static str {
        match self {
            NoSession::Login => "login",
            NoSession::Expired => "expired",
            NoSession::Revoked => "revoked",
        }
    }
}

impl IntoResponse for NoSession {
    fn into_response(self) -> Response {
        let mut r = Redirect::to(&format!("/ui/login?why={}", self.as_str())).into_response();
        // A dead session's cookie goes too.
        r.headers_mut()
            .insert(header::SET_COOKIE, HeaderValue::from_static(CLEAR_COOKIE));
        r
    }
}

const CLEAR_COOKIE: &str = "stork_session=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0";

/// The token's record if it may log in: live and not an agent's.
async fn check_token(state: &AppState, token: &str) -> Result<Session, NoSession> {
    let rec = state
        .controller
        .admin_token(crate::auth::hash(token))
        .await
        .map_err(|_| NoSession::Login)?
        .ok_or(NoSession::Login)?;
    if rec.revoked_at.is_some() {
        return Err(NoSession::Revoked);
    }
    if !rec.live_at(now_ms()) {
        return Err(NoSession::Expired);
    }
    Ok(Session {
        token_id: rec.id,
        scope: rec.scope,
    })
}

impl<S: Send + Sync> FromRequestParts<S> for Session
where
    AppState: FromRef<S>,
{
    type Rejection = NoSession;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, NoSession> {
        let state = AppState::from_ref(state);
        let token = session_token(&parts.headers).ok_or(NoSession::Login)?;
        check_token(&state, token).await
    }
}

/// A UI answer that is not a page: an error page with its status.
pub struct UiError(StatusCode, String);

impl<E: std::fmt::Display> From<E> for UiError {
    fn from(e: E) -> Self {
        UiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let body = html! {
            (DOCTYPE)
            html lang="en" {
                (head("Error", false))
                body data-page="error" {
                    main #main { h1 { "Something went wrong" } p .form-error { (self.1) } p { a href="/ui/machines" { "Back to the machines" } } }
                }
            }
        };
        (self.0, maud_html(body)).into_response()
    }
}

pub type UiResult = Result<Response, UiError>;

fn maud_html(m: Markup) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Pages hold live data: never from a cache.
            (header::CACHE_CONTROL, "no-store"),
        ],
        m.into_string(),
    )
        .into_response()
}

/// A page's `<head>`; `script`: the live-update script (not on the login page).
pub fn head(title: &str, script: bool) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            meta name="color-scheme" content="light dark";
            title { (title) " · Stork" }
            // No icon to fetch: nothing to 404 in the console.
            link rel="icon" href="data:,";
            link rel="stylesheet" href="/ui/assets/ui.css";
            @if script { script src="/ui/assets/ui.js" defer {} }
        }
    }
}

/// The pages a user moves between, in the navigation's order.
const NAV: &[(&str, &str)] = &[
    ("machines", "Machines"),
    ("images", "Images"),
    ("keys", "SSH keys"),
    ("tokens", "Tokens"),
    ("leases", "Leases"),
    ("stats", "Stats"),
];

/// A whole page: header, navigation and `body`. `after` is the newest event id when the
/// page was rendered: its live stream starts there.
pub fn layout(title: &str, name: &str, s: &Session, after: i64, body: Markup) -> Response {
    maud_html(html! {
        (DOCTYPE)
        html lang="en" {
            (head(title, true))
            body data-page=(name) data-after=(after) data-scope=(s.scope.as_str()) {
                a .skip href="#main" { "Skip to the content" }
                header .top {
                    a .brand href="/ui/machines" { "Stork" }
                    nav #nav aria-label="Pages" {
                        @for (key, label) in NAV {
                            a data-nav=(key) href={ "/ui/" (key) }
                                aria-current=[(*key == name).then_some("page")] { (label) }
                        }
                    }
                    span #live data-state="connecting" title="Live updates" { span .dot {} span .label { "connecting" } }
                    span .who title="The token of this session" { (s.token_id) " · " (s.scope.as_str()) }
                    form method="post" action="/ui/logout" { button #logout type="submit" { "Log out" } }
                }
                main #main { (body) }
            }
        }
    })
}

/// A date and time from milliseconds since the epoch, in UTC (the appliance's clock).
pub fn when(ms: i64) -> String {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000) else {
        return ms.to_string();
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// A short duration: `850 ms`, `12.3 s`, `4 min 05 s`, `2 h 03 min`.
pub fn duration(ms: i64) -> String {
    let ms = ms.max(0);
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{} min {:02} s", ms / 60_000, (ms / 1000) % 60),
        _ => format!("{} h {:02} min", ms / 3_600_000, (ms / 60_000) % 60),
    }
}

/// Bytes as people read disk and memory sizes (GiB, MiB).
pub fn bytes(n: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let f = n as f64;
    if f >= 1024.0 * GIB {
        format!("{:.1} TiB", f / GIB / 1024.0)
    } else if f >= GIB {
        format!("{:.1} GiB", f / GIB)
    } else {
        format!("{:.0} MiB", f / MIB)
    }
}

/// The error line of a form field, filled by the page script from the API's answer.
pub fn field_error(field: &str) -> Markup {
    html! { span .field-error data-field=(field) role="alert" {} }
}

/// Text the page script reads (JSON in a script element, never executed).
pub fn data_json(id: &str, value: &impl serde::Serialize) -> Markup {
    let text = serde_json::to_string(value).unwrap_or_else(|_| "null".into());
    // `<` escaped so the text cannot end the script element.
    html! { script type="application/json" id=(id) { (PreEscaped(text.replace('<', "\\u003c"))) } }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(duration(850), "850 ms");
        assert_eq!(duration(12_345), "12.3 s");
        assert_eq!(duration(245_000), "4 min 05 s");
        assert_eq!(duration(7_380_000), "2 h 03 min");
        assert_eq!(duration(-5), "0 ms");
    }

    #[test]
    fn sizes_and_times() {
        assert_eq!(bytes(2 << 30), "2.0 GiB");
        assert_eq!(bytes(960 << 20), "960 MiB");
        assert_eq!(when(0), "1970-01-01 00:00:00");
    }

    #[test]
    fn json_in_a_page_cannot_close_its_script() {
        let m = data_json("x", &"</script><b>").into_string();
        assert!(!m.contains("</script><b>"), "{m}");
    }
}
