//! Runs `cargo test` passing its output through, and on failure repeats why each test
//! failed at the very end. CI keeps only the head and the tail of a long run: an end-to-end
//! test's panic message sits in the middle, after minutes of other binaries' output, and was
//! lost there.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, ExitStatus, Stdio};

use anyhow::{Context, Result, bail};

/// Lines kept of each failed test's panic message.
const LINES: usize = 12;
/// Characters kept of one line (consoles print long ones).
const WIDTH: usize = 300;

/// Runs `cmd` (a `cargo test`), its stdout passed through line by line; when it fails,
/// prints each failed test's panic message, cut short, and fails.
pub fn run_tests(cmd: &mut Command) -> Result<()> {
    let mut summary = Summary::default();
    let status = pass_through(cmd, &mut summary)?;
    if status.success() {
        return Ok(());
    }
    summary.close();
    summary.report();
    bail!("cargo test failed: {status}")
}

/// Runs `cmd` with its stdout passed through line by line and read into `summary`.
pub fn pass_through(cmd: &mut Command, summary: &mut Summary) -> Result<ExitStatus> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let stdout = child.stdout.take().context("the tests' stdout")?;
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading the tests' output")?;
        // A closed stdout must not stop the tests: keep reading so they are not blocked.
        let _ = writeln!(out, "{line}");
        summary.feed(&line);
    }
    drop(out);
    child.wait().context("waiting for the tests")
}

/// The failed tests' panic messages, read from libtest's `---- name stdout ----` sections.
#[derive(Default)]
pub struct Summary {
    pub failed: Vec<(String, Vec<String>)>,
    /// In a test's section: its lines kept so far, `None` before its panic line.
    open: Option<(String, Option<Vec<String>>)>,
}

impl Summary {
    pub fn feed(&mut self, line: &str) {
        if let Some(name) = line
            .strip_prefix("---- ")
            .and_then(|l| l.strip_suffix(" stdout ----"))
        {
            self.close();
            self.open = Some((name.to_string(), None));
            return;
        }
        if line == "failures:" || line.starts_with("test result: ") {
            self.close();
            return;
        }
        let Some((_, kept)) = &mut self.open else {
            return;
        };
        match kept {
            None if line.contains("panicked at ") => *kept = Some(vec![cut(line)]),
            Some(lines) if lines.len() < LINES => lines.push(cut(line)),
            _ => {}
        }
    }

    /// Ends the open section, if any (at the end of one binary's output).
    pub fn close(&mut self) {
        if let Some((name, kept)) = self.open.take() {
            let lines = kept.unwrap_or_else(|| vec!["(no panic message in its output)".into()]);
            self.failed.push((name, lines));
        }
    }

    /// Prints each failed test's panic message, cut short.
    pub fn report(&self) {
        eprintln!("\n=== why the tests failed (each panic's first {LINES} lines) ===");
        for (test, lines) in &self.failed {
            eprintln!("--- {test}");
            for l in lines {
                eprintln!("    {l}");
            }
        }
    }
}

fn cut(line: &str) -> String {
    match line.char_indices().nth(WIDTH) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_each_failed_tests_panic_message_from_libtests_output() {
        let out = "\
running 2 tests
test a ... FAILED
test b ... FAILED

failures:

---- a stdout ----
[ 1.0 s] a step
thread 'a' (12) panicked at tests/a.rs:10:5:
the reason
and more
---- b stdout ----
nothing useful

failures:
    a
    b

test result: FAILED. 0 passed; 2 failed";
        let mut s = Summary::default();
        out.lines().for_each(|l| s.feed(l));
        assert_eq!(
            s.failed,
            vec![
                (
                    "a".to_string(),
                    vec![
                        "thread 'a' (12) panicked at tests/a.rs:10:5:".to_string(),
                        "the reason".into(),
                        "and more".into(),
                    ]
                ),
                (
                    "b".to_string(),
                    vec!["(no panic message in its output)".to_string()]
                ),
            ]
        );
        assert_eq!(cut(&"é".repeat(WIDTH + 5)).chars().count(), WIDTH + 1);
    }
}
