//! The A/B system slots, as GRUB's script and `stork appliance commit` share them through
//! GRUB's environment block (`stork_proto::grubenv`):
//!
//! | variable | set by | meaning |
//! |---|---|---|
//! | `stork_slot` | commit | the committed slot, `a` or `b`; empty or unset: `a` |
//! | `stork_try` | an upgrade | a slot to boot once |
//! | `stork_trying` | GRUB | `1` once GRUB has started that try; GRUB boots `stork_slot` then |
//!
//! The booted slot is the kernel command line's `stork.slot=a|b`. After a boot: `stork_try`
//! equal to the booted slot means the upgrade booted, so it becomes `stork_slot` and the
//! try ends; `stork_try` naming the other slot means GRUB fell back, so the try ends and
//! the failure is said; anything else changes nothing. [`decide`] is that rule, pure.

use std::path::{Path, PathBuf};

use serde::Serialize;
use stork_proto::grubenv::{GrubEnv, GrubenvError, stork as var};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "a" => Some(Self::A),
            "b" => Some(Self::B),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::A => "a",
            Self::B => "b",
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the running system keeps its version (one line).
pub const VERSION_FILE: &str = "/usr/lib/stork/version";

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("GRUB environment block {path}")]
    Grubenv {
        path: PathBuf,
        #[source]
        source: GrubenvError,
    },
    #[error("cannot write GRUB environment block {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} has no `stork.slot=a` or `stork.slot=b`: this system was not booted by the \
         appliance image's GRUB"
    )]
    NoSlot { path: PathBuf },
    #[error("GRUB environment variable {name}={value:?} is not a slot (`a` or `b`)")]
    BadValue { name: &'static str, value: String },
}

/// The slot the kernel command line names (the last `stork.slot=`, as the kernel's own
/// parameters go).
pub fn booted_slot(cmdline: &str) -> Option<Slot> {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix(var::CMDLINE_SLOT)?.strip_prefix('='))
        .next_back()
        .and_then(Slot::parse)
}

/// What a commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// The tried slot booted and is now the committed one.
    Committed(Slot),
    /// GRUB fell back: `tried` did not boot, `running` runs; the try is over.
    FellBack { tried: Slot, running: Slot },
    /// No try pending: nothing changed.
    Nothing,
}

impl std::fmt::Display for Commit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Committed(s) => write!(f, "upgrade to slot {s} committed"),
            Self::FellBack { tried, running } => write!(
                f,
                "the upgrade to slot {tried} failed to boot; slot {running} runs (its system \
                 is unchanged)"
            ),
            Self::Nothing => f.write_str("no upgrade pending: nothing to commit"),
        }
    }
}

/// The variable `name` as a slot; unset or empty is `None`.
fn slot_var(env: &GrubEnv, name: &'static str) -> Result<Option<Slot>, SlotError> {
    match env.get(name) {
        None | Some("") => Ok(None),
        Some(v) => Slot::parse(v).map(Some).ok_or_else(|| SlotError::BadValue {
            name,
            value: v.to_string(),
        }),
    }
}

/// The commit rule (see the module doc), applied to `env`.
pub fn decide(env: &mut GrubEnv, booted: Slot) -> Result<Commit, SlotError> {
    let Some(tried) = slot_var(env, var::TRY)? else {
        return Ok(Commit::Nothing);
    };
    let grub = |source| SlotError::Grubenv {
        path: PathBuf::from("(in memory)"),
        source,
    };
    if tried == booted {
        // One value replaces another of the same length, and two lines go: it always fits.
        env.set(var::SLOT, booted.as_str()).map_err(grub)?;
    }
    env.unset(var::TRY);
    env.unset(var::TRYING);
    Ok(if tried == booted {
        Commit::Committed(booted)
    } else {
        Commit::FellBack {
            tried,
            running: booted,
        }
    })
}

fn read_env(path: &Path) -> Result<GrubEnv, SlotError> {
    let bytes = std::fs::read(path).map_err(|source| SlotError::Read {
        path: path.into(),
        source,
    })?;
    GrubEnv::parse(&bytes).map_err(|source| SlotError::Grubenv {
        path: path.into(),
        source,
    })
}

fn read_booted(cmdline: &Path) -> Result<Slot, SlotError> {
    let text = std::fs::read_to_string(cmdline).map_err(|source| SlotError::Read {
        path: cmdline.into(),
        source,
    })?;
    booted_slot(&text).ok_or_else(|| SlotError::NoSlot {
        path: cmdline.into(),
    })
}

/// `stork appliance commit`: the rule on the block in `grubenv`, written back (same size)
/// only when it changed.
pub fn commit(grubenv: &Path, cmdline: &Path) -> Result<Commit, SlotError> {
    let booted = read_booted(cmdline)?;
    let mut env = read_env(grubenv)?;
    let outcome = decide(&mut env, booted).map_err(|e| match e {
        SlotError::Grubenv { source, .. } => SlotError::Grubenv {
            path: grubenv.into(),
            source,
        },
        e => e,
    })?;
    if outcome != Commit::Nothing {
        super::write_file(grubenv, &env.to_bytes(), 0o644).map_err(|source| SlotError::Write {
            path: grubenv.into(),
            source,
        })?;
    }
    Ok(outcome)
}

/// The running system's version: the first line of `version_file`, else this binary's.
pub fn running_version(version_file: &Path) -> String {
    std::fs::read_to_string(version_file)
        .ok()
        .and_then(|t| t.lines().next().map(|l| l.trim().to_string()))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string())
}

/// `stork appliance status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    pub booted: Slot,
    pub committed: Slot,
    /// `stork_try`: the slot an upgrade asked to boot once.
    #[serde(rename = "try")]
    pub try_slot: Option<Slot>,
    /// `stork_trying`: GRUB has started that try.
    pub trying: bool,
    pub slots: Vec<SlotState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotState {
    pub slot: Slot,
    pub running: bool,
    pub committed: bool,
    /// In words: what GRUB does with it next.
    pub state: String,
    /// Known for the running slot only (the other one is not mounted).
    pub version: Option<String>,
}

pub fn status(grubenv: &Path, cmdline: &Path, version_file: &Path) -> Result<Status, SlotError> {
    let booted = read_booted(cmdline)?;
    let env = read_env(grubenv)?;
    status_of(&env, booted, running_version(version_file))
}

fn status_of(env: &GrubEnv, booted: Slot, version: String) -> Result<Status, SlotError> {
    let committed = slot_var(env, var::SLOT)?.unwrap_or(Slot::A);
    let try_slot = slot_var(env, var::TRY)?;
    let trying = env.get(var::TRYING) == Some("1");
    let slots = Slot::ALL
        .iter()
        .map(|&slot| {
            let running = slot == booted;
            let is_try = try_slot == Some(slot);
            let state = match (running, slot == committed, is_try, trying) {
                (true, _, true, _) => "running on trial: `stork appliance commit` makes it the \
                                       committed slot"
                    .to_string(),
                (true, true, false, _) => "running, committed".into(),
                (true, false, false, _) => {
                    "running, not committed (GRUB boots the committed slot next)".into()
                }
                (false, _, true, false) => "upgrade pending: boots once at the next boot".into(),
                (false, _, true, true) => {
                    "failed to boot: GRUB fell back (`stork appliance commit` clears this)".into()
                }
                (false, true, false, _) => "committed: GRUB boots it next".into(),
                (false, false, false, _) => "standby".into(),
            };
            SlotState {
                slot,
                running,
                committed: slot == committed,
                state,
                version: running.then(|| version.clone()),
            }
        })
        .collect();
    Ok(Status {
        booted,
        committed,
        try_slot,
        trying,
        slots,
    })
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for s in &self.slots {
            write!(f, "slot {}: {}", s.slot, s.state)?;
            if let Some(v) = &s.version {
                write!(f, "; version {v}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> GrubEnv {
        let mut e = GrubEnv::new(stork_proto::grubenv::DEFAULT_SIZE).unwrap();
        for (n, v) in vars {
            e.set(n, v).unwrap();
        }
        e
    }

    #[test]
    fn the_booted_slot_is_on_the_command_line() {
        assert_eq!(
            booted_slot("BOOT_IMAGE=/vmlinuz ro stork.slot=b quiet\n"),
            Some(Slot::B)
        );
        assert_eq!(booted_slot("stork.slot=a stork.slot=b"), Some(Slot::B));
        assert_eq!(booted_slot("stork.slots=a stork.slot=c"), None);
        assert_eq!(booted_slot("ro quiet"), None);
    }

    /// The three cases, each on a block file made by our grubenv module and read back.
    #[test]
    fn commit_on_a_grubenv_file() {
        let dir = tempfile::tempdir().unwrap();
        let (grubenv, cmdline) = (dir.path().join("grubenv"), dir.path().join("cmdline"));
        let case = |vars: &[(&str, &str)], booted: &str| {
            std::fs::write(&grubenv, env(vars).to_bytes()).unwrap();
            std::fs::write(&cmdline, format!("ro stork.slot={booted}\n")).unwrap();
            use std::os::unix::fs::MetadataExt;
            // Written back = renamed over: a new inode.
            let before = std::fs::metadata(&grubenv).unwrap().ino();
            let outcome = commit(&grubenv, &cmdline).unwrap();
            let bytes = std::fs::read(&grubenv).unwrap();
            assert_eq!(bytes.len(), 1024, "the size never changes");
            let after = std::fs::metadata(&grubenv).unwrap().ino();
            (outcome, GrubEnv::parse(&bytes).unwrap(), before == after)
        };

        // The upgrade to b booted: b is committed, the try is over.
        let (o, e, _) = case(
            &[
                ("saved_entry", "0"),
                ("stork_slot", "a"),
                ("stork_try", "b"),
                ("stork_trying", "1"),
            ],
            "b",
        );
        assert_eq!(o, Commit::Committed(Slot::B));
        assert_eq!(o.to_string(), "upgrade to slot b committed");
        assert_eq!(
            e.vars().collect::<Vec<_>>(),
            [("saved_entry", "0"), ("stork_slot", "b")]
        );

        // GRUB fell back to a: the try is over, a stays committed.
        let (o, e, _) = case(
            &[
                ("stork_slot", "a"),
                ("stork_try", "b"),
                ("stork_trying", "1"),
            ],
            "a",
        );
        assert_eq!(
            o,
            Commit::FellBack {
                tried: Slot::B,
                running: Slot::A
            }
        );
        assert!(
            o.to_string()
                .contains("upgrade to slot b failed to boot; slot a runs")
        );
        assert_eq!(e.vars().collect::<Vec<_>>(), [("stork_slot", "a")]);

        // Nothing pending (an empty stork_slot means a): the file is not written.
        let (o, e, untouched) = case(&[("stork_slot", "")], "a");
        assert_eq!(o, Commit::Nothing);
        assert!(untouched);
        assert_eq!(e.get("stork_slot"), Some(""));

        // A first commit on a block without stork_slot sets it.
        let (o, e, _) = case(&[("stork_try", "a")], "a");
        assert_eq!(o, Commit::Committed(Slot::A));
        assert_eq!(e.vars().collect::<Vec<_>>(), [("stork_slot", "a")]);

        // Nonsense is named, and nothing is written.
        std::fs::write(&grubenv, env(&[("stork_try", "c")]).to_bytes()).unwrap();
        let err = commit(&grubenv, &cmdline).unwrap_err().to_string();
        assert!(err.contains("stork_try") && err.contains("\"c\""), "{err}");
        std::fs::write(&cmdline, "ro quiet").unwrap();
        let err = commit(&grubenv, &cmdline).unwrap_err().to_string();
        assert!(err.contains("stork.slot"), "{err}");
    }

    #[test]
    fn status_says_what_grub_does_next() {
        let s = status_of(&env(&[("stork_slot", "a")]), Slot::A, "1.2".into()).unwrap();
        assert_eq!(s.committed, Slot::A);
        assert_eq!(
            s.to_string(),
            "slot a: running, committed; version 1.2\nslot b: standby\n"
        );

        let s = status_of(&env(&[("stork_try", "b")]), Slot::A, "1.2".into()).unwrap();
        assert_eq!(s.try_slot, Some(Slot::B));
        assert!(s.slots[1].state.starts_with("upgrade pending"), "{s}");

        let s = status_of(
            &env(&[
                ("stork_slot", "a"),
                ("stork_try", "b"),
                ("stork_trying", "1"),
            ]),
            Slot::B,
            "1.3".into(),
        )
        .unwrap();
        assert!(s.slots[1].state.starts_with("running on trial"), "{s}");
        assert_eq!(s.slots[1].version.as_deref(), Some("1.3"));
        assert!(s.slots[0].state.starts_with("committed"), "{s}");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["try"], "b");
        assert_eq!(json["booted"], "b");
        assert_eq!(json["trying"], true);

        let s = status_of(
            &env(&[
                ("stork_slot", "a"),
                ("stork_try", "b"),
                ("stork_trying", "1"),
            ]),
            Slot::A,
            "1.2".into(),
        )
        .unwrap();
        assert!(s.slots[1].state.starts_with("failed to boot"), "{s}");
    }

    #[test]
    fn the_version_file_or_ours() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("version");
        assert_eq!(running_version(&f), env!("CARGO_PKG_VERSION"));
        std::fs::write(&f, "2026.05.1 (abc123)\n").unwrap();
        assert_eq!(running_version(&f), "2026.05.1 (abc123)");
    }
}
