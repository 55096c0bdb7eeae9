//! Running the tools (sgdisk, mkfs, blkid, grub-install): a failure carries the command and
//! the tail of its output.

use std::io;
use std::process::{Command, Stdio};

use super::error::ExtractError;
use crate::console;

/// Lines of a failed tool's output kept in the error.
pub(super) const TOOL_TAIL_LINES: usize = 12;

/// Runs a tool to completion; its failure carries the command and its output's tail.
pub(super) fn run(cmd: &mut Command) -> Result<String, ExtractError> {
    let tool = cmd.get_program().to_string_lossy().into_owned();
    let command = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    console::line(&format!("$ {command}"));
    let started = std::time::Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ExtractError::Missing {
                tool: tool.clone(),
                source,
            },
            _ => ExtractError::Spawn {
                tool: tool.clone(),
                source,
            },
        })?;
    // Where a deploy's time goes, on the console beside the command (a layout's finish is
    // mostly these tools under emulation).
    console::line(&format!(
        "  {tool}: {:.1} s, {}",
        started.elapsed().as_secs_f64(),
        out.status
    ));
    if !out.status.success() {
        return Err(ExtractError::Tool {
            command,
            status: out.status,
            tail: output_tail(&out.stdout, &out.stderr, TOOL_TAIL_LINES),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last `n` lines of stderr, else of stdout (some tools say why on stdout).
pub fn output_tail(stdout: &[u8], stderr: &[u8], n: usize) -> String {
    let pick = if String::from_utf8_lossy(stderr).trim().is_empty() {
        stdout
    } else {
        stderr
    };
    let text = String::from_utf8_lossy(pick);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return "(no output)".to_string();
    }
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_tail_is_the_last_lines_of_stderr_else_stdout() {
        assert_eq!(output_tail(b"", b"", 3), "(no output)");
        assert_eq!(output_tail(b"out\n", b"\n", 3), "out");
        assert_eq!(output_tail(b"out", b"a\nb\n\nc\nd\n", 3), "b\nc\nd");
    }
}
