//! Logging in with an API token, and out.

use axum::Form;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;

use super::{CLEAR_COOKIE, NoSession, check_token, head, maud_html};
use crate::http::AppState;
use crate::http::extract::SESSION_COOKIE;

#[derive(Deserialize, Default)]
pub struct Why {
    why: Option<String>,
}

#[derive(Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    token: String,
}

fn notice(why: Option<&str>) -> Option<&'static str> {
    match why? {
        "expired" => Some("Your token has expired: log in with a live one."),
        "revoked" => Some("Your token was revoked: log in with another."),
        "logged_out" => Some("You are logged out."),
        _ => None,
    }
}

fn login_page(notice: Option<&str>, error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head("Log in", false))
            body data-page="login" {
                main #main .login {
                    h1 { "Stork" }
                    @if let Some(n) = notice { p #login-notice .notice role="status" { (n) } }
                    form #login-form method="post" action="/ui/login" {
                        label for="token" { "API token" }
                        input #token type="password" name="token" autocomplete="current-password"
                            required autofocus aria-describedby="token-help";
                        span .field-error data-field="token" role="alert" { (error.unwrap_or("")) }
                        p #token-help .help {
                            "A token from " code { "stork token create" } ", or the admin token the appliance printed at its first start."
                        }
                        button #login-submit type="submit" { "Log in" }
                    }
                }
            }
        }
    }
}

pub async fn page(Query(q): Query<Why>) -> Response {
    maud_html(login_page(notice(q.why.as_deref()), None))
}

/// A form posted from another site is refused: browsers say where a request comes from.
fn cross_site(headers: &HeaderMap) -> bool {
    headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "cross-site")
}

pub async fn submit(
    State(s): State<AppState>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    if cross_site(&headers) {
        return StatusCode::FORBIDDEN.into_response();
    }
    let token = f.token.trim();
    let error = if token.is_empty() {
        "token: paste an API token".to_string()
    } else if token.len() > 256 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        "token: not a Stork token".to_string()
    } else {
        match check_token(&s, token).await {
            Ok(_) => {
                let mut r = Redirect::to("/ui/machines").into_response();
                // Secure whenever the UI is on HTTPS; an appliance with TLS off serves
                // it over plain HTTP, where a browser would drop a Secure cookie.
                let secure = if s.api_tls.is_some() { "; Secure" } else { "" };
                let cookie =
                    format!("{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict{secure}");
                if let Ok(v) = HeaderValue::from_str(&cookie) {
                    r.headers_mut().insert(header::SET_COOKIE, v);
                }
                return r;
            }
            Err(NoSession::Expired) => "token: this token has expired".to_string(),
            Err(NoSession::Revoked) => "token: this token was revoked".to_string(),
            Err(NoSession::Login) => "token: no such token".to_string(),
        }
    };
    let message = error.trim_start_matches("token: ");
    let mut r = maud_html(login_page(None, Some(message)));
    *r.status_mut() = StatusCode::UNAUTHORIZED;
    r
}

pub async fn logout(headers: HeaderMap) -> Response {
    if cross_site(&headers) {
        return StatusCode::FORBIDDEN.into_response();
    }
    let mut r = Redirect::to("/ui/login?why=logged_out").into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, HeaderValue::from_static(CLEAR_COOKIE));
    r
}
