//! Keeps the daemon's services running: a service that returns an error or panics is logged,
//! recorded in [`Health`] (the API's `/health`) and started again after a backoff, so one
//! bad packet or a passing socket error never takes DHCP, TFTP, HTTP and the API down
//! together. Only a fatal configuration error, found before the services start, ends the
//! daemon.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

pub use stork_proto::api::{HealthReport, ServiceHealth, ServiceState};

/// Shared between the supervisors and the API.
#[derive(Debug, Default)]
pub struct Health {
    services: Mutex<BTreeMap<String, ServiceHealth>>,
}

/// A service that failed this recently still makes the daemon `degraded`.
const RECENT: Duration = Duration::from_secs(300);

impl Health {
    pub fn report(&self) -> HealthReport {
        let services = self.lock().clone();
        let now = crate::store::now_ms();
        let recent = i64::try_from(RECENT.as_millis()).unwrap_or(i64::MAX);
        let degraded = services.values().any(|s| {
            s.state != ServiceState::Running || s.last_failure_ms.is_some_and(|t| now - t < recent)
        });
        HealthReport {
            status: if degraded { "degraded" } else { "ok" }.to_string(),
            services,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ServiceHealth>> {
        // A panic while holding this lock leaves plain data behind: keep using it.
        self.services.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn running(&self, name: &str) {
        let mut s = self.lock();
        let e = s.entry(name.to_string()).or_insert(ServiceHealth {
            state: ServiceState::Running,
            restarts: 0,
            last_error: None,
            last_failure_ms: None,
        });
        e.state = ServiceState::Running;
    }

    fn failed(&self, name: &str, why: String) {
        let mut s = self.lock();
        if let Some(e) = s.get_mut(name) {
            e.state = ServiceState::Restarting;
            e.restarts += 1;
            e.last_error = Some(why);
            e.last_failure_ms = Some(crate::store::now_ms());
        }
    }
}

/// The message a panic carried (`panic!` with a literal or a formatted string), or "".
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

/// Backoff between restarts: doubles from `first` up to `max`, back to `first` once a run
/// lasted `max` or more.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            first: Duration::from_secs(1),
            max: Duration::from_secs(30),
        }
    }
}

/// Runs `start()` as its own task, again and again: every end (error, panic, or an `Ok`
/// from a service that should never end) is recorded in `health` and followed by a restart
/// after the backoff. Returns only when cancelled.
pub async fn supervise<F, Fut>(name: &'static str, health: Arc<Health>, backoff: Backoff, start: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut wait = backoff.first;
    loop {
        health.running(name);
        let began = Instant::now();
        let why = match tokio::spawn(start()).await {
            Ok(Ok(())) => "ended".to_string(),
            Ok(Err(e)) => format!("{e:#}"),
            Err(e) if e.is_panic() => format!("panicked: {}", panic_message(&*e.into_panic())),
            Err(e) => format!("{e}"),
        };
        if began.elapsed() >= backoff.max {
            wait = backoff.first;
        }
        tracing::error!(service = name, error = %why, restart_in_ms = wait.as_millis() as u64, "service failed; restarting");
        health.failed(name, why);
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(backoff.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_failing_service_is_restarted_and_reported() {
        let health = Arc::new(Health::default());
        let runs = Arc::new(AtomicU32::new(0));
        let backoff = Backoff {
            first: Duration::from_millis(10),
            max: Duration::from_millis(40),
        };
        let r = runs.clone();
        let task = tokio::spawn(supervise("flaky", health.clone(), backoff, move || {
            let n = r.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 => anyhow::bail!("socket went away"),
                    1 => panic!("bug in a handler"),
                    _ => std::future::pending().await,
                }
            }
        }));
        for _ in 0..200 {
            if runs.load(Ordering::SeqCst) >= 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        let report = health.report();
        let s = &report.services["flaky"];
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(s.state, ServiceState::Running);
        assert_eq!(s.restarts, 2);
        assert_eq!(s.last_error.as_deref(), Some("panicked: bug in a handler"));
        // It failed a moment ago: the daemon says so.
        assert_eq!(report.status, "degraded");
        task.abort();
    }

    #[test]
    fn a_quiet_daemon_is_ok() {
        let h = Health::default();
        h.running("dhcp");
        let r = h.report();
        assert_eq!(r.status, "ok");
        assert_eq!(r.services["dhcp"].restarts, 0);
    }
}
