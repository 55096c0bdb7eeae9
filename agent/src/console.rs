//! The serial console: every line the agent prints carries the `stork-agent:` prefix.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::Write;
use std::sync::Mutex;

use anyhow::{Context, Result};
use nix::sys::stat::{SFlag, fstat, major, minor};

/// Prints `stork-agent: <step>: <message>` on the console.
macro_rules! say {
    ($step:expr, $($arg:tt)*) => {
        $crate::console::line(&format!("{}: {}", $step, format_args!($($arg)*)))
    };
}
pub(crate) use say;

/// The last lines printed, for the log tail of a failure report.
static TAIL: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());
const TAIL_LINES: usize = 40;

/// Prints `stork-agent: <text>`.
pub fn line(text: &str) {
    // A console write error must not panic PID 1, and there is nowhere better to report it.
    let _ = writeln!(std::io::stdout().lock(), "stork-agent: {text}");
    // A poisoned lock only means another thread panicked mid-push; the lines are still fine.
    let mut tail = TAIL.lock().unwrap_or_else(|p| p.into_inner());
    if tail.len() == TAIL_LINES {
        tail.pop_front();
    }
    tail.push_back(text.to_string());
}

/// The last `n` console lines, oldest first.
pub fn tail(n: usize) -> String {
    let tail = TAIL.lock().unwrap_or_else(|p| p.into_inner());
    let skip = tail.len().saturating_sub(n);
    tail.iter()
        .skip(skip)
        .cloned()
        .collect::<Vec<_>>()
        .join("\n")
}

/// Points stdin, stdout and stderr at /dev/console when they ended up on /dev/null.
///
/// If the kernel could not open /dev/console for init, Rust's runtime reopens the missing
/// descriptors on /dev/null and every message would vanish; devtmpfs gives us a second chance.
/// Returns whether it had to reattach.
pub fn reattach_if_null() -> Result<bool> {
    let st = fstat(std::io::stdout()).context("fstat stdout")?;
    let is_char = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFCHR;
    // /dev/null is character device 1:3 on every Linux.
    if !(is_char && major(st.st_rdev) == 1 && minor(st.st_rdev) == 3) {
        return Ok(false);
    }
    let console = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
        .context("open /dev/console")?;
    nix::unistd::dup2_stdin(&console).context("dup2 stdin")?;
    nix::unistd::dup2_stdout(&console).context("dup2 stdout")?;
    nix::unistd::dup2_stderr(&console).context("dup2 stderr")?;
    Ok(true)
}

/// `10.0 GiB`, `512 MiB`: short enough for one console line per device.
pub fn human_bytes(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    if bytes >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else {
        format!("{} MiB", bytes / MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_picks_a_readable_unit() {
        assert_eq!(human_bytes(0), "0 MiB");
        assert_eq!(human_bytes(512 << 20), "512 MiB");
        assert_eq!(human_bytes(10 << 30), "10.0 GiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }
}
