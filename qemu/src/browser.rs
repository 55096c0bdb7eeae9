//! A real browser for the web UI's tests: headless Chromium driven over WebDriver by
//! chromedriver, inside a lab's network namespace.
//!
//! The appliance answers only inside the lab's namespace, so chromedriver (and the Chromium
//! it starts) must run there, and every WebDriver connection must be made from there too.
//! One worker thread joins the namespace, spawns chromedriver (a child inherits the
//! namespace of the thread that forks it) and owns a current-thread tokio runtime with the
//! [`fantoccini`] client; every socket is opened on that thread. Jobs reach it over a
//! channel, so the API here is synchronous, as the lab's tests are.
//!
//! Pages update themselves live, so tests wait for a condition by polling it
//! ([`Browser::wait_until`] and the `wait_*` helpers), never for a fixed time.

use std::future::Future;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use fantoccini::wd::{Capabilities, WebDriverCompatibleCommand};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::bmc::{enter_namespace, open_namespace};
use crate::process::{Spawned, wait_for};

/// Debian's `chromium` package.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Debian's `chromium-driver` package.
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The window every session starts with (screenshots are this size).
pub const WINDOW: (u32, u32) = (1280, 900);

/// How often the `wait_*` helpers look again.
const POLL: Duration = Duration::from_millis(200);
/// A backstop for one job: a WebDriver command that hangs (a page that never loads, a
/// dialog nobody answers) fails the test instead of stalling it. Long waits are many
/// short jobs ([`Browser::wait_until`]), so none comes near this.
const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// What a job is given and returns: a future on the worker's runtime, which need not be
/// `Send` (it never leaves that thread).
pub type Task<T> = Pin<Box<dyn Future<Output = Result<T>>>>;

type Job = Box<dyn FnOnce(&Session) + Send>;

/// What lives on the worker thread.
struct Session {
    rt: tokio::runtime::Runtime,
    client: Client,
}

/// Headless Chromium in a network namespace; chromedriver and Chromium end when this is
/// dropped.
pub struct Browser {
    jobs: Option<mpsc::Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    dir: PathBuf,
    driver_log: PathBuf,
}

impl Browser {
    /// Starts chromedriver inside network namespace `netns` (as `ip netns` names it, e.g.
    /// [`crate::Lab::netns`]) and opens a session of headless Chromium that accepts the
    /// appliance's self-signed certificate. Screenshots and chromedriver's log go to
    /// `artefact_dir` (created).
    pub fn start(netns: &str, artefact_dir: &Path) -> Result<Self> {
        Self::start_in(Some(netns), artefact_dir)
    }

    /// As [`Browser::start`], in this process's own network namespace (a loopback server,
    /// as `cargo xtask bench ui` runs one).
    pub fn start_here(artefact_dir: &Path) -> Result<Self> {
        Self::start_in(None, artefact_dir)
    }

    fn start_in(netns: Option<&str>, artefact_dir: &Path) -> Result<Self> {
        for (bin, pkg) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
            if !Path::new(bin).exists() {
                bail!("{bin} is missing: apt-get install {pkg} (cargo xtask test installs it)");
            }
        }
        std::fs::create_dir_all(artefact_dir)
            .with_context(|| format!("creating {}", artefact_dir.display()))?;
        let driver_log = artefact_dir.join("chromedriver.log");
        let ns = netns.map(open_namespace).transpose()?;
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let (netns, log) = (
            netns.unwrap_or("this namespace").to_string(),
            driver_log.clone(),
        );
        let worker = std::thread::Builder::new()
            .name("browser".into())
            .spawn(move || {
                let (driver, session) = match open(ns.as_ref(), &netns, &log) {
                    Ok(started) => started,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                drop(ns);
                let _ = ready_tx.send(Ok(()));
                // Until the Browser is dropped (the channel closes).
                for job in inbox {
                    job(&session);
                }
                shut_down(driver, session);
            })
            .context("starting the browser's thread")?;
        let browser = Self {
            jobs: Some(jobs),
            worker: Some(worker),
            dir: artefact_dir.to_path_buf(),
            driver_log,
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(browser),
            Ok(Err(e)) => Err(e.context(format!(
                "starting chromedriver and Chromium (log: {})",
                browser.driver_log.display()
            ))),
            Err(_) => bail!("the browser's thread panicked while starting"),
        }
    }

    /// Where screenshots and chromedriver's log go.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The last `lines` lines of chromedriver's log, for a failure report.
    pub fn driver_log_tail(&self, lines: usize) -> String {
        crate::process::tail(&self.driver_log, lines)
    }

    /// Runs `f` with the WebDriver client on the browser's thread and returns its result;
    /// `what` names it in errors. For anything the helpers below do not offer:
    ///
    /// ```no_run
    /// # fn demo(browser: &stork_lab::Browser) -> anyhow::Result<()> {
    /// let title = browser.run("reading the title", |c| {
    ///     Box::pin(async move { Ok(c.title().await?) })
    /// })?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn run<T, F>(&self, what: &str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Client) -> Task<T> + Send + 'static,
    {
        let (reply, answer) = mpsc::channel();
        let job: Job = Box::new(move |s: &Session| {
            let result = s.rt.block_on(async {
                tokio::time::timeout(JOB_TIMEOUT, f(s.client.clone()))
                    .await
                    .unwrap_or_else(|_| Err(anyhow!("no answer within {JOB_TIMEOUT:?}")))
            });
            let _ = reply.send(result);
        });
        self.jobs
            .as_ref()
            .context("the browser is shut down")?
            .send(job)
            .map_err(|_| anyhow!("the browser's thread has ended ({what})"))?;
        answer
            .recv()
            .map_err(|_| anyhow!("the browser's thread ended during {what}"))?
            .with_context(|| what.to_string())
    }

    /// Navigates to `url` and waits for the page to load (redirects followed).
    pub fn goto(&self, url: &str) -> Result<()> {
        let u = url.to_string();
        self.run(&format!("opening {url}"), move |c| {
            Box::pin(async move { Ok(c.goto(&u).await?) })
        })
    }

    /// The address of the page shown.
    pub fn current_url(&self) -> Result<String> {
        self.run("reading the current URL", |c| {
            Box::pin(async move { Ok(c.current_url().await?.to_string()) })
        })
    }

    /// The page's DOM as it is now (scripts' changes included).
    pub fn source(&self) -> Result<String> {
        self.run("reading the page source", |c| {
            Box::pin(async move { Ok(c.source().await?) })
        })
    }

    /// The page's URL and the last `chars` characters of its DOM, for a failure report;
    /// never fails (says what went wrong instead).
    pub fn page_tail(&self, chars: usize) -> String {
        let url = self
            .current_url()
            .unwrap_or_else(|e| format!("(no URL: {e:#})"));
        let source = match self.source() {
            Ok(s) => {
                let skip = s.chars().count().saturating_sub(chars);
                s.chars().skip(skip).collect()
            }
            Err(e) => format!("(no source: {e:#})"),
        };
        format!("{url}\n{source}")
    }

    /// Runs `script` (a function body: `arguments[i]` are `args`, `return` gives the result)
    /// in the page and returns its result as JSON.
    pub fn exec_js(&self, script: &str, args: Vec<Value>) -> Result<Value> {
        let s = script.to_string();
        let shown: String = script.chars().take(60).collect();
        self.run(&format!("running script {shown:?}"), move |c| {
            Box::pin(async move { Ok(c.execute(&s, args).await?) })
        })
    }

    /// How many elements match CSS `selector` now.
    pub fn count(&self, selector: &str) -> Result<usize> {
        let v = self.exec_js(
            "return document.querySelectorAll(arguments[0]).length",
            vec![json!(selector)],
        )?;
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .with_context(|| format!("counting {selector}: the page answered {v}"))
    }

    /// The text (`textContent`, whitespace collapsed and trimmed) of the first element
    /// matching `selector`, or `None` when there is none. The DOM's text, not the rendered
    /// one, so a style (`text-transform`, a collapsed panel) cannot change what a test reads;
    /// read in one script, so a part of the page swapped between finding and reading cannot
    /// fail it.
    pub fn try_text(&self, selector: &str) -> Result<Option<String>> {
        let v = self.exec_js(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null",
            vec![json!(selector)],
        )?;
        Ok(v.as_str()
            .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" ")))
    }

    /// As [`Browser::try_text`], failing when nothing matches.
    pub fn text(&self, selector: &str) -> Result<String> {
        self.try_text(selector)?
            .with_context(|| format!("no element matches {selector}"))
    }

    /// Attribute `name` of the first element matching `selector`, or `None` when there is
    /// no such element or it has no such attribute.
    pub fn try_attr(&self, selector: &str, name: &str) -> Result<Option<String>> {
        let v = self.exec_js(
            "const e = document.querySelector(arguments[0]);
             return e ? e.getAttribute(arguments[1]) : null",
            vec![json!(selector), json!(name)],
        )?;
        Ok(v.as_str().map(str::to_string))
    }

    /// Attribute `name` of the first element matching `selector` (`None`: the element has
    /// no such attribute); fails when nothing matches.
    pub fn attr(&self, selector: &str, name: &str) -> Result<Option<String>> {
        if self.count(selector)? == 0 {
            bail!("no element matches {selector}");
        }
        self.try_attr(selector, name)
    }

    /// Clicks the first element matching `selector` as a user would (it must be visible
    /// and enabled); a click that navigates returns once the new page has loaded.
    pub fn click(&self, selector: &str) -> Result<()> {
        let sel = selector.to_string();
        self.run(&format!("clicking {selector}"), move |c| {
            Box::pin(async move {
                c.find(Locator::Css(&sel)).await?.click().await?;
                Ok(())
            })
        })
    }

    /// Replaces the content of the input or textarea matching `selector` with `text`,
    /// typed.
    pub fn fill(&self, selector: &str, text: &str) -> Result<()> {
        let (sel, text) = (selector.to_string(), text.to_string());
        self.run(&format!("filling {selector}"), move |c| {
            Box::pin(async move {
                let e = c.find(Locator::Css(&sel)).await?;
                e.clear().await?;
                e.send_keys(&text).await?;
                Ok(())
            })
        })
    }

    /// Chooses the option with value `value` in the select matching `selector`.
    pub fn select_by_value(&self, selector: &str, value: &str) -> Result<()> {
        let (sel, value) = (selector.to_string(), value.to_string());
        self.run(&format!("choosing {value:?} in {selector}"), move |c| {
            Box::pin(async move {
                c.find(Locator::Css(&sel))
                    .await?
                    .select_by_value(&value)
                    .await?;
                Ok(())
            })
        })
    }

    /// Resizes the window (screenshots take this size).
    pub fn set_window_size(&self, width: u32, height: u32) -> Result<()> {
        self.run(
            &format!("resizing the window to {width}x{height}"),
            move |c| Box::pin(async move { Ok(c.set_window_size(width, height).await?) }),
        )
    }

    /// Saves a PNG of the window as `<artefact dir>/<name>.png` and returns its path.
    pub fn screenshot(&self, name: &str) -> Result<PathBuf> {
        if name.is_empty() || name.contains(['/', '\0']) || name.starts_with('.') {
            bail!("{name:?} is not a screenshot name (a plain file name, no extension)");
        }
        let png = self.run(&format!("taking screenshot {name}"), |c| {
            Box::pin(async move { Ok(c.screenshot().await?) })
        })?;
        let path = self.dir.join(format!("{name}.png"));
        std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// The page's console errors (and failed loads, uncaught exceptions) since the last
    /// call: chromedriver's browser log, level SEVERE, one line each.
    pub fn console_errors(&self) -> Result<Vec<String>> {
        let log = self.run("reading the browser's console log", |c| {
            Box::pin(async move { Ok(c.issue_cmd(BrowserLog).await?) })
        })?;
        let entries = log
            .as_array()
            .with_context(|| format!("the browser log is not a list: {log}"))?;
        Ok(entries
            .iter()
            .filter(|e| e.get("level").and_then(Value::as_str) == Some("SEVERE"))
            .map(|e| {
                e.get("message")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            })
            .collect())
    }

    /// Polls `check` until it returns `Ok(Some(v))` (then `v`), fails with its error, or
    /// `timeout` passes. `check` may use the browser and anything else (a VM's state, the
    /// appliance's), so a test can fail early when waiting is pointless.
    pub fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Self) -> Result<Option<T>>,
    ) -> Result<T> {
        wait_for(what, timeout, POLL, || check(self))
    }

    /// Waits until an element matches `selector`.
    pub fn wait_for_css(&self, selector: &str, timeout: Duration) -> Result<()> {
        self.wait_until(&format!("{selector} on the page"), timeout, |b| {
            Ok((b.count(selector)? > 0).then_some(()))
        })
    }

    /// Waits until the first element matching `selector` exists and its text satisfies
    /// `ok`; returns that text. On timeout the error shows the last text seen.
    pub fn wait_text(
        &self,
        selector: &str,
        timeout: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let mut last = None;
        self.wait_until(&format!("the text of {selector}"), timeout, |b| {
            last = b.try_text(selector)?;
            Ok(last.clone().filter(|t| ok(t)))
        })
        .with_context(|| format!("last text of {selector}: {last:?}"))
    }

    /// Waits until `script` (as in [`Browser::exec_js`], no arguments) returns something
    /// other than `null`, `false`, `0` or `""`, and returns it.
    pub fn wait_js(&self, what: &str, script: &str, timeout: Duration) -> Result<Value> {
        self.wait_until(what, timeout, |b| {
            let v = b.exec_js(script, Vec::new())?;
            let falsy = match &v {
                Value::Null => true,
                Value::Bool(b) => !b,
                Value::Number(n) => n.as_f64() == Some(0.0),
                Value::String(s) => s.is_empty(),
                _ => false,
            };
            Ok((!falsy).then_some(v))
        })
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Closing the channel ends the worker's loop: it closes the session (chromedriver
        // quits Chromium) and stops chromedriver.
        drop(self.jobs.take());
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// On the worker thread: joins the namespace, starts chromedriver, opens the session.
fn open(ns: Option<&std::fs::File>, netns: &str, log: &Path) -> Result<(Driver, Session)> {
    if let Some(ns) = ns {
        enter_namespace(ns, netns)?;
    }
    let port = free_tcp_port()?;
    let mut cmd = Command::new(CHROMEDRIVER);
    cmd.arg(format!("--port={port}"));
    // Its own process group, so shutting down reaches whatever of Chromium outlives it.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    // Spawned's PR_SET_PDEATHSIG fires when the thread that forked dies: this one, which
    // lives as long as the Browser.
    let mut driver = Driver(Spawned::start("chromedriver", cmd, log)?);
    wait_for(
        "chromedriver to listen",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || {
            if let Some(status) = driver.0.exited() {
                bail!("chromedriver exited ({status}):\n{}", driver.0.log_tail(20));
            }
            Ok(TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                .is_ok()
                .then_some(()))
        },
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the browser's runtime")?;
    let url = format!("http://{}:{port}", Ipv4Addr::LOCALHOST);
    let client = rt
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(60),
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(capabilities())
                    .connect(&url),
            )
            .await
        })
        .map_err(|_| anyhow!("chromedriver opened no session within 60 s"))?
        .with_context(|| {
            format!(
                "opening a Chromium session:\n{}",
                crate::process::tail(log, 20)
            )
        })?;
    Ok((driver, Session { rt, client }))
}

/// Headless Chromium as it runs on Debian as root (no sandbox, no GPU), trusting the
/// appliance's self-signed certificate, with its console log kept for
/// [`Browser::console_errors`].
fn capabilities() -> Capabilities {
    let caps = json!({
        "browserName": "chrome",
        "acceptInsecureCerts": true,
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                // A proxy from the environment cannot reach into the lab's namespace.
                "--no-proxy-server",
                format!("--window-size={},{}", WINDOW.0, WINDOW.1),
            ],
        },
        "goog:loggingPrefs": {"browser": "ALL"},
    });
    match caps {
        Value::Object(map) => map,
        _ => Capabilities::new(),
    }
}

/// On the worker thread, once the Browser is dropped: the session is closed (chromedriver
/// quits Chromium), then chromedriver is stopped.
fn shut_down(driver: Driver, session: Session) {
    let Session { rt, client } = session;
    let _ =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), client.close()).await });
    drop(driver);
}

/// chromedriver, leader of its own process group; the group is killed on drop (also when
/// a job panics on the worker thread). Chromium's crash handlers, in sessions of their own,
/// end by themselves a moment after Chromium.
struct Driver(Spawned);

impl Drop for Driver {
    fn drop(&mut self) {
        if let Ok(pgid) = i32::try_from(self.0.pid()) {
            // SAFETY: kill with the process group made for chromedriver; its leader is our
            // child and not reaped yet (Spawned's drop does that next), so the id is ours.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

/// A TCP port nobody in this thread's namespace listens on now.
fn free_tcp_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free TCP port")?;
    Ok(l.local_addr()?.port())
}

/// chromedriver's extension command that returns (and empties) a log: here the browser's
/// console.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (
            http::Method::POST,
            Some(json!({"type": "browser"}).to_string()),
        )
    }
}
