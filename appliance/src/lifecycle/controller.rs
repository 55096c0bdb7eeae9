//! Applies lifecycle events: asks the table, saves the result with a version check and an
//! event row, then performs the step's power actions. Also runs the busy-status timeouts and
//! the heartbeat rule: a busy machine whose agent has sent heartbeats fails as soon as one is
//! overdue (see [`overdue`]).

use std::sync::Arc;
use std::time::Duration;
use stork_proto::api::AgentIdentity;

use tokio::sync::watch;

use super::{Action, Command, Event, Rejected, Status, transition};
use crate::store::{Machine, NewEvent, Store, StoreError, now_ms};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Rejected(#[from] Rejected),
}

/// Performs power actions. The lab and real sites plug their BMC drivers in here.
pub trait PowerActions: Send + Sync {
    /// Next boot from the network, then power on (cycle when already on).
    fn netboot_and_power_on(
        &self,
        m: &Machine,
    ) -> futures_util::future::BoxFuture<'static, Result<(), String>>;
    fn power_off(
        &self,
        m: &Machine,
    ) -> futures_util::future::BoxFuture<'static, Result<(), String>>;
    /// Next boot from the disk, through the BMC: what takes a BIOS machine straight to the
    /// OS it was just given, where PXE's `exit` would cost a network boot first. `Ok(false)`:
    /// nothing can be done here (manual power).
    fn boot_disk_next(
        &self,
        m: &Machine,
    ) -> futures_util::future::BoxFuture<'static, Result<bool, String>>;
}

/// What manual power means: record that a person must act.
pub struct ManualPower;

impl PowerActions for ManualPower {
    fn netboot_and_power_on(
        &self,
        _m: &Machine,
    ) -> futures_util::future::BoxFuture<'static, Result<(), String>> {
        Box::pin(async {
            Err("manual power: set the machine to network-boot and power it on".into())
        })
    }
    fn power_off(
        &self,
        _m: &Machine,
    ) -> futures_util::future::BoxFuture<'static, Result<(), String>> {
        Box::pin(async { Err("manual power: power the machine off".into()) })
    }
    fn boot_disk_next(
        &self,
        _m: &Machine,
    ) -> futures_util::future::BoxFuture<'static, Result<bool, String>> {
        Box::pin(async { Ok(false) })
    }
}

/// Power through each machine's own driver (IPMI, Redfish, QMP, manual).
pub struct DriverPower;

/// The machine's stored power config as driver parameters.
pub fn power_params(m: &Machine) -> Result<crate::power::PowerParams, String> {
    let mut obj = m.power.params.clone();
    obj.insert(
        "driver".into(),
        serde_json::Value::String(m.power.driver.clone()),
    );
    serde_json::from_value(serde_json::Value::Object(obj))
        .map_err(|e| format!("power parameters: {e}"))
}

fn is_uefi(m: &Machine) -> bool {
    m.inventory
        .as_ref()
        .is_some_and(|i| i.firmware == stork_proto::inventory::Firmware::Uefi)
}

impl PowerActions for DriverPower {
    fn netboot_and_power_on(
        &self,
        m: &Machine,
    ) -> futures_util::future::BoxFuture<'static, Result<(), String>> {
        let params = power_params(m);
        let efi = is_uefi(m);
        Box::pin(async move {
            use crate::power::{BootDevice, PowerDriver, PowerState};
            let params = params?;
            if params == crate::power::PowerParams::Manual {
                return Err("manual power control: a person must set the machine to network-boot and power it on".into());
            }
            let d = PowerDriver::new(params);
            let e = |e: crate::power::PowerError| e.to_string();
            d.set_boot_device(BootDevice::Pxe, false, efi)
                .await
                .map_err(e)?;
            match d.query().await.map_err(e)? {
                PowerState::On => d.power_cycle().await.map_err(e),
                _ => d.power_on().await.map_err(e),
            }
        })
    }

    fn power_off(
        &self,
        m: &Machine,
    ) -> futures_util::future::BoxFuture<'static, Result<(), String>> {
        let params = power_params(m);
        Box::pin(async move {
            let d = crate::power::PowerDriver::new(params?);
            d.power_off(false).await.map_err(|e| e.to_string())
        })
    }

    fn boot_disk_next(
        &self,
        m: &Machine,
    ) -> futures_util::future::BoxFuture<'static, Result<bool, String>> {
        let params = power_params(m);
        let efi = is_uefi(m);
        Box::pin(async move {
            let params = params?;
            if params == crate::power::PowerParams::Manual {
                return Ok(false);
            }
            crate::power::PowerDriver::new(params)
                .set_boot_device(crate::power::BootDevice::Disk, false, efi)
                .await
                .map_err(|e| e.to_string())?;
            Ok(true)
        })
    }
}

/// The one writer of machine state: every change to a machine (status, inventory, token,
/// heartbeat, progress event, deletion) goes through it, and the HTTP handlers never touch
/// the store (`records.rs` has the calls that change no status).
#[derive(Clone)]
pub struct Controller {
    pub(super) store: Store,
    power: Arc<dyn PowerActions>,
    /// Bumped after every write that adds events, so event streams wake up (on PostgreSQL
    /// also after another appliance's writes).
    events: Arc<watch::Sender<u64>>,
    /// When this controller was made (ms): a machine in a status this process never
    /// entered was left there by a previous run.
    started_at: i64,
    /// The timeouts: run only while held, so that of several appliances on one database
    /// exactly one runs them.
    duty: DutyCheck,
    /// On a shared database, the site this appliance serves: it does the power actions of
    /// that site's machines, and queues those of other sites' machines for them. `None`
    /// on SQLite, where this appliance is the only one.
    site: Option<Arc<str>>,
    /// The site's own duties (power polls), held by one appliance of the site.
    site_duty: DutyCheck,
}

/// A duty lock and what its last check found, so that a change is logged once.
#[derive(Clone)]
struct DutyCheck {
    lock: Arc<std::sync::Mutex<crate::store::Duty>>,
    /// 0: not asked yet, 1: held, 2: another has it.
    seen: Arc<std::sync::atomic::AtomicU8>,
    /// What holding it means, for the log.
    what: Arc<str>,
}

impl DutyCheck {
    fn new(duty: crate::store::Duty, what: String) -> Self {
        Self {
            lock: Arc::new(std::sync::Mutex::new(duty)),
            seen: Arc::default(),
            what: what.into(),
        }
    }

    /// Whether this appliance holds the duty now; a change is logged, so an operator sees
    /// which appliance took over.
    async fn held(&self) -> bool {
        use std::sync::atomic::Ordering;
        let lock = self.lock.clone();
        let held = tokio::task::spawn_blocking(move || {
            lock.lock().unwrap_or_else(|e| e.into_inner()).held()
        })
        .await
        .unwrap_or(false);
        let now = if held { 1 } else { 2 };
        if self.seen.swap(now, Ordering::Relaxed) != now {
            if held {
                tracing::info!("on duty: this appliance runs {}", self.what);
            } else {
                tracing::info!("standing by: another appliance runs {}", self.what);
            }
        }
        held
    }
}

impl Controller {
    pub fn new(store: Store, power: Arc<dyn PowerActions>) -> Self {
        let events = Arc::new(watch::channel(0).0);
        let (weak, alive) = (Arc::downgrade(&events), Arc::downgrade(&events));
        store.follow_changes(
            move || {
                if let Some(tx) = weak.upgrade() {
                    tx.send_modify(|n| *n += 1);
                }
            },
            move || alive.strong_count() > 0,
        );
        Self {
            duty: DutyCheck::new(store.duty(), "the timeouts".into()),
            site_duty: DutyCheck::new(store.site_duty(""), "the power polls".into()),
            site: None,
            store,
            power,
            events,
            started_at: now_ms(),
        }
    }

    /// Serves site `site` when the database is shared (PostgreSQL): machines that boot
    /// here or are added here are this site's, and power actions on another site's
    /// machines are queued for that site's appliances. On SQLite nothing changes.
    pub fn with_site(mut self, site: &str) -> Self {
        if self.store.dialect() == crate::store::sql::Dialect::Postgres {
            self.site = Some(site.into());
            self.site_duty = DutyCheck::new(
                self.store.site_duty(site),
                format!("the power polls of site {site}"),
            );
        }
        self
    }

    /// Who power actions' events name: `controller`, and on a shared database
    /// `controller@SITE`, so a history shows which site's appliance did what.
    fn actor(&self) -> String {
        match &self.site {
            Some(site) => format!("controller@{site}"),
            None => "controller".into(),
        }
    }

    /// The store, for services that need its settings (not its records: those go
    /// through the controller).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The site this appliance serves, on a shared database.
    pub fn site(&self) -> Option<&str> {
        self.site.as_deref()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.events.subscribe()
    }

    pub fn notify(&self) {
        self.events.send_modify(|n| *n += 1);
    }

    /// Appends an event that changes no status (a power result, a poll) and wakes the
    /// event streams.
    pub async fn note(
        &self,
        machine_id: &str,
        actor: &str,
        message: String,
    ) -> Result<(), StoreError> {
        let (id, actor) = (machine_id.to_string(), actor.to_string());
        self.store
            .call(move |s| {
                s.add_event(
                    &id,
                    &NewEvent {
                        at: now_ms(),
                        actor,
                        old_status: None,
                        new_status: None,
                        message,
                    },
                )
            })
            .await?;
        self.notify();
        Ok(())
    }

    /// Applies `command` to machine `key` on behalf of `actor`: the table decides on its
    /// event, and the command's data is saved with the new status. A transition the table
    /// refuses is recorded as an event and returned as [`ControlError::Rejected`].
    pub async fn apply(
        &self,
        key: &str,
        command: Command,
        actor: &str,
    ) -> Result<Machine, ControlError> {
        let event = command.event();
        let message = command.message();
        let (mut machine, actions) = self
            .save_step(key, event, actor, message, move |m| command.write_into(m))
            .await?;
        for action in actions {
            match *action {
                // The table's own follow-up: releasing without erase is done once the
                // power-off has been asked for (a manual machine's person powers it off).
                Action::Then(next) => {
                    let (m, _) = self
                        .save_step(&machine.id, next, "controller", None, |_| {})
                        .await?;
                    machine = m;
                }
                other => self.perform(&machine, other).await,
            }
        }
        Ok(machine)
    }

    /// The table's answer, saved with its event; returns the actions still to perform.
    async fn save_step(
        &self,
        key: &str,
        event: Event,
        actor: &str,
        message: Option<String>,
        update: impl FnOnce(&mut Machine) + Send + 'static,
    ) -> Result<(Machine, &'static [Action]), ControlError> {
        let key = key.to_string();
        let actor = actor.to_string();
        let outcome = self
            .store
            .call(move |s| {
                let mut m = s.get_machine(&key)?;
                let now = now_ms();
                let step = match transition(m.status, event, m.inventory.is_some()) {
                    Ok(step) => step,
                    Err(rejected) => {
                        s.add_event(
                            &m.id,
                            &NewEvent {
                                at: now,
                                actor: actor.clone(),
                                old_status: Some(m.status),
                                new_status: None,
                                message: format!(
                                    "rejected: {rejected}{}",
                                    message
                                        .as_deref()
                                        .map(|x| format!(" ({x})"))
                                        .unwrap_or_default()
                                ),
                            },
                        )?;
                        return Ok(Err(rejected));
                    }
                };
                let old = m.status;
                m.status = step.to;
                m.status_since = now;
                // Heartbeats belong to one status's agent; the next status waits for its own.
                m.heartbeat_deadline = None;
                m.status_message = message.clone();
                m.updated_at = now;
                for a in step.actions {
                    match a {
                        Action::RevokeAgentToken => m.agent = AgentIdentity::default(),
                        Action::ClearAllocation => {
                            m.owner = None;
                            m.deploy = None;
                        }
                        Action::NetbootAndPowerOn => {
                            m.netboot = true;
                            // The boot this powers on gets its own token, once.
                            m.agent = AgentIdentity::default();
                        }
                        Action::PowerOff | Action::Then(_) => {}
                    }
                }
                update(&mut m);
                let text = match &message {
                    Some(msg) => format!("{event:?}: {old} -> {}: {msg}", step.to),
                    None => format!("{event:?}: {old} -> {}", step.to),
                };
                let saved = s.save_machine(
                    &m,
                    &[NewEvent {
                        at: now,
                        actor,
                        old_status: Some(old),
                        new_status: Some(step.to),
                        message: text,
                    }],
                )?;
                Ok(Ok((saved, step.actions)))
            })
            .await?;
        self.notify();
        let (machine, actions) = outcome?;
        tracing::info!(machine = %machine.id, status = %machine.status, ?event, "transition");
        Ok((machine, actions))
    }

    /// After the install, on a BIOS machine: the BMC's next boot becomes the disk, so the
    /// installed OS starts without a network boot first (UEFI machines get `BootNext` from
    /// the agent). Bounded: the agent waits for this answer before it reboots. Whatever
    /// happens, PXE's `exit` to the disk stays the fallback; the event says which it was.
    pub(super) async fn boot_disk_next(&self, m: &Machine) {
        // Well inside the agent's 10 s wait for its `installed` answer.
        const LIMIT: Duration = Duration::from_secs(5);
        if is_uefi(m) {
            return;
        }
        if self.foreign_site(m).is_some() {
            // Another site's BMC: a queued request would come after the reboot.
            return;
        }
        let message = match tokio::time::timeout(LIMIT, self.power.boot_disk_next(m)).await {
            Ok(Ok(true)) => "power: next boot from disk, set through the BMC".to_string(),
            Ok(Ok(false)) => return,
            Ok(Err(e)) => {
                format!("power: next boot from disk not set ({e}); PXE's `exit` is the fallback")
            }
            Err(_) => format!(
                "power: next boot from disk not set (no answer in {} s); PXE's `exit` is the fallback",
                LIMIT.as_secs()
            ),
        };
        tracing::info!(machine = %m.id, %message, "boot device");
        if let Err(e) = self.note(&m.id, &self.actor(), message).await {
            tracing::warn!(machine = %m.id, error = %e, "cannot record the boot device");
        }
    }

    /// This appliance's site and `m`'s, when they differ: its BMC is the other site's to
    /// reach.
    fn foreign_site<'a>(&'a self, m: &'a Machine) -> Option<(&'a str, &'a str)> {
        match (self.site.as_deref(), m.site.as_deref()) {
            (Some(mine), Some(theirs)) if mine != theirs => Some((mine, theirs)),
            _ => None,
        }
    }

    async fn perform(&self, m: &Machine, action: Action) {
        if let Some((mine, theirs)) = self.foreign_site(m)
            && let Some(name) = request_name(action)
        {
            self.forward(m, name, mine, theirs).await;
            return;
        }
        self.perform_here(m, action).await;
    }

    /// Queues power action `name` on `m` for an appliance of site `theirs`.
    async fn forward(&self, m: &Machine, name: &'static str, mine: &str, theirs: &str) {
        let (id, site, by) = (m.id.clone(), theirs.to_string(), mine.to_string());
        let event = NewEvent {
            at: now_ms(),
            actor: self.actor(),
            old_status: None,
            new_status: None,
            message: format!(
                "power: {name} asked of site {theirs}, whose appliances reach the BMC"
            ),
        };
        let queued = self
            .store
            .call(move |s| s.queue_power(&site, &id, name, &by, &event))
            .await;
        self.notify();
        match queued {
            Ok(()) => {
                tracing::info!(machine = %m.id, site = %theirs, action = name, "power action forwarded")
            }
            Err(e) => tracing::warn!(machine = %m.id, error = %e, "cannot queue the power action"),
        }
    }

    /// Takes the power actions queued for this appliance's site and performs them, woken
    /// by the event each one adds (and every few seconds, for one whose wake was missed).
    /// A request older than `REQUEST_TTL` is dropped with an event: the machine has
    /// moved on (its busy status timed out), and a late power-on would surprise.
    pub async fn run_power_requests(self) {
        let Some(site) = self.site.clone() else {
            return;
        };
        let mut wake = self.subscribe();
        loop {
            let claimed = {
                let site = site.clone();
                self.store.call(move |s| s.claim_power(&site)).await
            };
            let requests = claimed.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot take the queued power actions");
                Vec::new()
            });
            for r in &requests {
                self.take(r).await;
            }
            if requests.is_empty() {
                let _ = tokio::time::timeout(Duration::from_secs(5), wake.changed()).await;
            }
        }
    }

    async fn take(&self, r: &crate::store::PowerRequest) {
        let action = match r.action.as_str() {
            "netboot_and_power_on" => Action::NetbootAndPowerOn,
            "power_off" => Action::PowerOff,
            other => {
                tracing::warn!(machine = %r.machine_id, action = other, "unknown queued power action");
                return;
            }
        };
        let age = now_ms() - r.requested_at;
        if age > i64::try_from(REQUEST_TTL.as_millis()).unwrap_or(i64::MAX) {
            let why = format!(
                "power: {} asked by site {} dropped: no appliance of this site took it within {} s",
                r.action,
                r.requested_by,
                REQUEST_TTL.as_secs()
            );
            let _ = self.note(&r.machine_id, &self.actor(), why).await;
            return;
        }
        match self.machine(&r.machine_id).await {
            Ok(m) => self.perform_here(&m, action).await,
            Err(e) => {
                tracing::info!(machine = %r.machine_id, error = %e, "queued power action for a machine gone")
            }
        }
    }

    async fn perform_here(&self, m: &Machine, action: Action) {
        let result = match action {
            Action::NetbootAndPowerOn => self.power.netboot_and_power_on(m).await,
            Action::PowerOff => self.power.power_off(m).await,
            Action::RevokeAgentToken | Action::ClearAllocation | Action::Then(_) => return,
        };
        if result.is_ok() {
            let seen = match action {
                Action::PowerOff => crate::power::PowerState::Off,
                _ => crate::power::PowerState::On,
            };
            self.power_seen(&m.id, seen).await;
        }
        let message = match result {
            Ok(()) => format!("power: {action:?} done"),
            Err(e) => format!("power: {action:?}: {e}"),
        };
        tracing::info!(machine = %m.id, %message, "power action");
        if let Err(e) = self.note(&m.id, &self.actor(), message).await {
            tracing::warn!(machine = %m.id, error = %e, "cannot record the power result");
        }
    }

    /// Moves machines whose busy status outlived `timeout`, or whose agent's heartbeat is
    /// overdue, to their failed status.
    pub async fn check_timeouts(&self, timeout: Duration) {
        let busy: Vec<Status> = Status::ALL
            .into_iter()
            .filter(|s| crate::lifecycle::failure_on_timeout(*s).is_some())
            .collect();
        let Ok(machines) = self.store.call(move |s| s.machines_in(&busy)).await else {
            return;
        };
        let now = now_ms();
        for m in machines {
            if let Some(why) = overdue(&m, now, timeout)
                && let Err(e) = self
                    .apply(&m.id, Command::TimedOut(why), "controller")
                    .await
            {
                tracing::warn!(machine = %m.id, error = %e, "timeout transition failed");
            }
        }
    }

    /// A plain release is two saves (Releasing, then Ready once the power-off was asked
    /// for); a crash between them leaves the machine Releasing with nothing to finish it.
    /// Finishes such releases from before this process started: power off, then done.
    pub async fn finish_interrupted_releases(&self) {
        let started_at = self.started_at;
        let stuck = match self
            .store
            .call(|s| s.machines_in(&[Status::Releasing]))
            .await
        {
            Ok(all) => all.into_iter().filter(|m| m.status_since < started_at),
            Err(e) => {
                tracing::warn!(error = %e, "cannot look for interrupted releases");
                return;
            }
        };
        for m in stuck {
            tracing::info!(machine = %m.id, "finishing a release interrupted by a restart");
            self.perform(&m, Action::PowerOff).await;
            let why = Some("release finished after a restart".to_string());
            if let Err(e) = self
                .save_step(&m.id, Event::ReleaseDone, "controller", why, |_| {})
                .await
            {
                tracing::warn!(machine = %m.id, error = %e, "cannot finish the release");
            }
        }
    }

    /// Runs [`Controller::check_timeouts`] every `every`, forever, while this appliance
    /// has the duties; finishes interrupted releases the first time it has them.
    pub async fn run_timeouts(self, timeout: Duration, every: Duration) {
        let mut releases_finished = false;
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if !self.on_duty().await {
                continue;
            }
            if !releases_finished {
                self.finish_interrupted_releases().await;
                releases_finished = true;
            }
            self.check_timeouts(timeout).await;
        }
    }

    /// Whether this appliance runs the timeouts now ([`crate::store::Duty`]).
    pub async fn on_duty(&self) -> bool {
        self.duty.held().await
    }
}

/// How long a queued power action waits for an appliance of its site before it is dropped.
const REQUEST_TTL: Duration = Duration::from_secs(600);

/// A forwarded power action's name in the queue.
fn request_name(action: Action) -> Option<&'static str> {
    match action {
        Action::NetbootAndPowerOn => Some("netboot_and_power_on"),
        Action::PowerOff => Some("power_off"),
        Action::RevokeAgentToken | Action::ClearAllocation | Action::Then(_) => None,
    }
}

/// Why busy machine `m` must fail at `now`, if it must: its status outlived `timeout`, or its
/// agent's heartbeat deadline passed. The deadline is set by each heartbeat (the API adds
/// `lifecycle.heartbeat_timeout`), so an agent that never sent one is judged by the status
/// timeout alone, and one that left on purpose has none.
pub fn overdue(m: &Machine, now: i64, timeout: Duration) -> Option<String> {
    super::failure_on_timeout(m.status)?;
    if now - m.status_since > i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX) {
        return Some(format!(
            "{} timed out after {} s",
            m.status,
            timeout.as_secs()
        ));
    }
    let deadline = m.heartbeat_deadline?;
    if now <= deadline {
        return None;
    }
    let ago = m
        .last_heartbeat
        .map_or_else(|| "?".to_string(), |t| ((now - t) / 1000).to_string());
    let step = match m.heartbeat_step.as_deref() {
        Some(s) if !s.is_empty() => format!(" (step {s})"),
        _ => String::new(),
    };
    Some(format!(
        "agent stopped answering: last heartbeat {ago} s ago{step}"
    ))
}

/// Remembers each machine's last polled power state, so only changes become events.
#[derive(Default)]
pub struct PowerPoll {
    last: std::collections::HashMap<String, crate::power::PowerState>,
}

impl PowerPoll {
    /// Records `state` for `id`; returns the event text when it differs from the last one.
    pub fn observe(
        &mut self,
        id: &str,
        state: Result<crate::power::PowerState, String>,
    ) -> Option<String> {
        use crate::power::PowerState;
        match state {
            Ok(state) => {
                let before = self.last.insert(id.to_string(), state);
                (before != Some(state)).then(|| match before {
                    Some(b) => format!("power poll: {b} -> {state}"),
                    None => format!("power poll: {state}"),
                })
            }
            // A failed query is reported once, until a query succeeds again.
            Err(e) => (self.last.insert(id.to_string(), PowerState::Unknown)
                != Some(PowerState::Unknown))
            .then(|| format!("power poll failed: {e}")),
        }
    }
}

impl Controller {
    /// Queries every machine with a remote power driver every `every`; a change of state (or
    /// a query starting to fail) becomes an event. Manual machines are not polled.
    pub async fn run_power_poll(self, every: Duration) {
        let mut poll = PowerPoll::default();
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if !self.site_duty.held().await {
                continue;
            }
            let Ok(machines) = self.store.call(|s| s.list_machines()).await else {
                continue;
            };
            // On a shared database, this site's machines only: they are the ones whose BMCs
            // this appliance reaches.
            let ours = |m: &&Machine| match (&self.site, &m.site) {
                (Some(mine), Some(theirs)) => **mine == **theirs,
                _ => true,
            };
            for m in machines
                .iter()
                .filter(|m| m.power.driver != "manual")
                .filter(ours)
            {
                let state = match power_params(m) {
                    Ok(p) => crate::power::PowerDriver::new(p)
                        .query()
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e),
                };
                let seen = *state.as_ref().unwrap_or(&crate::power::PowerState::Unknown);
                if m.power_state != Some(seen) {
                    self.power_seen(&m.id, seen).await;
                }
                if let Some(message) = poll.observe(&m.id, state)
                    && let Err(e) = self.note(&m.id, "power-poll", message).await
                {
                    tracing::warn!(machine = %m.id, error = %e, "cannot record the power poll");
                }
            }
        }
    }
}

#[cfg(test)]
mod overdue_tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn deploying() -> Machine {
        let mut m = Machine::new("m".into(), vec![], 0);
        m.status = Status::Deploying;
        m
    }

    #[test]
    fn the_status_timeout_comes_first() {
        let m = deploying();
        assert_eq!(overdue(&m, 60_000, MIN), None);
        let why = overdue(&m, 60_001, MIN).unwrap();
        assert_eq!(why, "deploying timed out after 60 s");
    }

    #[test]
    fn a_missed_heartbeat_fails_with_its_age_and_step() {
        let mut m = deploying();
        m.last_heartbeat = Some(1_000);
        m.heartbeat_step = Some("image".into());
        m.heartbeat_deadline = Some(11_000);
        assert_eq!(overdue(&m, 11_000, MIN), None);
        assert_eq!(
            overdue(&m, 16_000, MIN).as_deref(),
            Some("agent stopped answering: last heartbeat 15 s ago (step image)")
        );
    }

    #[test]
    fn no_deadline_no_heartbeat_rule() {
        // Never heard from, or left on purpose (image installed): only the status timeout.
        let mut m = deploying();
        m.last_heartbeat = Some(1_000);
        assert_eq!(overdue(&m, 50_000, MIN), None);
        // Idle statuses are never overdue, whatever their data says.
        m.status = Status::Ready;
        m.heartbeat_deadline = Some(2_000);
        assert_eq!(overdue(&m, 10_000_000, MIN), None);
    }
}

#[cfg(test)]
mod poll_tests {
    use super::*;
    use crate::power::PowerState;

    #[test]
    fn only_changes_and_new_failures_become_events() {
        let mut p = PowerPoll::default();
        assert_eq!(
            p.observe("m", Ok(PowerState::Off)).as_deref(),
            Some("power poll: off")
        );
        assert_eq!(p.observe("m", Ok(PowerState::Off)), None);
        assert_eq!(
            p.observe("m", Ok(PowerState::On)).as_deref(),
            Some("power poll: off -> on")
        );
        assert!(p.observe("m", Err("timeout".into())).is_some());
        assert_eq!(p.observe("m", Err("timeout".into())), None);
        assert!(p.observe("m", Ok(PowerState::On)).is_some());
    }
}
