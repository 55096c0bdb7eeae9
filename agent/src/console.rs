//! The serial console: every line the agent prints carries the `stork-agent:` prefix.

use std::collections::VecDeque;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result};
use nix::sys::stat::{SFlag, fstat, major, minor};

/// Sizes on the console read as the `stork` CLI prints them; callers keep their
/// `console::human_bytes` path.
pub use stork_proto::units::human_bytes;

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

/// Writes the remembered lines to `path`, so that the next program image of PID 1 (stage 2,
/// after the exec) can [`restore`] them and a later failure's log tail still shows stage 1.
pub fn save(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let text = tail(TAIL_LINES);
    fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

/// Takes back the lines [`save`] wrote (without printing them again) and removes the file;
/// returns how many. A missing file is 0 lines.
pub fn restore(path: &Path) -> Result<usize> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    let lines: Vec<&str> = text.lines().collect();
    prepend(&mut TAIL.lock().unwrap_or_else(|p| p.into_inner()), &lines);
    fs::remove_file(path).with_context(|| format!("remove {}", path.display()))?;
    Ok(lines.len())
}

/// Older lines go in front of anything printed since, as far as the ring has room.
fn prepend(tail: &mut VecDeque<String>, older: &[&str]) {
    for line in older.iter().rev() {
        if tail.len() >= TAIL_LINES {
            break;
        }
        tail.push_front((*line).to_string());
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_lines_survive_the_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run/stork/console.log");
        line("stage one: a line to keep");
        save(&file).unwrap();
        let saved = fs::read_to_string(&file).unwrap();
        assert!(saved.contains("stage one: a line to keep"), "{saved}");
        assert_eq!(restore(&file).unwrap(), saved.lines().count());
        assert!(!file.exists());
        assert_eq!(restore(&file).unwrap(), 0);
    }

    #[test]
    fn restored_lines_go_in_front_and_never_overflow() {
        let mut ring: VecDeque<String> = VecDeque::from(["two: first".to_string()]);
        prepend(&mut ring, &["one: a", "one: b"]);
        assert_eq!(ring, ["one: a", "one: b", "two: first"]);

        let many: Vec<String> = (0..TAIL_LINES + 5).map(|i| format!("old {i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        prepend(&mut ring, &many);
        assert_eq!(ring.len(), TAIL_LINES);
        // The newest of the old lines are kept, right before the ones already there.
        assert_eq!(ring[TAIL_LINES - 4], format!("old {}", TAIL_LINES + 4));
        assert_eq!(ring[TAIL_LINES - 1], "two: first");
    }
}
