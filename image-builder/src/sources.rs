//! The Debian mirror comes from the host's apt configuration, never from this code: deb822
//! `*.sources` files (the `URIs:` of the stanza whose `Suites:` include the suite) and the
//! one-line `sources.list` format. Manifests record a hash of the URIs, not the host name.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

pub const APT_DIR: &str = "/etc/apt";

#[derive(Debug, thiserror::Error)]
pub enum SourcesError {
    #[error(
        "no `deb` source for suite {suite:?} in {dir}/sources.list or {dir}/sources.list.d/: add the Debian mirror there (deb822 stanza with `Suites: {suite}`)"
    )]
    NoMirror { suite: String, dir: PathBuf },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One `deb` source: a repository URI and the suites taken from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub uri: String,
    pub suites: Vec<String>,
}

/// The repositories an image of `suite` is built from: the main mirror (which serves `suite`)
/// and every host source of `suite-*` (updates, security), in the host's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirrors {
    pub suite: String,
    /// URI of the source whose suites include `suite` itself: what debootstrap uses.
    pub main: String,
    /// Every (URI, suite) pair for `suite` and `suite-*`, as written into the image's apt
    /// sources so that the build also installs updates and security fixes.
    pub entries: Vec<Source>,
}

impl Mirrors {
    /// SHA-256 of the URIs and suites: lets a manifest show that two builds used the same
    /// mirrors without naming any host.
    pub fn sha256(&self) -> String {
        let mut h = Sha256::new();
        for e in &self.entries {
            h.update(e.uri.as_bytes());
            for s in &e.suites {
                h.update(b" ");
                h.update(s.as_bytes());
            }
            h.update(b"\n");
        }
        hex::encode(h.finalize())
    }

    /// Adds `suite` (a suite of this release, like `bookworm-backports`) unless a source
    /// already has it: from the main mirror, since Debian's archive serves a release's
    /// backports beside it, so a host that never used backports still builds an image with
    /// its kernel.
    pub fn with_suite(mut self, suite: &str) -> Self {
        if !self
            .entries
            .iter()
            .any(|e| e.suites.iter().any(|s| s == suite))
        {
            match self.entries.iter_mut().find(|e| e.uri == self.main) {
                Some(e) => e.suites.push(suite.to_owned()),
                None => self.entries.push(Source {
                    uri: self.main.clone(),
                    suites: vec![suite.to_owned()],
                }),
            }
        }
        self
    }

    /// The image's `/etc/apt/sources.list.d/debian.sources` (deb822).
    pub fn deb822(&self, components: &[String]) -> String {
        let mut out = String::from("# Written by stork-image from the build host's apt sources.\n");
        for e in &self.entries {
            out.push_str(&format!(
                "\nTypes: deb\nURIs: {}\nSuites: {}\nComponents: {}\n",
                e.uri,
                e.suites.join(" "),
                components.join(" ")
            ));
        }
        out
    }
}

/// Reads every `deb` source under `apt_dir` (normally `/etc/apt`).
pub fn host_sources(apt_dir: &Path) -> Result<Vec<Source>, SourcesError> {
    let mut found = Vec::new();
    let list = apt_dir.join("sources.list");
    if let Some(text) = read_optional(&list)? {
        found.extend(parse_one_line(&text));
    }
    let dir = apt_dir.join("sources.list.d");
    let mut files: Vec<PathBuf> = match fs::read_dir(&dir) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(source) => return Err(SourcesError::Read { path: dir, source }),
    };
    // apt reads the directory in lexical order.
    files.sort();
    for path in files {
        let parse: fn(&str) -> Vec<Source> = match path.extension().and_then(|e| e.to_str()) {
            Some("sources") => parse_deb822,
            Some("list") => parse_one_line,
            _ => continue,
        };
        if let Some(text) = read_optional(&path)? {
            found.extend(parse(&text));
        }
    }
    Ok(found)
}

fn read_optional(path: &Path) -> Result<Option<String>, SourcesError> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SourcesError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The mirrors for `suite` among the host's sources; for a release the host does not use
/// (a Debian 13 image built on Debian 12), the host's own release's sources with the suite
/// renamed, since one archive serves every release.
pub fn mirrors(apt_dir: &Path, suite: &str) -> Result<Mirrors, SourcesError> {
    let sources = host_sources(apt_dir)?;
    select(&sources, suite)
        .or_else(|| select(&renamed(&sources, suite)?, suite))
        .ok_or_else(|| SourcesError::NoMirror {
            suite: suite.to_owned(),
            dir: apt_dir.to_owned(),
        })
}

/// The host's sources with its own release (the first suite without a `-`, like `bookworm`)
/// and that release's `-updates`, `-security` renamed to `suite`'s; `None` if it has none.
fn renamed(sources: &[Source], suite: &str) -> Option<Vec<Source>> {
    let host = sources
        .iter()
        .flat_map(|s| &s.suites)
        .find(|x| !x.contains('-'))?;
    let prefix = format!("{host}-");
    Some(
        sources
            .iter()
            .map(|s| Source {
                uri: s.uri.clone(),
                suites: s
                    .suites
                    .iter()
                    .filter_map(|x| {
                        if x == host {
                            Some(suite.to_owned())
                        } else {
                            x.strip_prefix(&prefix)
                                .map(|rest| format!("{suite}-{rest}"))
                        }
                    })
                    .collect(),
            })
            .filter(|s| !s.suites.is_empty())
            .collect(),
    )
}

/// Picks the sources for `suite` (and `suite-updates`, `suite-security`, ...).
pub fn select(sources: &[Source], suite: &str) -> Option<Mirrors> {
    let prefix = format!("{suite}-");
    let main = sources
        .iter()
        .find(|s| s.suites.iter().any(|x| x == suite))?
        .uri
        .clone();
    let mut entries: Vec<Source> = Vec::new();
    for s in sources {
        let suites: Vec<String> = s
            .suites
            .iter()
            .filter(|x| *x == suite || x.starts_with(&prefix))
            .cloned()
            .collect();
        if suites.is_empty() {
            continue;
        }
        // The same repository listed twice (deb822 and sources.list) is merged.
        match entries.iter_mut().find(|e| e.uri == s.uri) {
            Some(e) => {
                for x in suites {
                    if !e.suites.contains(&x) {
                        e.suites.push(x);
                    }
                }
            }
            None => entries.push(Source {
                uri: s.uri.clone(),
                suites,
            }),
        }
    }
    Some(Mirrors {
        suite: suite.to_owned(),
        main,
        entries,
    })
}

/// deb822 stanzas: `Types:` must include `deb`, `Enabled: no` skips the stanza; each URI is
/// paired with the stanza's suites.
pub fn parse_deb822(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for stanza in stanzas(text) {
        let field = |name: &str| {
            stanza
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let is_deb = field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
        let enabled = field("Enabled").is_none_or(|v| !v.trim().eq_ignore_ascii_case("no"));
        if !is_deb || !enabled {
            continue;
        }
        let suites: Vec<String> = field("Suites")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        for uri in field("URIs").unwrap_or_default().split_whitespace() {
            out.push(Source {
                uri: uri.trim_end_matches('/').to_owned(),
                suites: suites.clone(),
            });
        }
    }
    out
}

/// Splits deb822 text into stanzas of (field, value); continuation lines (leading space or tab)
/// extend the previous field, `#` lines are comments.
fn stanzas(text: &str) -> Vec<Vec<(String, String)>> {
    let mut all = Vec::new();
    let mut cur: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                all.push(std::mem::take(&mut cur));
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = cur.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            cur.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    if !cur.is_empty() {
        all.push(cur);
    }
    all
}

/// One-line format: `deb [options] uri suite [component...]`.
pub fn parse_one_line(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        let Some(rest) = line
            .strip_prefix("deb ")
            .or_else(|| line.strip_prefix("deb\t"))
        else {
            continue;
        };
        let mut rest = rest.trim_start();
        if rest.starts_with('[') {
            match rest.find(']') {
                Some(end) => rest = rest[end + 1..].trim_start(),
                None => continue,
            }
        }
        let mut words = rest.split_whitespace();
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            out.push(Source {
                uri: uri.trim_end_matches('/').to_owned(),
                suites: vec![suite.to_owned()],
            });
        }
    }
    out
}

/// The host apt's HTTP proxy (`Acquire::http::Proxy`), for debootstrap and the chroot's apt,
/// which do not read the host's apt configuration. Never logged: it may hold credentials.
pub fn host_proxy() -> Option<String> {
    let out = Command::new("apt-config")
        .args(["shell", "P", "Acquire::http::Proxy"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let value = text.trim().strip_prefix("P=")?;
    let value = value.trim_matches('\'').trim_matches('"');
    (!value.is_empty() && value != "DIRECT").then(|| value.to_owned())
}

/// Adds the host's apt proxy to `cmd` unless the environment already names one.
pub fn proxy_env(cmd: &mut Command) {
    if std::env::var_os("http_proxy").is_none()
        && let Some(p) = host_proxy()
    {
        cmd.env("http_proxy", p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "\
Types: deb
# a comment
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm

Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main

Types: deb
Enabled: no
URIs: http://off.example/debian
Suites: bookworm
";

    #[test]
    fn deb822_stanzas_pair_uris_with_suites() {
        let s = parse_deb822(DEB822);
        assert_eq!(
            s,
            vec![
                Source {
                    uri: "http://mirror.example/debian".into(),
                    suites: vec!["bookworm".into(), "bookworm-updates".into()]
                },
                Source {
                    uri: "http://security.example/debian-security".into(),
                    suites: vec!["bookworm-security".into()]
                },
            ]
        );
        let m = select(&s, "bookworm").unwrap();
        assert_eq!(m.main, "http://mirror.example/debian");
        assert_eq!(m.entries.len(), 2);
        assert!(select(&s, "trixie").is_none());
        let text = m.deb822(&["main".into()]);
        assert!(
            text.contains("Suites: bookworm bookworm-updates\n"),
            "{text}"
        );
        assert!(text.contains("URIs: http://security.example/debian-security\n"));
    }

    #[test]
    fn one_line_sources_with_options_and_comments() {
        let s = parse_one_line(
            "# deb http://commented.example/debian bookworm main\n\
             deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main contrib\n\
             deb-src http://src.example/debian bookworm main\n\
             deb http://two.example/debian/ bookworm-security main # trailing\n",
        );
        assert_eq!(
            s,
            vec![
                Source {
                    uri: "http://one.example/debian".into(),
                    suites: vec!["bookworm".into()]
                },
                Source {
                    uri: "http://two.example/debian".into(),
                    suites: vec!["bookworm-security".into()]
                },
            ]
        );
    }

    #[test]
    fn the_same_uri_twice_is_merged_and_the_hash_names_no_host() {
        let s = vec![
            Source {
                uri: "http://m.example/debian".into(),
                suites: vec!["bookworm".into()],
            },
            Source {
                uri: "http://m.example/debian".into(),
                suites: vec!["bookworm-updates".into(), "bookworm".into()],
            },
            Source {
                uri: "http://other.example/debian".into(),
                suites: vec!["trixie".into()],
            },
        ];
        let m = select(&s, "bookworm").unwrap();
        assert_eq!(m.entries.len(), 1);
        assert_eq!(m.entries[0].suites, ["bookworm", "bookworm-updates"]);
        assert_eq!(m.sha256().len(), 64);
        assert!(!m.sha256().contains("example"));
    }

    #[test]
    fn reads_an_apt_directory() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("sources.list.d")).unwrap();
        fs::write(tmp.path().join("sources.list.d/debian.sources"), DEB822).unwrap();
        fs::write(
            tmp.path().join("sources.list.d/ignored.txt"),
            "deb http://x/ y\n",
        )
        .unwrap();
        let m = mirrors(tmp.path(), "bookworm").unwrap();
        assert_eq!(m.main, "http://mirror.example/debian");
        // Another release comes from the same mirrors, its suites renamed.
        let t = mirrors(tmp.path(), "trixie").unwrap();
        assert_eq!(t.main, m.main);
        let pairs = |m: &Mirrors| {
            m.entries
                .iter()
                .map(|e| (e.uri.clone(), e.suites.join(" ")))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            pairs(&t),
            pairs(&m)
                .into_iter()
                .map(|(u, s)| (u, s.replace("bookworm", "trixie")))
                .collect::<Vec<_>>()
        );
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            mirrors(empty.path(), "trixie"),
            Err(SourcesError::NoMirror { .. })
        ));
    }

    #[test]
    fn a_kernel_suite_the_host_lacks_comes_from_the_main_mirror() {
        let m = select(&parse_deb822(DEB822), "bookworm").unwrap();
        let with = m.clone().with_suite("bookworm-backports");
        assert_eq!(
            with.entries[0].suites,
            ["bookworm", "bookworm-updates", "bookworm-backports"]
        );
        assert_ne!(with.sha256(), m.sha256());
        // A suite some source already has is left where it is.
        assert_eq!(with.clone().with_suite("bookworm-security"), with);
    }
}
