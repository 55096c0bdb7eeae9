//! The `[dhcp]` section: its file form (serde, every key defaulted) and the validated
//! runtime form the DHCP service is built from. Validation names the field at fault.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, invalid};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DhcpMode {
    Full,
    Proxy,
    Off,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DhcpFile {
    pub mode: DhcpMode,
    pub range: [Ipv4Addr; 2],
    pub prefix_len: u8,
    pub lease_time: u32,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub ntp: Vec<Ipv4Addr>,
    pub mtu: Option<u16>,
    pub exclude: Vec<[Ipv4Addr; 2]>,
    pub reservations: Vec<ReservationFile>,
    /// Inclusive, outside `range`: the addresses a deploy's network config asks for with
    /// `auto`, each given to one machine (recorded with its deploy, free again on release).
    pub static_range: Option<[Ipv4Addr; 2]>,
    pub probation: u32,
    pub rate_limit: u32,
    pub rate_burst: u32,
    /// Requests per second (and burst) from one source address that has an address
    /// (clients without one all send from 0.0.0.0 and are not counted here; neither are
    /// relayed requests, whose source speaks for a whole subnet); 0 = no limit.
    pub rate_limit_source: u32,
    pub rate_burst_source: u32,
    /// Requests per second (and burst) from everyone together; 0 = no limit.
    pub rate_limit_global: u32,
    pub rate_burst_global: u32,
    /// The addresses relays send from. Unset: a relayed request is believed when it comes
    /// from its giaddr or from an address inside a configured subnet (see
    /// [`RelayPolicy`]); a list (even empty) allows those sources only.
    pub relays: Option<Vec<Ipv4Addr>>,
    pub ipv6_ra: bool,
    pub ha: HaFile,
    pub subnets: Vec<SubnetFile>,
}

/// `[dhcp.ha]`: two appliances on one network sharing its pool, leases in the shared
/// PostgreSQL database (see `dhcp::ha`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HaFile {
    /// `first` or `second`; unset: no HA pair.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<crate::dhcp::ha::Role>,
    /// Seconds the partner may be gone before this server answers its clients too.
    pub failover: u64,
}

impl Default for HaFile {
    fn default() -> Self {
        Self {
            role: None,
            failover: 10,
        }
    }
}

/// A validated `[dhcp.ha]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HaConfig {
    pub role: crate::dhcp::ha::Role,
    pub failover: std::time::Duration,
}

/// A fixed address for one MAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReservationFile {
    pub mac: stork_proto::MacAddr,
    pub ip: Ipv4Addr,
}

/// `[[dhcp.subnets]]`: a subnet behind a relay. Unset options come from `[dhcp]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubnetFile {
    /// `a.b.c.d/len`.
    pub network: String,
    #[serde(default = "default_mode")]
    pub mode: DhcpMode,
    #[serde(default)]
    pub ranges: Vec<[Ipv4Addr; 2]>,
    #[serde(default)]
    pub exclude: Vec<[Ipv4Addr; 2]>,
    #[serde(default)]
    pub reservations: Vec<ReservationFile>,
    pub lease_time: Option<u32>,
    pub router: Option<Ipv4Addr>,
    pub dns: Option<Vec<Ipv4Addr>>,
    pub domain: Option<String>,
    pub ntp: Option<Vec<Ipv4Addr>>,
    pub mtu: Option<u16>,
}

fn default_mode() -> DhcpMode {
    DhcpMode::Full
}

/// Default per-source limit: far above what one host with an address sends (a renewal per
/// T1, an INFORM, a PXE request), low enough that a host flooding with made-up MACs (which
/// the per-MAC limit cannot see) is held to it. Relays are not counted here, so the
/// benchmark (perfdhcp, one relay source, ~24,000 requests/s) is not throttled.
pub const DEFAULT_RATE_SOURCE: RateLimit = RateLimit {
    per_second: 100,
    burst: 200,
};

/// Default global limit: a ceiling on the work floods can cause, not a fair share. A rack
/// of a thousand machines powering on at once sends a few thousand requests a second; the
/// benchmark's highest sustained rate on the 2-core reference machine is ~12,000 leases/s,
/// i.e. ~24,000 requests/s (docs/measurements.md), and its rate search tries up to 32,000:
/// 50,000 leaves it untouched. Lower it to what the site needs.
pub const DEFAULT_RATE_GLOBAL: RateLimit = RateLimit {
    per_second: 50_000,
    burst: 10_000,
};

impl Default for DhcpFile {
    fn default() -> Self {
        Self {
            mode: DhcpMode::Full,
            range: [Ipv4Addr::new(10, 77, 0, 100), Ipv4Addr::new(10, 77, 0, 199)],
            prefix_len: 24,
            lease_time: 3600,
            router: None,
            dns: Vec::new(),
            domain: None,
            ntp: Vec::new(),
            mtu: None,
            exclude: Vec::new(),
            reservations: Vec::new(),
            static_range: None,
            probation: 600,
            rate_limit: 10,
            rate_burst: 20,
            rate_limit_source: DEFAULT_RATE_SOURCE.per_second,
            rate_burst_source: DEFAULT_RATE_SOURCE.burst,
            rate_limit_global: DEFAULT_RATE_GLOBAL.per_second,
            rate_burst_global: DEFAULT_RATE_GLOBAL.burst,
            relays: None,
            ipv6_ra: true,
            ha: HaFile::default(),
            subnets: Vec::new(),
        }
    }
}

/// An IPv4 subnet: an address and its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Subnet {
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Self {
        Self { addr, prefix_len }
    }
    pub fn mask(&self) -> Ipv4Addr {
        Ipv4Addr::from(
            u32::MAX
                .checked_shl(32 - u32::from(self.prefix_len))
                .unwrap_or(0),
        )
    }
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & u32::from(self.mask()))
    }
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) | !u32::from(self.mask()))
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & u32::from(self.mask()) == u32::from(self.network())
    }
}

/// The validated `[dhcp]` section.
#[derive(Debug, Clone)]
pub struct DhcpConfig {
    /// The provisioning subnet (the keys directly under `[dhcp]`) first, then
    /// `[[dhcp.subnets]]` in file order.
    pub subnets: Vec<SubnetConfig>,
    /// How long a declined address stays out of use.
    pub probation: std::time::Duration,
    /// Per-MAC token bucket; `None` when `rate_limit = 0`.
    pub rate_limit: Option<RateLimit>,
    /// Per-source-address token bucket (`rate_limit_source`); `None` when 0.
    pub rate_limit_source: Option<RateLimit>,
    /// One token bucket for every request (`rate_limit_global`); `None` when 0.
    pub rate_limit_global: Option<RateLimit>,
    /// Which sources may send relayed requests (giaddr set).
    pub relays: RelayPolicy,
    /// Send IPv6 router advertisements that configure nothing (see `dhcp::ra`).
    pub ipv6_ra: bool,
    /// This server's part in an HA pair, if it is in one.
    pub ha: Option<HaConfig>,
    /// `dhcp.static_range` of the provisioning subnet, inclusive.
    pub static_range: Option<(Ipv4Addr, Ipv4Addr)>,
}

impl DhcpConfig {
    /// The provisioning subnet, where requests that did not come through a relay belong.
    pub fn local(&self) -> &SubnetConfig {
        // validate() always puts the provisioning subnet first.
        &self.subnets[0]
    }
    /// Whether any subnet needs the DHCP sockets.
    pub fn serves(&self) -> bool {
        self.subnets.iter().any(|s| s.mode != DhcpMode::Off)
    }
    /// Whether any subnet is in proxyDHCP mode (port 4011 is needed).
    pub fn proxies(&self) -> bool {
        self.subnets.iter().any(|s| s.mode == DhcpMode::Proxy)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

impl RateLimit {
    /// `None` for a rate of 0 (no limit); a burst of 0 is one.
    pub fn from_file(per_second: u32, burst: u32) -> Option<Self> {
        (per_second > 0).then(|| Self {
            per_second,
            burst: burst.max(1),
        })
    }
}

/// Who may relay: a relayed request (giaddr set) is answered only when its datagram's
/// source passes this, and its giaddr lies in a configured subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayPolicy {
    /// `dhcp.relays` unset, the default: the source is the giaddr itself (routers relay
    /// from the interface facing the clients), or an address inside a configured subnet
    /// (ISC dhcrelay sends from its upstream leg, on the provisioning network: the e2e test
    /// `tests/tests/dhcp_relay.rs` relays with giaddr 10.78.0.1 from 10.77.0.2). Configs
    /// written before the list existed keep working; a datagram routed in from anywhere
    /// else with a giaddr is refused. A host on a served subnet can still claim to be a
    /// relay: listing the relays closes that.
    Implicit,
    /// `dhcp.relays = [...]`: only these sources (an empty list: no relayed requests).
    Listed(Vec<Ipv4Addr>),
}

/// One subnet Stork serves.
#[derive(Debug, Clone)]
pub struct SubnetConfig {
    /// The config path it came from, for logs: `dhcp` or `dhcp.subnets[N]`.
    pub name: String,
    pub mode: DhcpMode,
    pub net: Subnet,
    /// Dynamic ranges, inclusive, sorted and disjoint.
    pub ranges: Vec<(Ipv4Addr, Ipv4Addr)>,
    /// Inclusive ranges never handed out dynamically.
    pub exclude: Vec<(Ipv4Addr, Ipv4Addr)>,
    pub reservations: Vec<(stork_proto::MacAddr, Ipv4Addr)>,
    pub lease_time: u32,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub ntp: Vec<Ipv4Addr>,
    pub mtu: Option<u16>,
}

fn invalid_at(field: String, why: impl Into<String>) -> ConfigError {
    ConfigError::InvalidAt {
        field,
        why: why.into(),
    }
}

/// `a.b.c.d/len` with len 1..=30.
fn parse_network(text: &str) -> Option<Subnet> {
    let (addr, len) = text.split_once('/')?;
    let addr: Ipv4Addr = addr.trim().parse().ok()?;
    let len: u8 = len.trim().parse().ok()?;
    (1..=30).contains(&len).then(|| Subnet::new(addr, len))
}

/// Host-name syntax (RFC 1123 labels), as option 15 carries it.
fn valid_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.trim_end_matches('.').split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The parts every subnet has, checked the same way wherever they come from.
struct SubnetParts<'a> {
    prefix: String,
    mode: DhcpMode,
    net: Subnet,
    ranges: Vec<[Ipv4Addr; 2]>,
    exclude: &'a [[Ipv4Addr; 2]],
    reservations: &'a [ReservationFile],
    lease_time: u32,
    router: Option<Ipv4Addr>,
    dns: Vec<Ipv4Addr>,
    domain: Option<String>,
    ntp: Vec<Ipv4Addr>,
    mtu: Option<u16>,
}

impl SubnetParts<'_> {
    /// `range_key` is what the file calls the ranges (`range` or `ranges`).
    fn validate(self, range_key: &str, own: Ipv4Addr) -> Result<SubnetConfig, ConfigError> {
        let p = &self.prefix;
        let net = self.net;
        let host = |ip: Ipv4Addr| net.contains(ip) && ip != net.network() && ip != net.broadcast();
        let pairs =
            |key: &str, list: &[[Ipv4Addr; 2]]| -> Result<Vec<(Ipv4Addr, Ipv4Addr)>, ConfigError> {
                let mut out = Vec::new();
                for [a, b] in list.iter().copied() {
                    if u32::from(a) > u32::from(b) {
                        return Err(invalid_at(
                            format!("{p}.{key}"),
                            format!("start {a} is after end {b}"),
                        ));
                    }
                    for ip in [a, b] {
                        if !host(ip) {
                            return Err(invalid_at(
                                format!("{p}.{key}"),
                                format!(
                                    "{ip} is not a host address in {}/{}",
                                    net.network(),
                                    net.prefix_len
                                ),
                            ));
                        }
                    }
                    out.push((a, b));
                }
                out.sort_by_key(|(a, _)| u32::from(*a));
                Ok(out)
            };
        let ranges = pairs(range_key, &self.ranges)?;
        for w in ranges.windows(2) {
            if let [(_, end), (start, _)] = w
                && u32::from(*start) <= u32::from(*end)
            {
                return Err(invalid_at(
                    format!("{p}.{range_key}"),
                    format!("ranges overlap at {start}"),
                ));
            }
        }
        for (a, b) in &ranges {
            if (u32::from(*a)..=u32::from(*b)).contains(&u32::from(own)) {
                return Err(invalid_at(
                    format!("{p}.{range_key}"),
                    format!("contains the appliance's own address {own}"),
                ));
            }
        }
        let exclude = pairs("exclude", self.exclude)?;
        let mut reservations = Vec::new();
        for (i, r) in self.reservations.iter().enumerate() {
            if !host(r.ip) || r.ip == own {
                return Err(invalid_at(
                    format!("{p}.reservations[{i}].ip"),
                    format!(
                        "{} is not a free host address in {}/{}",
                        r.ip,
                        net.network(),
                        net.prefix_len
                    ),
                ));
            }
            reservations.push((r.mac, r.ip));
        }
        if self.lease_time < 60 {
            return Err(invalid_at(
                format!("{p}.lease_time"),
                "must be at least 60 seconds",
            ));
        }
        if let Some(router) = self.router
            && !net.contains(router)
        {
            return Err(invalid_at(
                format!("{p}.router"),
                format!("{router} is outside the subnet"),
            ));
        }
        if let Some(d) = &self.domain
            && !valid_domain(d)
        {
            return Err(invalid_at(
                format!("{p}.domain"),
                format!("{d:?} is not a domain name"),
            ));
        }
        if let Some(mtu) = self.mtu
            && mtu < 68
        {
            return Err(invalid_at(
                format!("{p}.mtu"),
                "must be at least 68 (RFC 2132)",
            ));
        }
        Ok(SubnetConfig {
            name: self.prefix,
            mode: self.mode,
            net,
            ranges,
            exclude,
            reservations,
            lease_time: self.lease_time,
            router: self.router,
            dns: self.dns,
            domain: self.domain,
            ntp: self.ntp,
            mtu: self.mtu,
        })
    }
}

impl DhcpFile {
    /// Checks the `[dhcp]` section; `own` is the appliance's address, which fixes the
    /// provisioning subnet.
    pub fn validate(&self, own: Ipv4Addr) -> Result<DhcpConfig, ConfigError> {
        let d = self;
        if !(1..=30).contains(&d.prefix_len) {
            return Err(invalid("dhcp.prefix_len", "must be 1..=30"));
        }
        let local = SubnetParts {
            prefix: "dhcp".into(),
            mode: d.mode,
            net: Subnet::new(own, d.prefix_len),
            ranges: vec![d.range],
            exclude: &d.exclude,
            reservations: &d.reservations,
            lease_time: d.lease_time,
            router: d.router,
            dns: d.dns.clone(),
            domain: d.domain.clone(),
            ntp: d.ntp.clone(),
            mtu: d.mtu,
        }
        .validate("range", own)?;
        let mut subnets = vec![local];
        for (i, s) in d.subnets.iter().enumerate() {
            let prefix = format!("dhcp.subnets[{i}]");
            let net = parse_network(&s.network).ok_or_else(|| {
                invalid_at(
                    format!("{prefix}.network"),
                    format!("{:?} is not a.b.c.d/len with len 1..=30", s.network),
                )
            })?;
            if let Some(other) = subnets
                .iter()
                .find(|o| o.net.contains(net.network()) || net.contains(o.net.network()))
            {
                return Err(invalid_at(
                    format!("{prefix}.network"),
                    format!(
                        "overlaps {} ({}/{})",
                        other.name,
                        other.net.network(),
                        other.net.prefix_len
                    ),
                ));
            }
            if s.mode == DhcpMode::Full && s.ranges.is_empty() && s.reservations.is_empty() {
                return Err(invalid_at(
                    format!("{prefix}.ranges"),
                    "a full subnet needs ranges or reservations",
                ));
            }
            subnets.push(
                SubnetParts {
                    prefix,
                    mode: s.mode,
                    net,
                    ranges: s.ranges.clone(),
                    exclude: &s.exclude,
                    reservations: &s.reservations,
                    lease_time: s.lease_time.unwrap_or(d.lease_time),
                    router: s.router,
                    dns: s.dns.clone().unwrap_or_else(|| d.dns.clone()),
                    domain: s.domain.clone().or_else(|| d.domain.clone()),
                    ntp: s.ntp.clone().unwrap_or_else(|| d.ntp.clone()),
                    mtu: s.mtu.or(d.mtu),
                }
                .validate("ranges", own)?,
            );
        }
        for (i, r) in d.relays.iter().flatten().enumerate() {
            if r.is_unspecified() || r.is_broadcast() || r.is_multicast() {
                return Err(invalid_at(
                    format!("dhcp.relays[{i}]"),
                    format!("{r} cannot be a relay's source address"),
                ));
            }
        }
        let mut macs = std::collections::HashMap::new();
        let mut ips = std::collections::HashMap::new();
        for s in &subnets {
            for (i, (mac, ip)) in s.reservations.iter().enumerate() {
                let field = || format!("{}.reservations[{i}]", s.name);
                if let Some(prev) = macs.insert(*mac, field()) {
                    return Err(invalid_at(
                        format!("{}.mac", field()),
                        format!("{mac} is also reserved in {prev}"),
                    ));
                }
                if let Some(prev) = ips.insert(*ip, field()) {
                    return Err(invalid_at(
                        format!("{}.ip", field()),
                        format!("{ip} is also reserved in {prev}"),
                    ));
                }
            }
        }
        let static_range = match d.static_range {
            Some([first, last]) => {
                let net = subnets[0].net;
                let host =
                    |ip: Ipv4Addr| net.contains(ip) && ip != net.network() && ip != net.broadcast();
                let why = if !(host(first) && host(last)) {
                    Some(format!(
                        "must be inside {}/{}",
                        net.network(),
                        net.prefix_len
                    ))
                } else if first > last {
                    Some(format!("{first} is after {last}"))
                } else if subnets[0]
                    .ranges
                    .iter()
                    .any(|(a, b)| first <= *b && *a <= last)
                {
                    Some("overlaps dhcp.range: DHCP would lease what it gives to deploys".into())
                } else {
                    [Some(own), d.router]
                        .into_iter()
                        .flatten()
                        .find(|ip| (first..=last).contains(ip))
                        .map(|ip| format!("holds {ip}, the appliance's or the router's address"))
                };
                if let Some(why) = why {
                    return Err(invalid("dhcp.static_range", why));
                }
                Some((first, last))
            }
            None => None,
        };
        if d.ha.role.is_some() && d.ha.failover == 0 {
            return Err(invalid_at(
                "dhcp.ha.failover".into(),
                "must be at least 1 second",
            ));
        }
        Ok(DhcpConfig {
            ha: d.ha.role.map(|role| HaConfig {
                role,
                failover: std::time::Duration::from_secs(d.ha.failover),
            }),
            subnets,
            probation: std::time::Duration::from_secs(u64::from(d.probation)),
            rate_limit: RateLimit::from_file(d.rate_limit, d.rate_burst),
            rate_limit_source: RateLimit::from_file(d.rate_limit_source, d.rate_burst_source),
            rate_limit_global: RateLimit::from_file(d.rate_limit_global, d.rate_burst_global),
            relays: match &d.relays {
                None => RelayPolicy::Implicit,
                Some(list) => RelayPolicy::Listed(list.clone()),
            },
            ipv6_ra: d.ipv6_ra,
            static_range,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FileConfig;

    fn dhcp(text: &str) -> Result<DhcpConfig, String> {
        FileConfig::parse(text, std::path::Path::new("x"))
            .and_then(|f| f.validate())
            .map(|c| c.dhcp)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn relays_and_limits_default_and_parse() {
        let d = dhcp("").unwrap();
        assert_eq!(d.relays, RelayPolicy::Implicit);
        assert_eq!(d.rate_limit_source, Some(DEFAULT_RATE_SOURCE));
        assert_eq!(d.rate_limit_global, Some(DEFAULT_RATE_GLOBAL));
        let d = dhcp(
            "[dhcp]\nrelays = [\"10.77.0.2\"]\nrate_limit_source = 0\nrate_limit_global = 7\nrate_burst_global = 0\n",
        )
        .unwrap();
        assert_eq!(
            d.relays,
            RelayPolicy::Listed(vec![Ipv4Addr::new(10, 77, 0, 2)])
        );
        assert_eq!(d.rate_limit_source, None);
        assert_eq!(
            d.rate_limit_global,
            Some(RateLimit {
                per_second: 7,
                burst: 1
            })
        );
        assert_eq!(
            dhcp("[dhcp]\nrelays = []\n").unwrap().relays,
            RelayPolicy::Listed(Vec::new())
        );
        let err = dhcp("[dhcp]\nrelays = [\"10.77.0.2\", \"0.0.0.0\"]\n").unwrap_err();
        assert!(err.contains("`dhcp.relays[1]`"), "{err}");
    }
}
