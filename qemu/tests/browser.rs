//! The browser harness against a page served inside a lab namespace: headless Chromium
//! reaches what only the namespace can reach, clicks, reads what a script changed later,
//! sees console errors, takes a screenshot, and leaves no process behind.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::json;
use stork_lab::bmc::in_namespace;
use stork_lab::{Browser, Lab};

/// A button whose click changes a text a moment later (so reading it must wait) and logs a
/// console error. The empty icon keeps Chromium from asking for /favicon.ico.
const PAGE: &str = r#"<!doctype html>
<html><head><title>stork browser check</title><link rel="icon" href="data:,"></head>
<body>
<p id="greeting">not clicked</p>
<input id="name" value="old">
<select id="colour"><option value="red">Red</option><option value="blue">Blue</option></select>
<button id="go" onclick="setTimeout(() => {
  document.getElementById('greeting').textContent = 'clicked by ' + document.getElementById('name').value;
  console.error('stork-console-check');
}, 300)">Go</button>
</body></html>
"#;

/// Answers every request with [`PAGE`], one connection at a time; the listener was bound
/// inside the namespace, so only the namespace reaches it (the thread may be anywhere).
fn serve(listener: TcpListener) {
    for stream in listener.incoming().flatten() {
        let _ = answer(stream);
    }
}

fn answer(mut stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    // The request line and headers, up to the blank line.
    while reader.read_line(&mut line)? > 0 && line != "\r\n" {
        line.clear();
    }
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{PAGE}",
        PAGE.len()
    )
}

/// Processes in `netns` whose name starts with `chrom` (chromedriver, Chromium).
fn chrome_processes(netns: &str) -> Result<Vec<String>> {
    let pids = stork_lab::run(Command::new("ip").args(["netns", "pids", netns]))?;
    Ok(pids
        .split_whitespace()
        .filter_map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            comm.starts_with("chrom")
                .then(|| format!("{pid} {}", comm.trim()))
        })
        .collect())
}

#[test]
#[ignore = "needs root and chromium: run cargo xtask test"]
fn chromium_in_the_lab_namespace_clicks_reads_a_live_change_and_takes_a_screenshot() {
    let base = std::env::temp_dir().join("stork-browser-test");
    let lab = Lab::new("browser", &base).unwrap();
    let listener = in_namespace(lab.netns(), || TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    std::thread::spawn(move || serve(listener));
    // The page is not reachable from here, only from inside the namespace.
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err(),
        "{addr} answers outside the lab's namespace: the test would prove nothing"
    );

    let shots = lab.dir().join("screenshots");
    let browser = Browser::start(lab.netns(), &shots).unwrap();
    let result = (|| -> Result<()> {
        let url = format!("http://{addr}/");
        browser.goto(&url)?;
        if browser.current_url()? != url {
            bail!("the browser shows {}", browser.current_url()?);
        }
        browser.wait_for_css("#go", Duration::from_secs(10))?;
        browser.fill("#name", "stork")?;
        browser.select_by_value("#colour", "blue")?;
        let colour = browser.exec_js(
            "return document.getElementById(arguments[0]).value",
            vec![json!("colour")],
        )?;
        if colour != json!("blue") {
            bail!("the select holds {colour}");
        }
        browser.exec_js("window.__marker = 42", Vec::new())?;
        browser.click("#go")?;
        let text =
            browser.wait_text("#greeting", Duration::from_secs(10), |t| t != "not clicked")?;
        if text != "clicked by stork" {
            bail!("the greeting says {text:?}");
        }
        if browser.exec_js("return window.__marker", Vec::new())? != json!(42) {
            bail!("the page was reloaded: the script's state is gone");
        }
        if browser.attr("#name", "id")?.as_deref() != Some("name") {
            bail!("attr() does not read the id");
        }
        if browser.attr("#missing", "id").is_ok() {
            bail!("attr() of a missing element did not fail");
        }
        let errors = browser.console_errors()?;
        if !errors.iter().any(|e| e.contains("stork-console-check")) {
            bail!("the console error is not in {errors:?}");
        }
        browser.set_window_size(800, 600)?;
        let shot = browser.screenshot("clicked")?;
        check_png(&shot)
    })();
    if let Err(e) = result {
        panic!(
            "{e:#}\n--- page ---\n{}\n--- chromedriver ---\n{}",
            browser.page_tail(2000),
            browser.driver_log_tail(30)
        );
    }
    drop(browser);
    // Chromium's crash handlers run in sessions of their own and end when they see Chromium
    // gone, a moment after the drop.
    let mut left = Vec::new();
    let gone = stork_lab::wait_for(
        "chromedriver and Chromium to end",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            left = chrome_processes(lab.netns())?;
            Ok(left.is_empty().then_some(()))
        },
    );
    assert!(gone.is_ok(), "left running after the drop: {left:?}");
}

fn check_png(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if !bytes.starts_with(b"\x89PNG\r\n\x1a\n") || bytes.len() < 1000 {
        bail!(
            "{} is not a PNG screenshot ({} bytes)",
            path.display(),
            bytes.len()
        );
    }
    Ok(())
}
