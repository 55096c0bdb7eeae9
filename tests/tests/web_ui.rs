//! The web UI end to end in a real browser (headless Chromium through chromedriver, inside
//! the lab's namespace), on one SeaBIOS VM powered only through its BMC. Every action the UI
//! offers is taken in the page; the CLI only adds the machine with its IPMI parameters (and
//! powers it on for enlistment), makes and revokes a token, and observes.
//!
//! - Without a session a page leads to the login page; a wrong token is refused there with
//!   the field's error; the admin token logs in.
//! - The machines page shows the machine appear and its inventory arrive, live.
//! - The bulk action commissions it: Stork sets PXE on the BMC and powers it on; the row
//!   turns `ready` live, and Stork powers the machine off.
//! - Its page offers the image's kernels, refuses a bad hostname and a kernel for a deploy
//!   into memory (it runs under the agent's) each with its field's error, then deploys the image into
//!   memory: the status reaches `deployed` live with the timeline's phases; SSH reads the
//!   hostname asked for on an overlay root, and the disk is untouched. (This is the memory
//!   deploy's end-to-end test: one VM run proves both it and the UI.)
//! - The release button takes it back to `ready`, live, and off.
//! - A logged-in token that is revoked is sent back to the login page with the reason.
//! - Images, keys, tokens, leases and stats show their tables.
//!
//! "Live" is checked: a value set on `window` before each wait must still be there after it,
//! which a page reload would lose. Only what the web UI's DOM contract promises is relied on
//! (its ids, classes and data attributes). Screenshots of every page go to
//! [`stork_tests::ui_screenshots`], kept after the run.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;
use stork_lab::bmc::BmcVm;
use stork_lab::{Browser, wait_for};
use stork_proto::api::{Status, TokenRecord};
use stork_tests::deploy::{IMAGE, Scenario, USER, seabios, sha256_of};

const MAC: &str = "52:54:00:77:01:03";
const HOSTNAME: &str = "stork-e2e-ram";
/// A page to load, or to answer a click.
const PAGE: Duration = Duration::from_secs(30);
/// A change already made in the appliance, to reach an open page.
const LIVE: Duration = Duration::from_secs(30);
/// How long the machine may stay off while the page shows a busy status before that is a
/// failure (nothing would change any more); an IPMI power cycle is about a second.
const OFF_GRACE: Duration = Duration::from_secs(60);
/// The `window` property whose survival proves the page was not reloaded.
const MARKER: &str = "__stork_marker";
const POLL_BMC: Duration = Duration::from_millis(200);

#[test]
#[ignore = "needs root, QEMU, ipmi_sim, chromium and built images: run `cargo xtask test`"]
fn the_web_ui_commissions_deploys_in_memory_and_releases_a_bmc_powered_vm_live() {
    let mut s = Scenario::new("web-ui", seabios(MAC, 1 << 30), None).unwrap();
    let shots = stork_tests::ui_screenshots();
    // Declared after the scenario, so dropped before its lab: chromedriver and Chromium end
    // while the namespace they run in still exists.
    let browser = match Browser::start(s.lab.netns(), &shots) {
        Ok(b) => b,
        Err(e) => s.fail(e.context("starting the browser")),
    };
    let result = (|| -> Result<()> {
        let ui = s.appliance.ui_url();
        log_in_after_a_wrong_token(&s, &browser, &ui)?;
        let id = enlist_live(&mut s, &browser)?;
        commission_in_bulk(&mut s, &browser, &id)?;
        deploy_in_memory(&mut s, &browser, &ui, &id)?;
        release(&mut s, &browser, &id)?;
        revoked_token_goes_to_login(&s, &browser, &ui)?;
        other_pages(&s, &browser)?;
        script_errors(&s, &browser)
    })();
    if let Err(e) = result {
        let shot = browser
            .screenshot("failure")
            .map(|p| p.display().to_string())
            .unwrap_or_else(|e| format!("none: {e:#}"));
        let console = browser
            .console_errors()
            .map(|c| c.join("\n"))
            .unwrap_or_else(|e| format!("(unreadable: {e:#})"));
        s.fail(anyhow!(
            "{e:#}\n--- browser: page (last 3000 characters) ---\n{}\n--- browser console errors ---\n{console}\n--- chromedriver (last 20 lines) ---\n{}\n(screenshot: {shot})",
            browser.page_tail(3000),
            browser.driver_log_tail(20),
        ));
    }
    eprintln!("phases (web UI, SeaBIOS, in memory):\n{}", s.timings());
    eprintln!("screenshots in {}", shots.display());
}

/// Step 1: no session leads to the login page, a wrong token is refused with the field's
/// error, the admin token logs in.
fn log_in_after_a_wrong_token(s: &Scenario, b: &Browser, ui: &str) -> Result<()> {
    b.goto(&format!("{ui}/machines"))?;
    on_page(b, "login")?;
    let url = b.current_url()?;
    if !url.contains("/ui/login") {
        bail!("without a session /ui/machines led to {url}, not /ui/login");
    }
    b.fill("#token", "stork_not_a_token")?;
    b.click("#login-submit")?;
    let refused = field_error(b, "token")?;
    on_page(b, "login")?;
    s.say(&format!("a wrong token is refused: {refused:?}"));
    b.screenshot("login")?;
    log_in(b, &s.appliance.token)
}

/// Step 2: the machine is added and powered on for enlistment (as an operator would with
/// the CLI); the open machines page shows its row and then its inventory without a reload.
fn enlist_live(s: &mut Scenario, b: &Browser) -> Result<String> {
    b.wait_for_css(r#"#live[data-state="live"]"#, PAGE)
        .context("the machines page's live updates never connected")?;
    mark(b, 42)?;
    let id = s.add_and_enlist()?;
    let hw = b
        .wait_text(&format!("{} td.hw", row(&id)), LIVE, |t| !t.is_empty())
        .context("the enlisted machine's row with its inventory, on the open page")?;
    still_marked(b, 42, "the enlistment")?;
    s.say(&format!("the open machines page shows {id}: {hw}"));
    b.screenshot("machines")?;
    Ok(id)
}

/// Step 3: the row's checkbox and the bulk commission; the row turns ready live.
fn commission_in_bulk(s: &mut Scenario, b: &Browser, id: &str) -> Result<()> {
    s.phase_start();
    let select = format!("{} input.select", row(id));
    b.click(&select)?;
    if b.count(&format!("{select}:checked"))? == 0 {
        bail!("clicking {select} did not check it");
    }
    b.click(r#"#bulk button[data-bulk="commission"]"#)?;
    let said = b
        .wait_text("#bulk-result", PAGE, |t| !t.is_empty())
        .context("the bulk commission's result")?;
    s.say(&format!("bulk commission: {said}"));
    on_page(b, "machines")?;
    mark(b, 43)?;
    wait_pxe(s, "commissioning")?;
    let row_status = |b: &Browser| b.try_attr(&row(id), "data-status");
    wait_shown(
        b,
        "the machine's row",
        row_status,
        &["commissioning", "ready"],
        &["new"],
        LIVE,
        None,
    )
    .with_context(|| format!("the bulk commission did not start commissioning ({said})"))?;
    wait_shown(
        b,
        "the machine's row",
        row_status,
        &["ready"],
        &["commissioning"],
        Duration::from_secs(400),
        Some(&s.machine),
    )?;
    still_marked(b, 43, "commissioning")?;
    s.wait_off(
        "Stork's power-off after commissioning",
        Duration::from_secs(90),
    )?;
    api_status(s, id, Status::Ready)?;
    s.phase_done("commission in bulk (to Ready, off)");
    Ok(())
}

/// Step 4: the machine's page refuses a bad hostname, then deploys into memory; the status
/// and the timeline follow live. SSH and the untouched disk prove the deploy.
fn deploy_in_memory(s: &mut Scenario, b: &Browser, ui: &str, id: &str) -> Result<()> {
    b.goto(&format!("{ui}/machines/{id}"))?;
    on_page(b, "machine")?;
    b.wait_for_css(&format!(r#"#machine[data-machine-id="{id}"]"#), PAGE)?;
    let status = b.text("#status")?;
    if status != "ready" {
        bail!("the machine's page says {status:?}, not ready");
    }
    b.screenshot("machine-ready")?;

    // The form offers the image's kernels; each mistake is named under its field.
    let offered = b.attr(r#"#deploy-kernels option[value="backports"]"#, "label")?;
    if !offered.as_deref().is_some_and(|l| l.contains(IMAGE)) {
        bail!("the kernel field offers no backports kernel of {IMAGE}: {offered:?}");
    }
    for (hostname, kernel, field) in [
        ("bad_host!", "", "hostname"),
        (HOSTNAME, "backports", "kernel"),
    ] {
        fill_deploy_form(b, hostname, kernel)?;
        b.click("#deploy-submit")?;
        let refused = field_error(b, field)?;
        let (shown, api) = (b.text("#status")?, s.status(id)?.status);
        if shown != "ready" || api != Status::Ready {
            bail!("after a refused deploy the page says {shown:?} and the API {api}: not ready");
        }
        s.say(&format!(
            "{field} of a deploy in memory is refused: {refused:?}"
        ));
    }

    let before = sha256_of(&s.machine.paths.disk)?;
    s.phase_start();
    fill_deploy_form(b, HOSTNAME, "")?;
    b.click("#deploy-submit")?;
    let status = |b: &Browser| b.try_text("#status");
    wait_shown(
        b,
        "#status",
        status,
        &["allocated", "deploying", "deployed"],
        &["ready"],
        PAGE,
        None,
    )
    .context("the deploy form's submit did not start a deploy")?;
    on_page(b, "machine")?;
    mark(b, 44)?;
    wait_pxe(s, "the deploy")?;
    wait_shown(
        b,
        "#status",
        status,
        &["deployed"],
        &["allocated", "deploying"],
        Duration::from_secs(600),
        Some(&s.machine),
    )?;
    let phases = b.wait_until("three phases in #timeline", LIVE, |b| {
        let n = b.count("#timeline .phase")?;
        Ok((n >= 3).then_some(n))
    })?;
    still_marked(b, 44, "the deploy")?;
    api_status(s, id, Status::Deployed)?;
    s.say(&format!("the open page shows deployed, {phases} phases"));
    b.screenshot("machine-timeline")?;
    s.phase_done("deploy in memory from the page (to phone-home)");

    let ip = s.leased_ip()?;
    let got = s.ssh_when_up(&ip, "hostname; findmnt -n -o FSTYPE /")?;
    let mut lines = got.lines();
    let (name, fstype) = (
        lines.next().unwrap_or_default().trim(),
        lines.next().unwrap_or_default().trim(),
    );
    if name != HOSTNAME || fstype != "overlay" {
        bail!("over SSH: hostname {name:?}, root {fstype:?}; wanted {HOSTNAME:?} on an overlay");
    }
    s.say(&format!(
        "ssh {USER}@{ip}: hostname {name}, root on {fstype}"
    ));
    let after = sha256_of(&s.machine.paths.disk)?;
    if after != before {
        bail!("the disk changed during a deploy in memory: sha256 {before} -> {after}");
    }
    Ok(())
}

/// The deploy form's fields: the scenario's image, into memory, `hostname`, `kernel`.
fn fill_deploy_form(b: &Browser, hostname: &str, kernel: &str) -> Result<()> {
    b.select_by_value("#deploy-form [name=image]", IMAGE)?;
    b.select_by_value("#deploy-form [name=target]", "memory")?;
    b.fill("#deploy-form [name=hostname]", hostname)?;
    b.fill("#deploy-form [name=kernel]", kernel)
}

/// Step 5: the release button; the page follows the machine back to ready, live.
fn release(s: &mut Scenario, b: &Browser, id: &str) -> Result<()> {
    s.phase_start();
    // The contract names no confirmation step; a `confirm()` would block WebDriver.
    b.exec_js("window.confirm = () => true", Vec::new())?;
    // A deploy in memory wrote nothing to the disk: release without the erase the page
    // ticks by default (a user unticks it), which also keeps CI from zeroing the disk.
    if b.attr("#release-erase", "checked")?.is_some() {
        b.click("#release-erase")?;
    }
    b.click(r#"button[data-action="release"]"#)?;
    let status = |b: &Browser| b.try_text("#status");
    wait_shown(
        b,
        "#status",
        status,
        &["releasing", "disk_erasing", "ready"],
        &["deployed"],
        PAGE,
        None,
    )
    .context("the release button did not start a release")?;
    on_page(b, "machine")?;
    mark(b, 45)?;
    wait_shown(
        b,
        "#status",
        status,
        &["ready"],
        &["releasing", "disk_erasing"],
        Duration::from_secs(600),
        Some(&s.machine),
    )?;
    still_marked(b, 45, "the release")?;
    s.wait_off(
        "Stork's power-off after the release",
        Duration::from_secs(90),
    )?;
    api_status(s, id, Status::Ready)?;
    s.phase_done("release from the page (to Ready, off)");
    Ok(())
}

/// Step 6: log out, log in with a second token, revoke it with the CLI: the next page is
/// the login page with the reason.
fn revoked_token_goes_to_login(s: &Scenario, b: &Browser, ui: &str) -> Result<()> {
    const DESCRIPTION: &str = "web-ui-e2e, revoked while logged in";
    let data_dir = s
        .appliance
        .data_dir
        .to_str()
        .context("a non-UTF-8 data directory")?;
    let token = s.appliance.cli(&[
        "token",
        "create",
        "--description",
        DESCRIPTION,
        "--data-dir",
        data_dir,
    ])?;
    b.click("#logout")?;
    on_page(b, "login")?;
    let url = b.current_url()?;
    if !url.contains("why=logged_out") {
        bail!("logging out led to {url}, not /ui/login?why=logged_out");
    }
    let notice = b.text("#login-notice")?;
    if notice.is_empty() {
        bail!("the login page after logging out says nothing in #login-notice");
    }
    log_in(b, token.trim())?;

    let tokens: Vec<TokenRecord> = s.appliance.cli_json(&["token", "list", "--json"])?;
    let made = tokens
        .iter()
        .find(|t| t.description == DESCRIPTION)
        .with_context(|| format!("`token list` lacks the token just made: {tokens:?}"))?;
    s.appliance.cli(&["token", "revoke", &made.id])?;
    b.goto(&format!("{ui}/machines"))?;
    on_page(b, "login")?;
    let url = b.current_url()?;
    if !url.contains("/ui/login") || !url.contains("why=") {
        bail!("with a revoked token /ui/machines led to {url}, not /ui/login?why=...");
    }
    let notice = b.text("#login-notice")?;
    if notice.is_empty() {
        bail!("the login page for a revoked token says nothing in #login-notice");
    }
    s.say(&format!("a revoked token is sent to {url}: {notice:?}"));
    Ok(())
}

/// Step 7: the other pages, reached through the navigation, each with its table.
fn other_pages(s: &Scenario, b: &Browser) -> Result<()> {
    log_in(b, &s.appliance.token)?;
    for (page, table) in [
        ("images", "table#images"),
        ("keys", "table#keys"),
        ("tokens", "table#tokens"),
        ("leases", "table#leases"),
        ("stats", "table.stats"),
    ] {
        b.click(&format!(r#"#nav a[data-nav="{page}"]"#))?;
        on_page(b, page)?;
        b.wait_for_css(table, PAGE)?;
        b.screenshot(page)?;
    }
    narrow_window(b)
}

/// A laptop beside a rack: at 400 px wide the machines page fits the window (wide tables
/// scroll inside their own box), and the page still works.
fn narrow_window(b: &Browser) -> Result<()> {
    b.set_window_size(400, 800)?;
    b.click(r#"#nav a[data-nav="machines"]"#)?;
    on_page(b, "machines")?;
    b.wait_for_css("table#machines tr.machine", PAGE)?;
    let overflow = b.exec_js(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth;",
        Vec::new(),
    )?;
    b.screenshot("machines-narrow")?;
    let (w, h) = stork_lab::browser::WINDOW;
    b.set_window_size(w, h)?;
    if overflow.as_f64().unwrap_or(0.0) > 0.0 {
        bail!("at 400 px the machines page is {overflow} px wider than the window");
    }
    Ok(())
}

/// No script of the UI threw. Other console errors (the wrong token's 401, a live stream cut
/// by leaving its page) are expected and only shown.
fn script_errors(s: &Scenario, b: &Browser) -> Result<()> {
    let errors = b.console_errors()?;
    if !errors.is_empty() {
        s.say(&format!(
            "browser console errors:\n  {}",
            errors.join("\n  ")
        ));
    }
    let thrown: Vec<&String> = errors.iter().filter(|e| e.contains("Uncaught")).collect();
    if !thrown.is_empty() {
        bail!("the UI's scripts threw: {thrown:?}");
    }
    Ok(())
}

/// Logs in on the login page with `token`: the machines page follows.
fn log_in(b: &Browser, token: &str) -> Result<()> {
    on_page(b, "login")?;
    b.fill("#token", token)?;
    b.click("#login-submit")?;
    on_page(b, "machines").context("logging in")
}

/// Waits for page `name` (`body[data-page]`).
fn on_page(b: &Browser, name: &str) -> Result<()> {
    b.wait_for_css(&format!(r#"body[data-page="{name}"]"#), PAGE)
        .with_context(|| format!("the {name} page"))
}

/// The machines table's row of machine `id`.
fn row(id: &str) -> String {
    format!(r#"#machines tr.machine[data-machine-id="{id}"]"#)
}

/// Waits until form field `field`'s error is shown, and returns it.
fn field_error(b: &Browser, field: &str) -> Result<String> {
    b.wait_text(
        &format!(r#".field-error[data-field="{field}"]"#),
        PAGE,
        |t| !t.is_empty(),
    )
    .with_context(|| format!("no error for field {field}"))
}

/// Sets the marker on `window`, which only a reload takes away.
fn mark(b: &Browser, value: u64) -> Result<()> {
    b.exec_js(
        &format!("window.{MARKER} = arguments[0]"),
        vec![json!(value)],
    )?;
    Ok(())
}

fn still_marked(b: &Browser, value: u64, during: &str) -> Result<()> {
    let now = b.exec_js(&format!("return window.{MARKER}"), Vec::new())?;
    if now != json!(value) {
        bail!("the page was reloaded during {during}: window.{MARKER} is {now}, was {value}");
    }
    Ok(())
}

/// Waits until `read` (what the page shows of the machine's status) is one of `want`, and
/// returns it; fails at once on a status neither wanted nor in `passing`, and, with `vm`,
/// when the machine stays off for [`OFF_GRACE`] meanwhile.
fn wait_shown(
    b: &Browser,
    what: &str,
    read: impl Fn(&Browser) -> Result<Option<String>>,
    want: &[&str],
    passing: &[&str],
    timeout: Duration,
    vm: Option<&BmcVm>,
) -> Result<String> {
    let mut last = None;
    let mut off_since: Option<Instant> = None;
    b.wait_until(&format!("{what} to show {want:?}"), timeout, |b| {
        last = read(b)?;
        let Some(shown) = last.clone() else {
            return Ok(None);
        };
        if want.contains(&shown.as_str()) {
            return Ok(Some(shown));
        }
        if !passing.contains(&shown.as_str()) {
            bail!("{what} shows {shown:?} while waiting for {want:?}");
        }
        if let Some(vm) = vm {
            if vm.is_on() {
                off_since = None;
            } else if off_since.get_or_insert_with(Instant::now).elapsed() > OFF_GRACE {
                bail!("the VM has been off for {OFF_GRACE:?} while {what} shows {shown:?}");
            }
        }
        Ok(None)
    })
    .with_context(|| format!("{what} last showed {last:?}"))
}

/// Waits (the page may show the request before Stork has made it) until `what` has set the
/// BMC's boot device to PXE.
fn wait_pxe(s: &Scenario, what: &str) -> Result<()> {
    wait_for("the BMC's boot device to be PXE", PAGE, POLL_BMC, || {
        Ok((s.machine.bmc.boot() == "pxe").then_some(()))
    })
    .with_context(|| {
        format!(
            "{what} did not set the BMC's boot device to PXE: {:?}",
            s.machine.bmc.boot()
        )
    })
}

/// The API agrees with what the page showed.
fn api_status(s: &Scenario, id: &str, want: Status) -> Result<()> {
    let m = s.status(id)?;
    if m.status != want {
        bail!(
            "the page showed {want} but the API says {} ({:?})",
            m.status,
            m.status_message
        );
    }
    Ok(())
}
