//! The web UI against the real `stork serve` (a child process), through curl: sessions and
//! their end, the cross-site rule for changes sent with the cookie, server-side paging,
//! sorting and filtering, and field-level errors. The browser itself is driven in
//! `tests/tests/web_ui.rs` (Chromium, with a QEMU machine).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Options, Server};
use stork_lab::wait_for;
use stork_proto::api::{NewMachine, NewToken, TokenScope};

/// One curl exchange: status, headers (lower-cased names) and body.
struct Answer {
    status: u16,
    headers: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim().eq_ignore_ascii_case(name)).then(|| v.trim().to_string())
        })
    }
}

/// `curl -k` (the test certificate is self-signed) with `args`; a cookie jar per test.
fn curl(jar: &std::path::Path, args: &[&str]) -> Answer {
    let out = Command::new("curl")
        .args(["-sk", "-D", "-", "-b"])
        .arg(jar)
        .arg("-c")
        .arg(jar)
        .args(args)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (headers, body) = text
        .split_once("\r\n\r\n")
        .map(|(h, b)| (h.to_string(), b.to_string()))
        .unwrap_or((text.clone(), String::new()));
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Answer {
        status,
        headers,
        body,
    }
}

struct Ui {
    server: Server,
    jar: tempfile::TempPath,
}

impl Ui {
    fn start() -> Self {
        let server = Server::start(Options::default());
        let jar = tempfile::NamedTempFile::new()
            .expect("jar")
            .into_temp_path();
        Self { server, jar }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.base())
    }

    fn get(&self, path: &str) -> Answer {
        curl(&self.jar, &[&self.url(path)])
    }

    fn login(&self, token: &str) -> Answer {
        curl(
            &self.jar,
            &[
                "--data-urlencode",
                &format!("token={token}"),
                &self.url("/ui/login"),
            ],
        )
    }

    /// A JSON API call with the session cookie, as the page script makes it.
    fn api(&self, method: &str, path: &str, body: &str, ui_header: bool) -> Answer {
        let mut args = vec![
            "-X",
            method,
            "-H",
            "content-type: application/json",
            "--data",
            body,
        ];
        if ui_header {
            args.extend(["-H", "x-stork-ui: 1"]);
        }
        let url = self.url(&format!("/api/v1{path}"));
        args.push(&url);
        curl(&self.jar, &args)
    }
}

fn add_machines(s: &Server, n: u32) -> Vec<String> {
    let c = s.client();
    (0..n)
        .map(|i| {
            c.create_machine(&NewMachine {
                macs: vec![common::mac_addr(i + 1)],
                hostname: Some(format!("host-{i:02}")),
                ..NewMachine::default()
            })
            .expect("add a machine")
            .id
        })
        .collect()
}

fn rows(html: &str) -> usize {
    html.matches("<tr class=\"machine\"").count()
}

#[test]
fn a_session_begins_with_a_token_and_ends_when_the_token_does() {
    let ui = Ui::start();
    // No session: to the login page, saying why.
    let a = ui.get("/ui/machines");
    assert_eq!(a.status, 303, "{}", a.headers);
    assert!(
        a.header("location")
            .unwrap()
            .ends_with("/ui/login?why=login")
    );

    // A wrong token is named at its field, and no cookie is set.
    let a = ui.login("stork_admin_nope");
    assert_eq!(a.status, 401);
    assert!(
        a.body.contains(
            r#"<span class="field-error" data-field="token" role="alert">no such token</span>"#
        ),
        "{}",
        a.body
    );
    assert!(a.header("set-cookie").is_none());
    assert!(ui.login("").body.contains("paste an API token"));

    // The right one: a cookie the page script cannot read, sent only to this site, over TLS.
    let a = ui.login(&ui.server.token);
    assert_eq!(a.status, 303);
    let cookie = a.header("set-cookie").expect("a session cookie");
    for want in ["stork_session=", "HttpOnly", "SameSite=Strict", "Secure"] {
        assert!(cookie.contains(want), "{cookie}");
    }
    for (path, page) in [
        ("/ui/machines", "machines"),
        ("/ui/images", "images"),
        ("/ui/keys", "keys"),
        ("/ui/tokens", "tokens"),
        ("/ui/leases", "leases"),
        ("/ui/stats", "stats"),
    ] {
        let a = ui.get(path);
        assert_eq!(a.status, 200, "{path}: {}", a.body);
        assert!(
            a.body.contains(&format!("data-page=\"{page}\"")),
            "{path}: {}",
            a.body
        );
        assert_eq!(a.header("cache-control").as_deref(), Some("no-store"));
    }
    assert_eq!(ui.get("/ui/machines/nosuchmachine").status, 404);

    // Logging out clears the cookie.
    let a = curl(&ui.jar, &["-X", "POST", &ui.url("/ui/logout")]);
    assert!(a.header("location").unwrap().ends_with("why=logged_out"));
    assert_eq!(ui.get("/ui/machines").status, 303);

    // A revoked token ends its session at the next request.
    let c = ui.server.client();
    let (rec, token) = {
        let t = c
            .create_token(&NewToken {
                description: "ui".into(),
                scope: TokenScope::Operator,
                expires_in_secs: None,
            })
            .expect("token");
        (t.record, t.token)
    };
    assert_eq!(ui.login(&token).status, 303);
    assert_eq!(ui.get("/ui/machines").status, 200);
    c.revoke_token(&rec.id).expect("revoke");
    let a = ui.get("/ui/machines");
    assert!(
        a.header("location").unwrap().ends_with("why=revoked"),
        "{}",
        a.headers
    );

    // An expiring one, at its expiry.
    let t = c
        .create_token(&NewToken {
            description: "short".into(),
            scope: TokenScope::ReadOnly,
            expires_in_secs: Some(1),
        })
        .expect("token");
    assert_eq!(ui.login(&t.token).status, 303);
    wait_for(
        "the session to expire",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            let a = ui.get("/ui/machines");
            Ok(a.header("location")
                .filter(|l| l.ends_with("why=expired"))
                .map(drop))
        },
    )
    .unwrap();
}

#[test]
fn changes_with_the_cookie_need_the_ui_header_and_bad_fields_are_named() {
    let ui = Ui::start();
    assert_eq!(ui.login(&ui.server.token).status, 303);
    let body = r#"{"macs":["52:54:00:00:10:01"]}"#;
    // A cross-site form can carry a cookie but not a custom header.
    let a = ui.api("POST", "/machines", body, false);
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.body.contains("x-stork-ui"), "{}", a.body);
    let a = ui.api("POST", "/machines", body, true);
    assert_eq!(a.status, 201, "{}", a.body);
    let id: String = serde_json::from_str::<serde_json::Value>(&a.body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Reads need no header.
    assert_eq!(
        curl(&ui.jar, &[&ui.url(&format!("/api/v1/machines/{id}"))]).status,
        200
    );

    // The deploy form is checked with `dry_run` before the page script allocates a Ready
    // machine: a bad field is a 400 that names it, a good request changes nothing.
    let deploy = |json: &str, dry: bool| {
        let q = if dry { "?dry_run=true" } else { "" };
        ui.api("POST", &format!("/machines/{id}/deploy{q}"), json, true)
    };
    for (json, field) in [
        (r#"{"image":"x","hostname":"bad_host!"}"#, "hostname: "),
        (r#"{"image":"x","ssh_keys":["not a key"]}"#, "ssh_keys[0]: "),
        (r#"{"image":"x","disk":"sda\nsdb"}"#, "disk: "),
        (r#"{"image":"x","target":"floppy"}"#, "target: "),
        (r#"{"hostname":"a"}"#, "missing field `image`"),
        (r#"{"image":"nosuch"}"#, "image: "),
    ] {
        let a = deploy(json, true);
        assert_eq!(a.status, 400, "{json}: {}", a.body);
        assert!(a.body.contains(field), "{json}: {}", a.body);
    }
    ui.server.register_image(b"tar");
    let a = deploy(r#"{"image":"debian-12","layout":{"esp_mib":1}}"#, true);
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(a.body.contains("layout.esp_mib: "), "{}", a.body);
    let good = r#"{"image":"debian-12","hostname":"good-host"}"#;
    let before = ui.server.client().machine_events(&id, 0).unwrap().len();
    let a = deploy(good, true);
    assert_eq!(a.status, 200, "{}", a.body);
    let c = ui.server.client();
    assert_eq!(c.machine(&id).unwrap().status.as_str(), "new");
    assert_eq!(c.machine_events(&id, 0).unwrap().len(), before);
    // Without it, the lifecycle answers.
    let a = deploy(good, false);
    assert_eq!(a.status, 409, "{}", a.body);
    assert!(a.body.contains("illegal_transition"), "{}", a.body);
}

#[test]
fn the_machine_list_is_paged_sorted_and_filtered_by_the_store() {
    let ui = Ui::start();
    assert_eq!(ui.login(&ui.server.token).status, 303);
    let ids = add_machines(&ui.server, 30);

    let a = ui.get("/ui/machines?per_page=25");
    assert_eq!(rows(&a.body), 25);
    assert!(a.body.contains("30 machines"), "{}", a.body);
    assert!(a.body.contains("Page 1 of 2"));
    assert_eq!(rows(&ui.get("/ui/machines?per_page=25&page=2").body), 5);

    let a = ui.get("/ui/machines?sort=hostname&order=desc&per_page=25");
    let first = a.body.find("host-29").expect("host-29 listed");
    assert!(first < a.body.find("host-28").unwrap());

    let a = ui.get("/ui/machines?q=HOST-07");
    assert_eq!(rows(&a.body), 1, "{}", a.body);
    assert!(a.body.contains(&ids[7]));
    // A MAC, or part of one, finds its machine.
    let a = ui.get("/ui/machines?q=00%3A00%3A0b");
    assert_eq!(rows(&a.body), 1, "{}", a.body);
    assert!(a.body.contains("host-10"));
    assert_eq!(
        rows(&ui.get("/ui/machines?status=new&power=unknown").body),
        30
    );
    assert_eq!(rows(&ui.get("/ui/machines?status=ready").body), 0);
    // A filter without an argument (power unknown) between two with one.
    let a = ui.get("/ui/machines?status=new&power=unknown&q=host-1");
    assert_eq!(rows(&a.body), 10, "{}", a.body);
    // A LIKE wildcard is a literal.
    assert_eq!(rows(&ui.get("/ui/machines?q=%25").body), 0);

    // A value no select offers is named.
    let a = ui.get("/ui/machines?status=sleeping");
    assert!(a.body.contains("status: unknown status"), "{}", a.body);

    // The live update's fragment: the list alone.
    let a = ui.get("/ui/machines?fragment=1&per_page=5");
    assert!(!a.body.contains("<html"));
    assert_eq!(rows(&a.body), 5);

    // The API pages with the same query.
    let a = curl(
        &ui.jar,
        &[&ui.url("/api/v1/machines?sort=hostname&offset=25&limit=10")],
    );
    assert_eq!(a.header("x-total-count").as_deref(), Some("30"));
    let page: Vec<serde_json::Value> = serde_json::from_str(&a.body).unwrap();
    assert_eq!(page.len(), 5);
    assert_eq!(page[0]["hostname"], "host-25");
    // The same page as summaries: the same machines, without inventory or power parameters.
    let a = curl(
        &ui.jar,
        &[&ui.url("/api/v1/machines?sort=hostname&offset=25&limit=10&view=summary")],
    );
    assert_eq!(a.header("x-total-count").as_deref(), Some("30"));
    let summaries: Vec<serde_json::Value> = serde_json::from_str(&a.body).unwrap();
    let ids_of = |v: &[serde_json::Value]| -> Vec<String> {
        v.iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids_of(&summaries), ids_of(&page));
    assert_eq!(summaries[0]["macs"], page[0]["macs"]);
    assert_eq!(summaries[0]["power_driver"], page[0]["power"]["driver"]);
    assert!(summaries[0].get("inventory").is_none() && summaries[0].get("power").is_none());
    let a = curl(&ui.jar, &[&ui.url("/api/v1/machines?view=tiny")]);
    assert_eq!(a.status, 400);
    assert!(a.body.contains("view: "), "{}", a.body);
    let a = curl(&ui.jar, &[&ui.url("/api/v1/machines?sort=size")]);
    assert_eq!(a.status, 400);
    assert!(a.body.contains("sort: "), "{}", a.body);
}

#[test]
fn the_ui_is_https_only_when_https_is_on() {
    let ui = Ui::start();
    let plain = format!("{}/ui/machines?x=1", ui.server.plain_base());
    let a = curl(&ui.jar, &[&plain]);
    assert_eq!(a.status, 308, "{}", a.headers);
    let to = a.header("location").unwrap();
    assert!(to.starts_with("https://"), "{to}");
    assert!(to.ends_with("/ui/machines?x=1"), "{to}");
}
