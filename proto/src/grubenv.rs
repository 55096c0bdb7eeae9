//! GRUB's environment block (`grubenv`): the file `load_env` and `save_env` read and write,
//! and `grub-editenv` edits. Pure: bytes in, bytes out.
//!
//! The format, as GRUB's `grub-core/lib/envblk.c` reads and writes it: the signature line
//! `# GRUB Environment Block\n`, then one `name=value\n` line per variable, then `#` up to
//! the block's size (1024 bytes as `grub-editenv create` makes it). In a value, GRUB puts a
//! backslash before every `\` and every newline (the newline itself stays), and reading
//! takes the character after any backslash as it is. A line starting with `#` is a comment
//! up to the next newline; the padding is one long comment.
//!
//! The block is always written back at the size it was read with: GRUB's `save_env` writes
//! the file's sectors in place and refuses a file whose size changed, so a change that does
//! not fit is an error ([`GrubenvError::TooLarge`]), never a longer file. Comment lines other
//! than the padding are not kept (GRUB writes none).
//!
//! Nothing here panics, whatever the input.

use std::fmt;

/// The first line of every block.
pub const SIGNATURE: &str = "# GRUB Environment Block\n";
/// The size `grub-editenv create` gives a new block.
pub const DEFAULT_SIZE: usize = 1024;

/// The variables Stork's GRUB script keeps in the block to boot the A/B system slots.
pub mod stork {
    /// The committed slot, `a` or `b`; empty or unset means `a`.
    pub const SLOT: &str = "stork_slot";
    /// A slot to boot once, after an upgrade wrote it; `stork appliance commit` makes it the
    /// committed slot once it has booted.
    pub const TRY: &str = "stork_try";
    /// `1` once GRUB has started the try: the next boot falls back to [`SLOT`].
    pub const TRYING: &str = "stork_trying";
    /// The kernel command line key naming the slot that booted: `stork.slot=a`.
    pub const CMDLINE_SLOT: &str = "stork.slot";
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrubenvError {
    #[error("not a GRUB environment block: it does not start with {SIGNATURE:?}")]
    Signature,
    #[error("the block's line at byte {at} has no `=`")]
    NoEquals { at: usize },
    #[error("the block's variable at byte {at} is not UTF-8")]
    NotUtf8 { at: usize },
    #[error(
        "{name:?} is not a GRUB variable name (ASCII letters, digits and `_`, not starting \
         with `#`)"
    )]
    BadName { name: String },
    #[error("the value of {name} holds a NUL byte, which GRUB cannot keep")]
    Nul { name: String },
    #[error(
        "the variables need {need} bytes and the block holds {size}: GRUB's save_env needs \
         the file's size unchanged, so it is not made larger"
    )]
    TooLarge { need: usize, size: usize },
}

/// A parsed block: its lines in file order and the size it is written back at.
#[derive(Clone, PartialEq, Eq)]
pub struct GrubEnv {
    size: usize,
    lines: Vec<Line>,
}

/// One line of the block: a variable, or a comment kept byte for byte (Debian's
/// `grub-editenv create` writes a warning line under the signature).
#[derive(Clone, PartialEq, Eq)]
enum Line {
    Var(String, String),
    /// The raw line with its newline.
    Comment(Vec<u8>),
}

impl fmt::Debug for GrubEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrubEnv")
            .field("size", &self.size)
            .field("vars", &self.vars().collect::<Vec<_>>())
            .finish()
    }
}

impl GrubEnv {
    /// An empty block of `size` bytes (what `grub-editenv FILE create` writes at 1024, less
    /// Debian's warning line).
    pub fn new(size: usize) -> Result<Self, GrubenvError> {
        let env = Self {
            size,
            lines: Vec::new(),
        };
        env.check_fits(&env.lines)?;
        Ok(env)
    }

    /// Reads a whole block; its length is the size it is written back at.
    pub fn parse(block: &[u8]) -> Result<Self, GrubenvError> {
        let body = block
            .strip_prefix(SIGNATURE.as_bytes())
            .ok_or(GrubenvError::Signature)?;
        let base = SIGNATURE.len();
        // The padding: the run of `#` after the last newline, as GRUB's writer finds it.
        let end = body.iter().rposition(|&b| b != b'#').map_or(0, |last| {
            if body[last] == b'\n' {
                last + 1
            } else {
                body.len()
            }
        });
        let body = &body[..end];
        let mut lines = Vec::new();
        let mut i = 0;
        while i < body.len() {
            if body[i] == b'#' {
                let next = next_line(body, i);
                lines.push(Line::Comment(body[i..next].to_vec()));
                i = next;
                continue;
            }
            let start = i;
            // The name runs to the `=`; GRUB takes no escapes in names.
            let eq = body[i..]
                .iter()
                .position(|&b| b == b'=' || b == b'\n')
                .map(|p| i + p)
                .filter(|&p| body[p] == b'=')
                .ok_or(GrubenvError::NoEquals { at: base + start })?;
            let mut value = Vec::new();
            let mut j = eq + 1;
            while j < body.len() && body[j] != b'\n' {
                if body[j] == b'\\' {
                    j += 1;
                    if let Some(&c) = body.get(j) {
                        value.push(c);
                    }
                } else {
                    value.push(body[j]);
                }
                j += 1;
            }
            let utf8 = |b: Vec<u8>| {
                String::from_utf8(b).map_err(|_| GrubenvError::NotUtf8 { at: base + start })
            };
            lines.push(Line::Var(utf8(body[start..eq].to_vec())?, utf8(value)?));
            i = j + 1;
        }
        let env = Self {
            size: block.len(),
            lines,
        };
        // A last line cut off before its newline would come back one byte longer.
        env.check_fits(&env.lines)?;
        Ok(env)
    }

    /// The size the block is written back at.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The value of `name`: the first line that sets it, as GRUB's reader finds it.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// The variables in file order.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.lines.iter().filter_map(|l| match l {
            Line::Var(n, v) => Some((n.as_str(), v.as_str())),
            Line::Comment(_) => None,
        })
    }

    /// Sets `name` (in place if it is there, else after the last line, as GRUB does), unless
    /// the block would no longer fit its size; then nothing changes.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), GrubenvError> {
        check_name(name)?;
        if value.contains('\0') {
            return Err(GrubenvError::Nul { name: name.into() });
        }
        let mut lines = self.lines.clone();
        let found = lines.iter_mut().find_map(|l| match l {
            Line::Var(n, v) if n == name => Some(v),
            _ => None,
        });
        match found {
            Some(v) => *v = value.to_string(),
            None => lines.push(Line::Var(name.to_string(), value.to_string())),
        }
        self.check_fits(&lines)?;
        self.lines = lines;
        Ok(())
    }

    /// Removes `name` (every line setting it); whether it was there.
    pub fn unset(&mut self, name: &str) -> bool {
        let before = self.lines.len();
        self.lines
            .retain(|l| !matches!(l, Line::Var(n, _) if n == name));
        self.lines.len() != before
    }

    /// The block, exactly [`size`](Self::size) bytes long.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = encode(&self.lines);
        // Every way to build a `GrubEnv` checks that it fits (`new`, `parse`, `set`), so this
        // only ever pads.
        out.resize(self.size.max(out.len()), b'#');
        out
    }

    fn check_fits(&self, lines: &[Line]) -> Result<(), GrubenvError> {
        let need = encode(lines).len();
        if need > self.size {
            return Err(GrubenvError::TooLarge {
                need,
                size: self.size,
            });
        }
        Ok(())
    }
}

/// The index after the next newline at or after `i`, with GRUB's escapes (a backslash
/// hides the character after it).
fn next_line(body: &[u8], mut i: usize) -> usize {
    while i < body.len() {
        match body[i] {
            b'\\' => i += 2,
            b'\n' => return i + 1,
            _ => i += 1,
        }
    }
    body.len()
}

fn check_name(name: &str) -> Result<(), GrubenvError> {
    let ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(GrubenvError::BadName { name: name.into() })
    }
}

/// Signature and lines, without the padding.
fn encode(lines: &[Line]) -> Vec<u8> {
    let mut out = SIGNATURE.as_bytes().to_vec();
    for line in lines {
        match line {
            Line::Comment(raw) => {
                out.extend_from_slice(raw);
                // A comment cut off by the end of the body gets its line end back.
                if raw.last() != Some(&b'\n') {
                    out.push(b'\n');
                }
            }
            Line::Var(name, value) => {
                out.extend_from_slice(name.as_bytes());
                out.push(b'=');
                for b in value.bytes() {
                    if b == b'\\' || b == b'\n' {
                        out.push(b'\\');
                    }
                    out.push(b);
                }
                out.push(b'\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(body: &str, size: usize) -> Vec<u8> {
        let mut b = format!("{SIGNATURE}{body}").into_bytes();
        b.resize(size, b'#');
        b
    }

    #[test]
    fn reads_and_writes_what_grub_editenv_makes() {
        let bytes = block("saved_entry=0\nstork_slot=b\n", 1024);
        let env = GrubEnv::parse(&bytes).unwrap();
        assert_eq!(env.size(), 1024);
        assert_eq!(env.get("saved_entry"), Some("0"));
        assert_eq!(env.get(stork::SLOT), Some("b"));
        assert_eq!(env.get("nope"), None);
        assert_eq!(env.to_bytes(), bytes);
    }

    #[test]
    fn set_replaces_in_place_and_appends_new_names() {
        let mut env = GrubEnv::parse(&block("a=1\nb=2\n", 1024)).unwrap();
        env.set("a", "one").unwrap();
        env.set("c", "3").unwrap();
        assert_eq!(
            env.vars().collect::<Vec<_>>(),
            [("a", "one"), ("b", "2"), ("c", "3")]
        );
        assert!(env.unset("b"));
        assert!(!env.unset("b"));
        assert_eq!(env.to_bytes(), block("a=one\nc=3\n", 1024));
        // Empty values are kept as such.
        env.set("e", "").unwrap();
        assert_eq!(GrubEnv::parse(&env.to_bytes()).unwrap().get("e"), Some(""));
    }

    #[test]
    fn backslash_and_newline_are_escaped_as_grub_does() {
        let mut env = GrubEnv::new(256).unwrap();
        env.set("v", "a\\b\nc=d").unwrap();
        let bytes = env.to_bytes();
        assert!(
            bytes.starts_with(format!("{SIGNATURE}v=a\\\\b\\\nc=d\n#").as_bytes()),
            "{:?}",
            String::from_utf8_lossy(&bytes)
        );
        let back = GrubEnv::parse(&bytes).unwrap();
        assert_eq!(back.get("v"), Some("a\\b\nc=d"));
        assert_eq!(back, env);
    }

    #[test]
    fn the_size_never_changes_and_too_much_is_refused() {
        let mut env = GrubEnv::new(64).unwrap();
        // 25 bytes of signature; "x=" + value + "\n" must fit the other 39.
        env.set("x", &"y".repeat(35)).unwrap();
        assert_eq!(env.to_bytes().len(), 64);
        let err = env.set("z", "1").unwrap_err();
        assert_eq!(err, GrubenvError::TooLarge { need: 67, size: 64 });
        // Refused changes leave the block as it was.
        assert_eq!(env.get("z"), None);
        assert_eq!(env.to_bytes().len(), 64);
        // A value exactly filling the block leaves no padding, and parses back.
        let mut full = GrubEnv::new(64).unwrap();
        full.set("x", &"y".repeat(36)).unwrap();
        assert_eq!(full.to_bytes().last(), Some(&b'\n'));
        assert_eq!(GrubEnv::parse(&full.to_bytes()).unwrap(), full);
        assert!(full.set("x", &"y".repeat(37)).is_err());
        assert!(GrubEnv::new(10).is_err());
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert_eq!(
            GrubEnv::parse(b"# GRUB Environment\n").unwrap_err(),
            GrubenvError::Signature
        );
        assert_eq!(
            GrubEnv::parse(&block("novalue\n", 128)).unwrap_err(),
            GrubenvError::NoEquals { at: 25 }
        );
        // Truncated in the middle of a value, or after a lone backslash: read as far as it goes.
        let cut = format!("{SIGNATURE}a=bc\\");
        assert_eq!(GrubEnv::parse(cut.as_bytes()).unwrap().get("a"), Some("bc"));
        let mut bad = block("a=", 64);
        bad[27] = 0xff;
        assert!(matches!(
            GrubEnv::parse(&bad),
            Err(GrubenvError::NotUtf8 { .. })
        ));
        let mut env = GrubEnv::new(128).unwrap();
        for name in ["", "a=b", "#x", "a b", "a\n"] {
            assert!(
                matches!(env.set(name, "1"), Err(GrubenvError::BadName { .. })),
                "{name:?}"
            );
        }
        assert!(matches!(env.set("a", "\0"), Err(GrubenvError::Nul { .. })));
        // Every prefix of a real block parses or fails cleanly.
        let real = block("a=1\nb=x\\\\y\\\nz\n", 96);
        for n in 0..real.len() {
            let _ = GrubEnv::parse(&real[..n]);
        }
    }

    #[test]
    fn comment_lines_are_kept_and_skipped() {
        let text = "# WARNING: keep\na=1\n#\\\n still comment\nb=2\n";
        let bytes = block(text, 128);
        let mut env = GrubEnv::parse(&bytes).unwrap();
        assert_eq!(env.vars().collect::<Vec<_>>(), [("a", "1"), ("b", "2")]);
        assert_eq!(env.to_bytes(), bytes);
        env.set("c", "3").unwrap();
        assert!(env.unset("a"));
        assert_eq!(
            env.to_bytes(),
            block("# WARNING: keep\n#\\\n still comment\nb=2\nc=3\n", 128)
        );
        // A name set twice: the first is the one read and changed, `unset` drops both.
        let mut twice = GrubEnv::parse(&block("a=1\na=2\n", 64)).unwrap();
        assert_eq!(twice.get("a"), Some("1"));
        twice.set("a", "3").unwrap();
        assert_eq!(twice.to_bytes(), block("a=3\na=2\n", 64));
        assert!(twice.unset("a"));
        assert_eq!(twice.get("a"), None);
    }

    /// Cross-check with GRUB's own tool (Debian package `grub-common`): what grub-editenv
    /// writes we read, what we write grub-editenv reads and edits, byte for byte.
    #[test]
    fn agrees_with_grub_editenv() {
        use std::process::Command;
        let tool = "grub-editenv";
        if Command::new(tool).arg("--version").output().is_err() {
            eprintln!("skipped: {tool} is not installed (Debian package grub-common)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("grubenv");
        let run = |args: &[&str]| {
            let out = Command::new(tool).arg(&file).args(args).output().unwrap();
            assert!(out.status.success(), "{tool} {args:?}: {out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        let tricky = "x\\y\nz";
        run(&["create"]);
        run(&["set", "stork_slot=b", "stork_try=a", &format!("v={tricky}")]);
        run(&["set", "stork_slot=a"]);
        let bytes = std::fs::read(&file).unwrap();
        let mut env = GrubEnv::parse(&bytes).unwrap();
        assert_eq!(env.size(), DEFAULT_SIZE);
        assert_eq!(
            env.vars().collect::<Vec<_>>(),
            [("stork_slot", "a"), ("stork_try", "a"), ("v", tricky)]
        );
        assert_eq!(env.to_bytes(), bytes, "re-encoded byte for byte");

        // Ours, edited the way `stork appliance commit` does, read by grub-editenv.
        env.unset(stork::TRY);
        env.set(stork::TRYING, "1").unwrap();
        env.set("w", "=\\").unwrap();
        std::fs::write(&file, env.to_bytes()).unwrap();
        assert_eq!(
            run(&["list"]),
            format!("stork_slot=a\nv={tricky}\nstork_trying=1\nw==\\\n")
        );
        // And grub-editenv's edit of ours is what ours would have made.
        run(&["unset", "w"]);
        env.unset("w");
        assert_eq!(std::fs::read(&file).unwrap(), env.to_bytes());

        // A block of ours from scratch.
        let mut fresh = GrubEnv::new(DEFAULT_SIZE).unwrap();
        fresh.set(stork::SLOT, "b").unwrap();
        std::fs::write(&file, fresh.to_bytes()).unwrap();
        assert_eq!(run(&["list"]), "stork_slot=b\n");
        assert_eq!(std::fs::metadata(&file).unwrap().len(), DEFAULT_SIZE as u64);
    }
}
