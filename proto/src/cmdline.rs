//! The kernel command line the appliance writes into a boot script and the agent reads.
//!
//! Keys are named once here so both sides agree.

use std::net::{IpAddr, Ipv4Addr};

use crate::MacAddr;

/// Appliance base URL, e.g. `http://10.77.0.1:8080`.
pub const URL: &str = "stork.url";
/// Address the firmware obtained with its prefix or netmask: `10.77.0.100/24` or
/// `10.77.0.100/255.255.255.0` (what iPXE's `${netX/ip}/${netX/netmask}` expands to).
pub const IP: &str = "stork.ip";
/// Default gateway, if the subnet has one.
pub const GATEWAY: &str = "stork.gw";
/// PXELINUX convention for the boot NIC: `01-aa-bb-cc-dd-ee-ff`.
pub const BOOTIF: &str = "BOOTIF";
/// The machine's id, when the appliance knows it (absent while enlisting).
pub const MACHINE: &str = "stork.machine";
/// This boot's agent token: the only credential the agent's API calls accept.
pub const TOKEN: &str = "stork.token";
/// URL of the ephemeral root SquashFS the agent switches into before its task (optional).
pub const EPHEMERAL: &str = "stork.ephemeral";
/// Its sha256, 64 hex digits; given together with [`EPHEMERAL`].
pub const EPHEMERAL_SHA256: &str = "stork.ephemeral.sha256";
/// The API's base URL when it is served over HTTPS (`https://10.77.0.1:8443`); absent, the
/// agent calls the API at [`URL`].
pub const API: &str = "stork.api";
/// The fingerprint of the API's certificate, `sha256:` and 64 hex digits; given together
/// with [`API`]. The agent pins it: it checks no name and trusts no CA.
pub const TLS: &str = "stork.tls";

/// The API over HTTPS: where, and the certificate to pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiTls {
    pub url: String,
    /// `sha256:` and 64 lower-case hex digits.
    pub fingerprint: String,
}

/// The ephemeral root: where to fetch it and what its sha256 must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EphemeralRoot {
    pub url: String,
    /// Lower-case hex.
    pub sha256: String,
}

/// What the agent needs from its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentArgs {
    pub url: String,
    pub boot_mac: MacAddr,
    /// IPv4 or IPv6 (an IPv6 provisioning network: the gateway, if any, is IPv6 too).
    pub ip: IpAddr,
    pub prefix_len: u8,
    pub gateway: Option<IpAddr>,
    /// Set together when the machine is known: it then asks for its task.
    pub machine_id: Option<String>,
    pub token: Option<String>,
    /// Absent: the agent runs its task from the initrd.
    pub ephemeral: Option<EphemeralRoot>,
    /// Absent: the API is at `url`, over plain HTTP.
    pub api: Option<ApiTls>,
}

impl AgentArgs {
    /// Where the agent calls the API.
    pub fn api_url(&self) -> &str {
        self.api.as_ref().map_or(&self.url, |a| &a.url)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("kernel command line has no {0}=")]
    Missing(&'static str),
    #[error("kernel command line {key}={value:?} is invalid: {why}")]
    Invalid {
        key: &'static str,
        value: String,
        why: &'static str,
    },
}

/// Looks up `key=value` in a kernel command line (the last occurrence wins, as in the kernel).
/// Words are split where the kernel splits them: at ASCII whitespace, vertical tab included.
pub fn get<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    let is_space = |b: u8| b.is_ascii_whitespace() || b == 0x0b;
    let bytes = cmdline.as_bytes();
    let (mut i, mut found) = (0, None);
    while i < bytes.len() {
        if is_space(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !is_space(bytes[i]) {
            i += 1;
        }
        // Cut at ASCII bytes, so on character boundaries.
        let word = cmdline.get(start..i).unwrap_or_default();
        if let Some((k, v)) = word.split_once('=')
            && k == key
        {
            found = Some(v);
        }
    }
    found
}

/// A prefix length (up to 32 for IPv4, 128 for IPv6), or for IPv4 a contiguous dotted
/// netmask turned into one.
fn parse_prefix(s: &str, ipv6: bool) -> Option<u8> {
    if let Ok(p) = s.parse::<u8>() {
        return (p <= if ipv6 { 128 } else { 32 }).then_some(p);
    }
    if ipv6 {
        return None;
    }
    let mask = u32::from(s.parse::<Ipv4Addr>().ok()?);
    let ones = mask.leading_ones();
    // A netmask must be ones then zeros, e.g. 255.255.255.0.
    (mask.checked_shl(ones).unwrap_or(0) == 0).then_some(ones as u8)
}

/// A value the agent uses as it is (a URL, an id, a token): no whitespace (a non-ASCII
/// space stays inside a word) and no control characters, which would end up in its requests.
fn printable(key: &'static str, value: &str) -> Result<(), CmdlineError> {
    if value.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err(CmdlineError::Invalid {
            key,
            value: value.to_string(),
            why: "must be printable, without spaces",
        });
    }
    Ok(())
}

impl AgentArgs {
    pub fn parse(cmdline: &str) -> Result<Self, CmdlineError> {
        let need = |key: &'static str| get(cmdline, key).ok_or(CmdlineError::Missing(key));
        let invalid = |key: &'static str, value: &str, why: &'static str| CmdlineError::Invalid {
            key,
            value: value.to_string(),
            why,
        };

        let url = need(URL)?.trim_end_matches('/').to_string();
        printable(URL, &url)?;
        if !url.starts_with("http://") {
            return Err(invalid(URL, &url, "must start with http://"));
        }
        let bootif = need(BOOTIF)?;
        let boot_mac =
            MacAddr::from_bootif(bootif).map_err(|_| invalid(BOOTIF, bootif, "not a MAC"))?;
        let ip_text = need(IP)?;
        let (addr, prefix) = ip_text
            .split_once('/')
            .ok_or_else(|| invalid(IP, ip_text, "expected ADDRESS/PREFIX"))?;
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| invalid(IP, ip_text, "not an IP address"))?;
        let prefix_len = parse_prefix(prefix, ip.is_ipv6()).ok_or_else(|| {
            invalid(
                IP,
                ip_text,
                "prefix must be 0..=32 or a netmask (IPv6: 0..=128)",
            )
        })?;
        let gateway = match get(cmdline, GATEWAY) {
            None | Some("") => None,
            Some(g) => match g.parse::<IpAddr>() {
                Ok(gw) if gw.is_ipv6() == ip.is_ipv6() => Some(gw),
                _ => return Err(invalid(GATEWAY, g, "not an address of stork.ip's family")),
            },
        };
        let machine_id = get(cmdline, MACHINE)
            .filter(|v| !v.is_empty())
            .map(String::from);
        let token = get(cmdline, TOKEN)
            .filter(|v| !v.is_empty())
            .map(String::from);
        for (key, v) in [(MACHINE, &machine_id), (TOKEN, &token)] {
            if let Some(v) = v {
                printable(key, v)?;
            }
        }
        if machine_id.is_some() != token.is_some() {
            return Err(CmdlineError::Missing(if machine_id.is_some() {
                TOKEN
            } else {
                MACHINE
            }));
        }
        let ephemeral = parse_ephemeral(cmdline)?;
        let api = parse_api(cmdline)?;
        Ok(Self {
            url,
            boot_mac,
            ip,
            prefix_len,
            gateway,
            machine_id,
            token,
            ephemeral,
            api,
        })
    }

    /// The command-line fragment that [`AgentArgs::parse`] reads back.
    pub fn render(&self) -> String {
        let mut s = format!(
            "{URL}={} {BOOTIF}={} {IP}={}/{}",
            self.url,
            self.boot_mac.to_bootif(),
            self.ip,
            self.prefix_len
        );
        if let Some(gw) = self.gateway {
            s.push_str(&format!(" {GATEWAY}={gw}"));
        }
        if let (Some(m), Some(t)) = (&self.machine_id, &self.token) {
            s.push_str(&format!(" {MACHINE}={m} {TOKEN}={t}"));
        }
        if let Some(e) = &self.ephemeral {
            s.push_str(&format!(
                " {EPHEMERAL}={} {EPHEMERAL_SHA256}={}",
                e.url, e.sha256
            ));
        }
        if let Some(a) = &self.api {
            s.push_str(&format!(" {API}={} {TLS}={}", a.url, a.fingerprint));
        }
        s
    }
}

/// Both keys or neither (an empty value counts as absent).
fn parse_api(cmdline: &str) -> Result<Option<ApiTls>, CmdlineError> {
    let url = get(cmdline, API).filter(|v| !v.is_empty());
    let fp = get(cmdline, TLS).filter(|v| !v.is_empty());
    let (url, fp) = match (url, fp) {
        (None, None) => return Ok(None),
        (Some(_), None) => return Err(CmdlineError::Missing(TLS)),
        (None, Some(_)) => return Err(CmdlineError::Missing(API)),
        (Some(u), Some(f)) => (u, f),
    };
    // Trimmed before it is checked, as `stork.url` is: `https:///` is no URL.
    let url = url.trim_end_matches('/');
    printable(API, url)?;
    if !url.starts_with("https://") {
        return Err(CmdlineError::Invalid {
            key: API,
            value: url.to_string(),
            why: "must start with https://",
        });
    }
    let hex = fp.strip_prefix("sha256:").unwrap_or_default();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CmdlineError::Invalid {
            key: TLS,
            value: fp.to_string(),
            why: "must be sha256: and 64 hex digits",
        });
    }
    Ok(Some(ApiTls {
        url: url.to_string(),
        fingerprint: format!("sha256:{}", hex.to_ascii_lowercase()),
    }))
}

/// Both keys or neither; an empty value counts as absent, as for the other optional keys.
fn parse_ephemeral(cmdline: &str) -> Result<Option<EphemeralRoot>, CmdlineError> {
    let url = get(cmdline, EPHEMERAL).filter(|v| !v.is_empty());
    let sha = get(cmdline, EPHEMERAL_SHA256).filter(|v| !v.is_empty());
    let (url, sha) = match (url, sha) {
        (None, None) => return Ok(None),
        (Some(_), None) => return Err(CmdlineError::Missing(EPHEMERAL_SHA256)),
        (None, Some(_)) => return Err(CmdlineError::Missing(EPHEMERAL)),
        (Some(u), Some(s)) => (u, s),
    };
    printable(EPHEMERAL, url)?;
    if !url.starts_with("http://") {
        return Err(CmdlineError::Invalid {
            key: EPHEMERAL,
            value: url.to_string(),
            why: "must start with http://",
        });
    }
    if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CmdlineError::Invalid {
            key: EPHEMERAL_SHA256,
            value: sha.to_string(),
            why: "must be a sha256: 64 hex digits",
        });
    }
    Ok(Some(EphemeralRoot {
        url: url.to_string(),
        sha256: sha.to_ascii_lowercase(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> AgentArgs {
        AgentArgs {
            url: "http://10.77.0.1:8080".into(),
            boot_mac: "52:54:00:00:00:01".parse().unwrap(),
            ip: Ipv4Addr::new(10, 77, 0, 100).into(),
            prefix_len: 24,
            gateway: None,
            machine_id: None,
            token: None,
            ephemeral: None,
            api: None,
        }
    }

    #[test]
    fn render_then_parse_round_trips() {
        let a = args();
        let line = format!("console=ttyS0 {} quiet", a.render());
        assert_eq!(AgentArgs::parse(&line).unwrap(), a);
        let with_gw = AgentArgs {
            gateway: Some(Ipv4Addr::new(10, 77, 0, 1).into()),
            ..a
        };
        assert_eq!(AgentArgs::parse(&with_gw.render()).unwrap(), with_gw);
        let known = AgentArgs {
            machine_id: Some("abc123".into()),
            token: Some("stork_agent_x".into()),
            ..with_gw
        };
        assert_eq!(AgentArgs::parse(&known.render()).unwrap(), known);
        let tls = AgentArgs {
            api: Some(ApiTls {
                url: "https://10.77.0.1:8443".into(),
                fingerprint: format!("sha256:{}", "ab".repeat(32)),
            }),
            ..known
        };
        assert_eq!(AgentArgs::parse(&tls.render()).unwrap(), tls);
        assert_eq!(tls.api_url(), "https://10.77.0.1:8443");
        let no_pin = format!("{} {API}=https://10.77.0.1:8443", args().render());
        assert_eq!(AgentArgs::parse(&no_pin), Err(CmdlineError::Missing(TLS)));
        let half = format!("{} {MACHINE}=abc", args().render());
        assert_eq!(AgentArgs::parse(&half), Err(CmdlineError::Missing(TOKEN)));
    }

    #[test]
    fn names_the_missing_or_bad_key() {
        assert_eq!(
            AgentArgs::parse("console=ttyS0"),
            Err(CmdlineError::Missing(URL))
        );
        let bad = args().render().replace("/24", "/40");
        assert!(matches!(
            AgentArgs::parse(&bad),
            Err(CmdlineError::Invalid { key: IP, .. })
        ));
    }

    #[test]
    fn takes_an_ipv6_address_with_its_prefix() {
        let v6 = AgentArgs {
            url: "http://[fd77::1]:8080".into(),
            ip: "fd77::105".parse().unwrap(),
            prefix_len: 64,
            ..args()
        };
        assert_eq!(AgentArgs::parse(&v6.render()).unwrap(), v6);
        // No netmask form, no prefix past 128, no gateway of the other family.
        for bad in ["/ffff:ffff::", "/129"] {
            let line = v6.render().replace("/64", bad);
            assert!(AgentArgs::parse(&line).is_err(), "{line}");
        }
        let gw4 = format!("{} {GATEWAY}=10.77.0.1", v6.render());
        assert!(matches!(
            AgentArgs::parse(&gw4),
            Err(CmdlineError::Invalid { key: GATEWAY, .. })
        ));
    }

    #[test]
    fn accepts_a_dotted_netmask_as_ipxe_writes_it() {
        let line = args().render().replace("/24", "/255.255.255.0");
        assert_eq!(AgentArgs::parse(&line).unwrap().prefix_len, 24);
        let bad = args().render().replace("/24", "/255.0.255.0");
        assert!(AgentArgs::parse(&bad).is_err());
        let empty_gw = format!("{} {GATEWAY}=", args().render());
        assert_eq!(AgentArgs::parse(&empty_gw).unwrap().gateway, None);
    }

    #[test]
    fn ephemeral_root_is_optional_and_comes_in_pairs() {
        assert_eq!(AgentArgs::parse(&args().render()).unwrap().ephemeral, None);
        let sha = "7B1B23CD4C12E49A47448B31EA7EED51AEF9F776E0FAF9B5BE6490CEB63D9E78";
        let url = "http://10.77.0.1:8080/boot/ephemeral.squashfs";
        let line = format!(
            "{} {EPHEMERAL}={url} {EPHEMERAL_SHA256}={sha}",
            args().render()
        );
        let parsed = AgentArgs::parse(&line).unwrap();
        let want = EphemeralRoot {
            url: url.into(),
            sha256: sha.to_ascii_lowercase(),
        };
        assert_eq!(parsed.ephemeral.as_ref(), Some(&want));
        // The sha256 key is not mistaken for the URL key (and vice versa).
        assert_eq!(get(&line, EPHEMERAL), Some(url));
        assert_eq!(AgentArgs::parse(&parsed.render()).unwrap(), parsed);

        let only_url = format!("{} {EPHEMERAL}={url}", args().render());
        assert_eq!(
            AgentArgs::parse(&only_url),
            Err(CmdlineError::Missing(EPHEMERAL_SHA256))
        );
        let only_sha = format!("{} {EPHEMERAL_SHA256}={sha}", args().render());
        assert_eq!(
            AgentArgs::parse(&only_sha),
            Err(CmdlineError::Missing(EPHEMERAL))
        );
    }

    #[test]
    fn a_bad_ephemeral_sha256_names_its_key() {
        let url = "http://10.77.0.1:8080/boot/ephemeral.squashfs";
        for bad in ["abc", &"g".repeat(64), &"a".repeat(65)] {
            let line = format!(
                "{} {EPHEMERAL}={url} {EPHEMERAL_SHA256}={bad}",
                args().render()
            );
            let err = AgentArgs::parse(&line).unwrap_err();
            assert!(
                matches!(
                    err,
                    CmdlineError::Invalid {
                        key: EPHEMERAL_SHA256,
                        ..
                    }
                ),
                "{bad}: {err:?}"
            );
            assert!(err.to_string().contains(EPHEMERAL_SHA256), "{err}");
        }
        let line = format!(
            "{} {EPHEMERAL}=ftp://x/e {EPHEMERAL_SHA256}={}",
            args().render(),
            "a".repeat(64)
        );
        assert!(matches!(
            AgentArgs::parse(&line),
            Err(CmdlineError::Invalid { key: EPHEMERAL, .. })
        ));
    }

    #[test]
    fn last_occurrence_wins() {
        assert_eq!(get("a=1 b=2 a=3", "a"), Some("3"));
        assert_eq!(get("ab=1", "a"), None);
        // A vertical tab separates words, for the kernel and so here.
        assert_eq!(get("a=1\x0ba=2\n", "a"), Some("2"));
    }

    /// Found by the `cmdline` fuzz target: a control character or a non-ASCII space does
    /// not split a word, and was taken into the URL, the id or the token.
    #[test]
    fn values_used_as_they_are_must_be_printable() {
        let known = AgentArgs {
            machine_id: Some("abc123".into()),
            token: Some("stork_agent_x".into()),
            ..args()
        };
        for (key, from, to) in [
            (URL, "10.77.0.1", "10.\u{11}77.0.1"),
            (MACHINE, "abc123", "abc\u{a0}123"),
            (TOKEN, "stork_agent_x", "stork_agent_\u{2003}x"),
            (TOKEN, "stork_agent_x", "stork_agent_\u{7f}x"),
        ] {
            let line = known.render().replace(from, to);
            let err = AgentArgs::parse(&line).unwrap_err();
            assert!(
                matches!(err, CmdlineError::Invalid { key: k, .. } if k == key),
                "{line:?}: {err:?}"
            );
        }
        let line = format!(
            "{} {EPHEMERAL}=http://x/\u{85}e {EPHEMERAL_SHA256}={}",
            args().render(),
            "a".repeat(64)
        );
        assert!(matches!(
            AgentArgs::parse(&line),
            Err(CmdlineError::Invalid { key: EPHEMERAL, .. })
        ));
        // Also found by it: an API URL of slashes only was trimmed to `https:` after its check.
        let line = format!(
            "{} {API}=https:/// {TLS}=sha256:{}",
            args().render(),
            "a".repeat(64)
        );
        assert!(matches!(
            AgentArgs::parse(&line),
            Err(CmdlineError::Invalid { key: API, .. })
        ));
    }
}
