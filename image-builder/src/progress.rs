//! Progress lines on stderr, each with the time since the build started, so a slow step shows
//! itself in the log without a profiler. stdout stays free for results.

use std::time::Instant;

#[derive(Debug, Clone)]
pub struct Progress {
    started: Instant,
    what: String,
}

impl Progress {
    pub fn new(what: &str) -> Self {
        Self {
            started: Instant::now(),
            what: what.to_owned(),
        }
    }

    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn say(&self, msg: &str) {
        eprintln!(
            "stork-image: {} [{:6.1} s] {msg}",
            self.what,
            self.elapsed()
        );
    }

    /// Runs one step between a start line and a line with its duration.
    pub fn step<T, E>(&self, msg: &str, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        self.say(&format!("{msg} ..."));
        let t = Instant::now();
        let r = f();
        if r.is_ok() {
            self.say(&format!("{msg}: {:.1} s", t.elapsed().as_secs_f64()));
        }
        r
    }
}
