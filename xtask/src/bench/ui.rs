//! `cargo xtask bench ui`: the web UI's machines page with 10,000 machines stored.
//!
//! A release `stork serve` on loopback (as `bench api` starts it: plain HTTP, DHCP off) with
//! machines enlisted through the API, each with a realistic inventory. Measured:
//! - the server: `GET /ui/machines` (first page of 50, a deep page sorted by hostname, a
//!   free-text search) beside the same page through the API (`GET /api/v1/machines?limit=50`)
//!   and the whole list through the API, p50/p99 from one keep-alive client;
//! - Chromium (headless, through WebDriver): navigation to the machines page until its first
//!   contentful paint and its load event, from the browser's own Navigation and Paint
//!   Timing, p50/p99;
//! - the live update: a machine's status changed through the API, until the page shows the
//!   new status in that machine's row (a MutationObserver in the page records when; the
//!   bench and the browser share this host's clock).
//!
//! The targets: first page rendered in under 300 ms, a status on screen under 1 s
//! after its event. Numbers are printed, never asserted. Knobs: `STORK_BENCH_MACHINES`
//! (10000), `STORK_BENCH_SECS` per server measurement (5), `STORK_BENCH_LOADS` browser page
//! loads (30), `STORK_BENCH_UPDATES` live updates (20).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use stork_lab::browser::Browser;

use super::api::{Measured, knob, measure, percentile, populate, report, start_server};

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// Logs in with `token` over the UI's form; returns the session cookie.
fn session_cookie(root: &str, token: &str) -> Result<String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();
    let r = agent
        .post(&format!("{root}/ui/login"))
        .send_form([("token", token)])?;
    let cookie = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::to_string)
        .with_context(|| format!("logging in: HTTP {} without a cookie", r.status()))?;
    Ok(cookie)
}

fn page_measure(
    window: Duration,
    url: String,
    cookie: Option<&str>,
    auth: Option<&str>,
) -> Result<Measured> {
    measure(1, window, |agent, _| {
        let mut req = agent.get(&url);
        if let Some(c) = cookie {
            req = req.header("Cookie", c);
        }
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let mut r = req.call()?;
        let body = r.body_mut().with_config().limit(1 << 30).read_to_vec()?;
        super::api::check(r.status().as_u16(), body.len())
    })
}

fn ms_list(v: &mut [f64]) -> String {
    v.sort_by(f64::total_cmp);
    let d: Vec<Duration> = v
        .iter()
        .map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1000.0))
        .collect();
    format!(
        "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} samples)",
        percentile(&d, 0.5).as_secs_f64() * 1000.0,
        percentile(&d, 0.99).as_secs_f64() * 1000.0,
        d.last().map_or(0.0, |x| x.as_secs_f64() * 1000.0),
        d.len()
    )
}

pub fn run() -> Result<()> {
    let machines = knob("STORK_BENCH_MACHINES", 10_000);
    let secs = knob("STORK_BENCH_SECS", 5) as u64;
    let loads = knob("STORK_BENCH_LOADS", 30);
    let updates = knob("STORK_BENCH_UPDATES", 20);

    let (mut server, root, token, dir) = start_server("bench-ui")?;
    crate::step(&format!("enlisting {machines} machines (8 clients)"));
    populate(&root, machines, 8)?;
    let cookie = session_cookie(&root, &token)?;
    let auth = format!("Bearer {token}");
    let window = Duration::from_secs(secs);

    crate::step("server: the machines page beside the API");
    for (what, path) in [
        ("UI  /ui/machines (first page, 50 rows)", "/ui/machines"),
        (
            "UI  /ui/machines (page 150 by hostname)",
            "/ui/machines?sort=hostname&page=150",
        ),
        (
            "UI  /ui/machines?q=<MAC part>",
            "/ui/machines?q=02%3A00%3A00%3A00%3A1",
        ),
    ] {
        let m = page_measure(window, format!("{root}{path}"), Some(&cookie), None)?;
        report(what, &m);
    }
    let m = page_measure(
        window,
        format!("{root}/api/v1/machines?limit=50"),
        None,
        Some(&auth),
    )?;
    report("API /api/v1/machines?limit=50", &m);
    let m = page_measure(window, format!("{root}/api/v1/machines"), None, Some(&auth))?;
    report(&format!("API /api/v1/machines (all {machines})"), &m);

    crate::step("Chromium: the machines page, navigation to first paint");
    let browser = Browser::start_here(&dir.join("browser"))?;
    browser.goto(&format!("{root}/ui/login"))?;
    browser.fill("#token", &token)?;
    browser.click("#login-submit")?;
    browser.wait_for_css("#machines", Duration::from_secs(30))?;
    let (mut ttfb, mut fcp, mut load) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..loads {
        browser.goto(&format!("{root}/ui/machines"))?;
        let t = browser.exec_js(
            "const n = performance.getEntriesByType('navigation')[0];
             const p = performance.getEntriesByType('paint')
                 .find((e) => e.name === 'first-contentful-paint');
             return [n.responseStart - n.startTime, p ? p.startTime : null, n.loadEventEnd - n.startTime];",
            vec![],
        )?;
        let at = |i: usize| t.get(i).and_then(Value::as_f64);
        ttfb.extend(at(0));
        load.extend(at(2));
        fcp.extend(at(1).or(at(2)));
    }
    println!("  first byte of the page:        {}", ms_list(&mut ttfb));
    println!(
        "  first contentful paint:        {}  (target < 300 ms)",
        ms_list(&mut fcp)
    );
    println!("  load event:                    {}", ms_list(&mut load));

    crate::step("Chromium: a status change until it shows in the row");
    browser.exec_js(
        "window.__seen = {};
         const look = () => document.querySelectorAll('tr.machine').forEach((tr) => {
             const k = tr.dataset.machineId + ':' + tr.dataset.status;
             if (!(k in window.__seen)) window.__seen[k] = Date.now();
         });
         look();
         new MutationObserver(look).observe(document.getElementById('list'), {childList: true, subtree: true});
         return true;",
        vec![],
    )?;
    // The machines the page shows (the oldest 50).
    let shown = browser.exec_js(
        "return Array.from(document.querySelectorAll('tr.machine')).map((tr) => tr.dataset.machineId);",
        vec![],
    )?;
    let ids: Vec<String> = serde_json::from_value(shown)?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut live = Vec::new();
    for (n, id) in ids.iter().take(updates.min(50)).enumerate() {
        let (action, shows) = if n % 2 == 0 {
            ("mark-broken", "broken")
        } else {
            ("commission", "commissioning")
        };
        let t0 = now_ms();
        let r = agent
            .post(&format!("{root}/api/v1/machines/{id}/{action}"))
            .header("Authorization", &auth)
            .send_json(serde_json::json!({}))?;
        if r.status() != 200 {
            bail!("{action} {id}: HTTP {}", r.status());
        }
        let key = format!("{id}:{shows}");
        let seen = browser.wait_js(
            "the new status in its row",
            &format!("return window.__seen[{key:?}] || null;"),
            Duration::from_secs(30),
        )?;
        live.push(seen.as_f64().unwrap_or(0.0) - t0);
    }
    println!(
        "  status on screen after its API call: {}  (target < 1000 ms)",
        ms_list(&mut live)
    );

    drop(browser);
    if let Some(st) = server.exited() {
        bail!("stork serve exited during the run ({st})");
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
