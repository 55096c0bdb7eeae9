//! The installed OS's network as a deploy asks for it: Ethernet NICs (by MAC), bonds, VLANs
//! and bridges over them, each with DHCP or static addresses, routes and DNS. Shared by the
//! appliance (which validates the request and checks the NICs are the machine's) and the
//! agent (which writes it as the image's own network configuration). Without one, the
//! installed OS runs DHCP on the NIC it booted from.
//!
//! Shaped like netplan's, flattened into one list so every mistake has one field path:
//!
//! ```json
//! {"interfaces": [
//!    {"name": "en0", "mac": "52:54:00:77:01:31"},
//!    {"name": "en1", "mac": "52:54:00:77:01:32"},
//!    {"name": "bond0", "bond": {"members": ["en0", "en1"], "mode": "active-backup"},
//!     "addresses": ["10.77.0.50/24"], "gateway4": "10.77.0.1"},
//!    {"name": "bond0.100", "vlan": {"link": "bond0", "id": 100},
//!     "addresses": ["10.78.0.50/24"]}],
//!  "dns": {"servers": ["10.77.0.1"], "search": ["lab"]}}
//! ```

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::MacAddr;

/// An address the appliance allocates from its static range.
pub const AUTO: &str = "auto";

/// Linux's interface name limit (IFNAMSIZ less the NUL).
pub const MAX_NAME: usize = 15;
pub const MAX_INTERFACES: usize = 64;
/// Per interface; also routes per interface.
pub const MAX_ADDRESSES: usize = 32;
/// resolv.conf's limits as glibc reads them.
pub const MAX_DNS_SERVERS: usize = 3;
pub const MAX_SEARCH: usize = 6;
pub const MIN_MTU: u32 = 576;
pub const MAX_MTU: u32 = 9216;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

/// One interface: exactly one of `mac` (a NIC), `bond`, `vlan` or `bridge` says what it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Interface {
    /// A bond, VLAN or bridge is made with this name; a NIC keeps the name the OS gives it
    /// (this one is how the others refer to it).
    pub name: String,
    /// A NIC of the machine, by its permanent MAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub mac: Option<MacAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bond: Option<Bond>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<Vlan>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<Bridge>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub dhcp4: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub dhcp6: bool,
    /// Static addresses with their prefix length (`10.77.0.50/24`, `fd77::50/64`), or
    /// [`AUTO`]: the appliance picks one from its `dhcp.static_range` that no other machine
    /// holds, and the deploy records it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// The default route's next hop over this interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub gateway4: Option<std::net::Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub gateway6: Option<std::net::Ipv6Addr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 576, maximum = 9216))]
    pub mtu: Option<u32>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Bond {
    /// NICs of this config, by name.
    pub members: Vec<String>,
    pub mode: BondMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum BondMode {
    #[serde(rename = "active-backup")]
    ActiveBackup,
    #[serde(rename = "802.3ad")]
    Lacp,
    #[serde(rename = "balance-rr")]
    BalanceRr,
    #[serde(rename = "balance-xor")]
    BalanceXor,
    #[serde(rename = "balance-tlb")]
    BalanceTlb,
    #[serde(rename = "balance-alb")]
    BalanceAlb,
    #[serde(rename = "broadcast")]
    Broadcast,
}

impl BondMode {
    /// The kernel's (and networkd's, netplan's) name.
    pub fn name(self) -> &'static str {
        match self {
            Self::ActiveBackup => "active-backup",
            Self::Lacp => "802.3ad",
            Self::BalanceRr => "balance-rr",
            Self::BalanceXor => "balance-xor",
            Self::BalanceTlb => "balance-tlb",
            Self::BalanceAlb => "balance-alb",
            Self::Broadcast => "broadcast",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Vlan {
    /// The NIC or bond it is tagged on, by name.
    pub link: String,
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 4094))]
    pub id: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Bridge {
    /// NICs, bonds or VLANs of this config, by name.
    pub members: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// A prefix (`10.80.0.0/16`) or `default`.
    pub to: String,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub via: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>))]
    pub servers: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty() && self.search.is_empty()
    }
}

/// What an interface is, with that field's settings ([`Interface::what`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum What<'a> {
    Nic(MacAddr),
    Bond(&'a Bond),
    Vlan(&'a Vlan),
    Bridge(&'a Bridge),
}

/// A mistake in a network config, with its field's path (`interfaces[2].vlan.link`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("network.{field}: {why}")]
pub struct NetError {
    pub field: String,
    pub why: String,
}

fn ensure(
    ok: bool,
    field: impl FnOnce() -> String,
    why: impl FnOnce() -> String,
) -> Result<(), NetError> {
    if ok {
        Ok(())
    } else {
        Err(NetError {
            field: field(),
            why: why(),
        })
    }
}

/// An address with its prefix length, as `addresses` and `routes[].to` take it.
/// Strict: the length in plain digits (no sign, no leading zero), and no IPv4-mapped IPv6
/// address (the same host under a second spelling).
pub fn parse_prefix(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, len) = s.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    if !len.bytes().all(|b| b.is_ascii_digit()) || (len.len() > 1 && len.starts_with('0')) {
        return None;
    }
    if let IpAddr::V6(v6) = ip
        && v6.to_ipv4_mapped().is_some()
    {
        return None;
    }
    let len: u8 = len.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((ip, len))
}

/// An address's host bits under prefix length `len`.
fn host_bits(ip: IpAddr, len: u8) -> u128 {
    match ip {
        IpAddr::V4(v4) => {
            u128::from(u32::from(v4) & u32::MAX.checked_shr(u32::from(len)).unwrap_or(0))
        }
        IpAddr::V6(v6) => u128::from(v6) & u128::MAX.checked_shr(u32::from(len)).unwrap_or(0),
    }
}

/// Whether `ip` is inside the prefix `net`/`len` (of the same family).
pub fn prefix_contains((net, len): (IpAddr, u8), ip: IpAddr) -> bool {
    let bits = |a: IpAddr| match a {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    };
    net.is_ipv4() == ip.is_ipv4()
        && bits(net) - host_bits(net, len) == bits(ip) - host_bits(ip, len)
}

/// Names the kernel or networkd keep for themselves.
const RESERVED_NAMES: &[&str] = &["lo", "all", "default", "bonding_masters"];

impl Interface {
    /// What it is, when exactly one of `mac`, `bond`, `vlan`, `bridge` is set.
    pub fn what(&self) -> Option<What<'_>> {
        match (self.mac, &self.bond, &self.vlan, &self.bridge) {
            (Some(mac), None, None, None) => Some(What::Nic(mac)),
            (None, Some(b), None, None) => Some(What::Bond(b)),
            (None, None, Some(v), None) => Some(What::Vlan(v)),
            (None, None, None, Some(b)) => Some(What::Bridge(b)),
            _ => None,
        }
    }

    /// Whether it gets an address of its own (and so is not only a member or a carrier).
    pub fn addressed(&self) -> bool {
        self.dhcp4 || self.dhcp6 || !self.addresses.is_empty()
    }

    /// The interfaces it enslaves (a bond's or bridge's members).
    pub fn members(&self) -> &[String] {
        match (&self.bond, &self.bridge) {
            (Some(b), _) => &b.members,
            (_, Some(b)) => &b.members,
            _ => &[],
        }
    }
}

impl NetworkConfig {
    /// The interface named `name`.
    pub fn get(&self, name: &str) -> Option<&Interface> {
        self.interfaces.iter().find(|i| i.name == name)
    }

    /// The bond or bridge that enslaves `name`.
    pub fn master_of(&self, name: &str) -> Option<&Interface> {
        self.interfaces
            .iter()
            .find(|i| i.members().iter().any(|m| m == name))
    }

    /// The VLANs tagged on `name`.
    pub fn vlans_on<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Interface> + 'a {
        self.interfaces
            .iter()
            .filter(move |i| i.vlan.as_ref().is_some_and(|v| v.link == name))
    }

    /// Checks the config by itself; every mistake names its field.
    pub fn validate(&self) -> Result<(), NetError> {
        let f = |i: usize, rest: &str| format!("interfaces[{i}]{rest}");
        ensure(
            !self.interfaces.is_empty() && self.interfaces.len() <= MAX_INTERFACES,
            || "interfaces".into(),
            || {
                format!(
                    "1 to {MAX_INTERFACES} interfaces, not {}",
                    self.interfaces.len()
                )
            },
        )?;
        let mut names: HashMap<&str, (usize, What<'_>)> = HashMap::new();
        let mut macs: HashMap<MacAddr, usize> = HashMap::new();
        for (i, iface) in self.interfaces.iter().enumerate() {
            let n = &iface.name;
            ensure(
                !n.is_empty()
                    && n.len() <= MAX_NAME
                    && n != "."
                    && n != ".."
                    && !RESERVED_NAMES.contains(&n.as_str())
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
                || f(i, ".name"),
                || {
                    format!(
                        "{n:?}: 1 to {MAX_NAME} letters, digits, '.', '_' or '-', and not {}",
                        RESERVED_NAMES.join(", ")
                    )
                },
            )?;
            let what = iface.what().ok_or_else(|| NetError {
                field: f(i, ""),
                why: "exactly one of mac (a NIC), bond, vlan or bridge says what it is".into(),
            })?;
            if let Some(j) = names.get(n.as_str()).map(|(j, _)| *j) {
                return Err(NetError {
                    field: f(i, ".name"),
                    why: format!("{n:?} is interfaces[{j}]'s name too"),
                });
            }
            names.insert(n, (i, what));
            if let Some(mac) = iface.mac
                && let Some(j) = macs.insert(mac, i)
            {
                return Err(NetError {
                    field: f(i, ".mac"),
                    why: format!("{mac} is interfaces[{j}]'s MAC too"),
                });
            }
        }
        let mut enslaved: HashMap<&str, usize> = HashMap::new();
        let mut tags: HashSet<(&str, u16)> = HashSet::new();
        let mut addresses: HashMap<IpAddr, usize> = HashMap::new();
        let mut gateways = [None::<usize>; 2];
        for (i, iface) in self.interfaces.iter().enumerate() {
            if let Some(b) = &iface.bond {
                ensure(
                    !b.members.is_empty(),
                    || f(i, ".bond.members"),
                    || "a bond needs at least one NIC".into(),
                )?;
            }
            // A bridge with no port is legal (VMs attach later).
            let field = if iface.bond.is_some() {
                ".bond.members"
            } else {
                ".bridge.members"
            };
            for (k, m) in iface.members().iter().enumerate() {
                let field = || f(i, &format!("{field}[{k}]"));
                let Some((_, what)) = names.get(m.as_str()) else {
                    return Err(NetError {
                        field: field(),
                        why: format!("no interface is named {m:?}"),
                    });
                };
                let allowed = if iface.bond.is_some() {
                    matches!(what, What::Nic(_))
                } else {
                    !matches!(what, What::Bridge(_))
                };
                ensure(allowed, field, || {
                    format!(
                        "{m:?} cannot be a member here: a bond takes NICs, a bridge NICs, bonds and VLANs"
                    )
                })?;
                if let Some(j) = enslaved.insert(m, i) {
                    return Err(NetError {
                        field: field(),
                        why: format!("{m:?} is already a member of interfaces[{j}]"),
                    });
                }
            }
            if let Some(v) = &iface.vlan {
                ensure(
                    (1..=4094).contains(&v.id),
                    || f(i, ".vlan.id"),
                    || format!("{}: VLAN ids are 1 to 4094", v.id),
                )?;
                let link = names.get(v.link.as_str()).map(|(_, w)| *w);
                ensure(
                    matches!(link, Some(What::Nic(_) | What::Bond(_) | What::Bridge(_))),
                    || f(i, ".vlan.link"),
                    || format!("{:?} is not a NIC, bond or bridge of this config", v.link),
                )?;
                ensure(
                    tags.insert((v.link.as_str(), v.id)),
                    || f(i, ".vlan.id"),
                    || format!("VLAN {} on {:?} is there twice", v.id, v.link),
                )?;
            }
            ensure(
                iface.addresses.len() <= MAX_ADDRESSES && iface.routes.len() <= MAX_ADDRESSES,
                || f(i, ".addresses"),
                || format!("at most {MAX_ADDRESSES} addresses and {MAX_ADDRESSES} routes"),
            )?;
            for (k, a) in iface.addresses.iter().enumerate() {
                let field = || f(i, &format!(".addresses[{k}]"));
                if a == AUTO {
                    ensure(
                        iface.addresses.iter().filter(|a| *a == AUTO).count() == 1,
                        field,
                        || format!("one {AUTO:?} address per interface"),
                    )?;
                    continue;
                }
                let (ip, _) = parse_prefix(a).ok_or_else(|| NetError {
                    field: field(),
                    why: format!("{a:?} is not an address with its prefix length (10.0.0.5/24)"),
                })?;
                ensure(
                    !(ip.is_unspecified() || ip.is_multicast() || ip.is_loopback()),
                    field,
                    || format!("{ip} is not a host's address"),
                )?;
                if let Some(j) = addresses.insert(ip, i) {
                    return Err(NetError {
                        field: field(),
                        why: format!("{ip} is on interfaces[{j}] too"),
                    });
                }
            }
            // A next hop is reached through the interface: by its DHCP of that family, a
            // static prefix holding it, or (IPv6) its link-local address.
            let prefixes: Vec<(IpAddr, u8)> = iface
                .addresses
                .iter()
                .filter_map(|a| parse_prefix(a))
                .collect();
            let reachable = |gw: IpAddr| match gw {
                IpAddr::V4(_) => iface.dhcp4 || prefixes.iter().any(|p| prefix_contains(*p, gw)),
                IpAddr::V6(v6) => {
                    iface.dhcp6
                        || v6.is_unicast_link_local()
                        || prefixes.iter().any(|p| prefix_contains(*p, gw))
                }
            };
            let mut hops = vec![
                (
                    ".gateway4".to_string(),
                    iface.gateway4.map(IpAddr::V4),
                    true,
                ),
                (
                    ".gateway6".to_string(),
                    iface.gateway6.map(IpAddr::V6),
                    true,
                ),
            ];
            for (k, r) in iface.routes.iter().enumerate() {
                hops.push((format!(".routes[{k}].via"), Some(r.via), r.to == "default"));
            }
            for (name, gw, default) in hops {
                let Some(gw) = gw else { continue };
                ensure(
                    reachable(gw),
                    || f(i, &name),
                    || {
                        format!(
                            "{gw} is not reachable here: no address of this interface is in its \
                         prefix, nor DHCP of its family"
                        )
                    },
                )?;
                if default && let Some(j) = gateways[usize::from(gw.is_ipv6())].replace(i) {
                    return Err(NetError {
                        field: f(i, &name),
                        why: format!("interfaces[{j}] has the default route already"),
                    });
                }
            }
            for (k, r) in iface.routes.iter().enumerate() {
                if r.to == "default" {
                    continue;
                }
                let field = || f(i, &format!(".routes[{k}].to"));
                let Some((net, len)) =
                    parse_prefix(&r.to).filter(|(ip, _)| ip.is_ipv4() == r.via.is_ipv4())
                else {
                    return Err(NetError {
                        field: field(),
                        why: format!("{:?}: a prefix of via's family, or `default`", r.to),
                    });
                };
                ensure(host_bits(net, len) == 0, field, || {
                    format!(
                        "{:?} has host bits set: write the prefix's first address",
                        r.to
                    )
                })?;
            }
            if let Some(mtu) = iface.mtu {
                ensure(
                    (MIN_MTU..=MAX_MTU).contains(&mtu),
                    || f(i, ".mtu"),
                    || format!("{mtu}: {MIN_MTU} to {MAX_MTU}"),
                )?;
            }
        }
        for (i, iface) in self.interfaces.iter().enumerate() {
            if let Some(j) = enslaved.get(iface.name.as_str()) {
                ensure(
                    !iface.addressed()
                        && iface.gateway4.is_none()
                        && iface.gateway6.is_none()
                        && iface.routes.is_empty(),
                    || f(i, ""),
                    || {
                        format!(
                            "a member of interfaces[{j}] takes no address, gateway or route \
                             of its own"
                        )
                    },
                )?;
                ensure(
                    self.vlans_on(&iface.name).next().is_none(),
                    || f(i, ""),
                    || {
                        format!(
                            "a member of interfaces[{j}] carries no VLAN: tag it on interfaces[{j}]"
                        )
                    },
                )?;
            }
        }
        ensure(
            self.interfaces.iter().any(Interface::addressed),
            || "interfaces".into(),
            || {
                "no interface gets an address (dhcp4, dhcp6 or addresses): the installed OS could not report back".into()
            },
        )?;
        ensure(
            self.dns.servers.len() <= MAX_DNS_SERVERS,
            || "dns.servers".into(),
            || format!("at most {MAX_DNS_SERVERS}"),
        )?;
        ensure(
            self.dns.search.len() <= MAX_SEARCH,
            || "dns.search".into(),
            || format!("at most {MAX_SEARCH}"),
        )?;
        for (k, d) in self.dns.search.iter().enumerate() {
            ensure(
                !d.is_empty()
                    && d.len() <= 253
                    && d.split('.').all(|l| {
                        !l.is_empty()
                            && l.len() <= 63
                            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    }),
                || format!("dns.search[{k}]"),
                || format!("{d:?} is not a domain name"),
            )?;
        }
        Ok(())
    }

    /// The [`AUTO`] addresses' field paths, with where they are (interface, address index).
    pub fn auto_addresses(&self) -> Vec<(String, usize, usize)> {
        let mut found = Vec::new();
        for (i, iface) in self.interfaces.iter().enumerate() {
            for (k, a) in iface.addresses.iter().enumerate() {
                if a == AUTO {
                    found.push((format!("interfaces[{i}].addresses[{k}]"), i, k));
                }
            }
        }
        found
    }

    /// Every static address (not [`AUTO`]) with its field path.
    pub fn static_addresses(&self) -> Vec<(String, IpAddr)> {
        let mut found = Vec::new();
        for (i, iface) in self.interfaces.iter().enumerate() {
            for (k, a) in iface.addresses.iter().enumerate() {
                if let Some((ip, _)) = parse_prefix(a) {
                    found.push((format!("interfaces[{i}].addresses[{k}]"), ip));
                }
            }
        }
        found
    }

    /// The NICs' MACs, with their field paths.
    pub fn macs(&self) -> impl Iterator<Item = (String, MacAddr)> + '_ {
        self.interfaces
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.mac.map(|m| (format!("interfaces[{i}].mac"), m)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> NetworkConfig {
        serde_json::from_str(json).unwrap()
    }

    fn refusal(json: &str) -> String {
        config(json).validate().unwrap_err().to_string()
    }

    const BOND_VLAN: &str = r#"{"interfaces": [
        {"name": "en0", "mac": "52:54:00:77:01:31"},
        {"name": "en1", "mac": "52:54:00:77:01:32"},
        {"name": "bond0", "bond": {"members": ["en0", "en1"], "mode": "active-backup"},
         "addresses": ["10.77.0.50/24"], "gateway4": "10.77.0.1"},
        {"name": "bond0.100", "vlan": {"link": "bond0", "id": 100},
         "addresses": ["10.78.0.50/24"]}],
        "dns": {"servers": ["10.77.0.1"], "search": ["lab"]}}"#;

    #[test]
    fn a_bond_with_a_vlan_and_static_addresses_is_valid() {
        let c = config(BOND_VLAN);
        c.validate().unwrap();
        assert_eq!(c.master_of("en1").unwrap().name, "bond0");
        assert_eq!(c.vlans_on("bond0").next().unwrap().name, "bond0.100");
        assert_eq!(c.macs().count(), 2);
        assert!(c.auto_addresses().is_empty());
        assert_eq!(
            c.static_addresses(),
            [
                (
                    "interfaces[2].addresses[0]".to_string(),
                    "10.77.0.50".parse().unwrap()
                ),
                (
                    "interfaces[3].addresses[0]".to_string(),
                    "10.78.0.50".parse().unwrap()
                )
            ]
        );
        let auto = config(
            r#"{"interfaces": [{"name": "a", "mac": "52:54:00:00:00:01", "addresses": ["fd00::5/64", "auto"]}]}"#,
        );
        auto.validate().unwrap();
        assert_eq!(
            auto.auto_addresses(),
            [("interfaces[0].addresses[1]".to_string(), 0, 1)]
        );
        // It goes through JSON unchanged.
        let again: NetworkConfig =
            serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn every_mistake_names_its_field() {
        let cases = [
            (r#"{"interfaces": []}"#, "network.interfaces: 1 to 64"),
            (
                r#"{"interfaces": [{"name": "a", "dhcp4": true}]}"#,
                "network.interfaces[0]: exactly one of",
            ),
            (
                r#"{"interfaces": [{"name": "a", "mac": "52:54:00:00:00:01", "bond": {"members": [], "mode": "802.3ad"}}]}"#,
                "network.interfaces[0]: exactly one of",
            ),
            (
                r#"{"interfaces": [{"name": "a very long name!", "mac": "52:54:00:00:00:01"}]}"#,
                "network.interfaces[0].name:",
            ),
            (
                r#"{"interfaces": [{"name": "a", "mac": "52:54:00:00:00:01", "dhcp4": true},
                    {"name": "a", "mac": "52:54:00:00:00:02"}]}"#,
                "network.interfaces[1].name: \"a\" is interfaces[0]'s name too",
            ),
            (
                r#"{"interfaces": [{"name": "a", "mac": "52:54:00:00:00:01", "dhcp4": true},
                    {"name": "b", "mac": "52:54:00:00:00:01"}]}"#,
                "network.interfaces[1].mac:",
            ),
            (
                r#"{"interfaces": [{"name": "b", "bond": {"members": ["x"], "mode": "active-backup"}, "dhcp4": true}]}"#,
                "network.interfaces[0].bond.members[0]: no interface is named \"x\"",
            ),
            (
                r#"{"interfaces": [{"name": "a", "mac": "52:54:00:00:00:01"},
                    {"name": "b", "bond": {"members": ["a"], "mode": "active-backup"}, "dhcp4": true},
                    {"name": "c", "bond": {"members": ["a"], "mode": "active-backup"}}]}"#,
                "network.interfaces[2].bond.members[0]: \"a\" is already a member of interfaces[1]",
            ),
            (
                r#"{"interfaces": [{"name": "a", "mac": "52:54:00:00:00:01", "dhcp4": true},
                    {"name": "v", "vlan": {"link": "a", "id": 4095}}]}"#,
                "network.interfaces[1].vlan.id: 4095",
            ),
            (
                r#"{"interfaces": [{"name": "a", "mac": "52:54:00:00:00:01", "dhcp4": true},
                    {"name": "v", "vlan": {"link": "nope", "id": 5}}]}"#,
                "network.interfaces[1].vlan.link:",
            ),
            (
                r#"{"interfaces": [{"name": "a", "mac": "52:54:00:00:00:01", "addresses": ["10.0.0.5"]}]}"#,
                "network.interfaces[0].addresses[0]: \"10.0.0.5\" is not an address with its prefix",
            ),
            (
                r#"{"interfaces": [{"name": "a", "mac": "52:54:00:00:00:01", "addresses": ["10.0.0.5/33"]}]}"#,
                "network.interfaces[0].addresses[0]:",
            ),
            (
                r#"{"interfaces": [{"name": "a", "mac": "52:54:00:00:00:01", "addresses": ["10.0.0.5/24"]},
                    {"name": "b", "mac": "52:54:00:00:00:02", "addresses": ["10.0.0.5/24"]}]}"#,
                "network.interfaces[1].addresses[0]: 10.0.0.5 is on interfaces[0] too",
            ),
            (
                r#"{"interfaces": [{"name": "a", "mac": "52:54:00:00:00:01", "dhcp4": true, "gateway4": "10.0.0.1"},
                    {"name": "b", "mac": "52:54:00:00:00:02", "dhcp4": true, "gateway4": "10.0.1.1"}]}"#,
                "network.interfaces[1].gateway4: interfaces[0] has the default route already",
            ),
            (
                r#"{"interfaces": [{"name": "a", "mac": "52:54:00:00:00:01", "dhcp4": true, "gateway4": "10.0.0.1"},
                    {"name": "b", "mac": "52:54:00:00:00:02", "dhcp4": true,
                     "routes": [{"to": "default", "via": "10.0.1.1"}]}]}"#,
                "network.interfaces[1].routes[0].via: interfaces[0] has the default route already",
            ),
            (
                r#"{"interfaces": [{"name": "a", "mac": "52:54:00:00:00:01", "addresses": ["10.0.0.5/24"],
                    "gateway4": "10.0.1.1"}]}"#,
                "network.interfaces[0].gateway4: 10.0.1.1 is not reachable here",
            ),
            (
                r#"{"interfaces": [{"name": "a", "mac": "52:54:00:00:00:01", "addresses": ["10.0.0.5/24"],
                    "routes": [{"to": "10.80.0.5/16", "via": "10.0.0.1"}]}]}"#,
                "network.interfaces[0].routes[0].to: \"10.80.0.5/16\" has host bits set",
            ),
            (
                r#"{"interfaces": [{"name": "a", "mac": "52:54:00:00:00:01", "addresses": ["10.0.0.5/+24"]}]}"#,
                "network.interfaces[0].addresses[0]:",
            ),
            (
                r#"{"interfaces": [{"name": "a", "mac": "52:54:00:00:00:01", "addresses": ["::ffff:10.0.0.5/120"]}]}"#,
                "network.interfaces[0].addresses[0]:",
            ),
            (
                r#"{"interfaces": [{"name": "lo", "bridge": {"members": []}, "dhcp4": true}]}"#,
                "network.interfaces[0].name: \"lo\"",
            ),
            (
                r#"{"interfaces": [{"name": "a", "mac": "52:54:00:00:00:01", "dhcp4": true,
                    "routes": [{"to": "fd00::/8", "via": "10.0.0.1"}]}]}"#,
                "network.interfaces[0].routes[0].to:",
            ),
            (
                r#"{"interfaces": [{"name": "a", "mac": "52:54:00:00:00:01", "dhcp4": true, "mtu": 100}]}"#,
                "network.interfaces[0].mtu: 100",
            ),
            (
                r#"{"interfaces": [{"name": "a", "mac": "52:54:00:00:00:01", "dhcp4": true},
                    {"name": "b", "bond": {"members": ["a"], "mode": "balance-rr"}, "dhcp4": true}]}"#,
                "network.interfaces[0]: a member of interfaces[1] takes no address, gateway or route",
            ),
            (
                r#"{"interfaces": [{"name": "a", "mac": "52:54:00:00:00:01"},
                    {"name": "b", "bond": {"members": ["a"], "mode": "balance-rr"}, "dhcp4": true},
                    {"name": "v", "vlan": {"link": "a", "id": 7}, "dhcp4": true}]}"#,
                "network.interfaces[0]: a member of interfaces[1] carries no VLAN",
            ),
            (
                r#"{"interfaces": [{"name": "a", "mac": "52:54:00:00:00:01"}]}"#,
                "network.interfaces: no interface gets an address",
            ),
            (
                r#"{"interfaces": [{"name": "a", "mac": "52:54:00:00:00:01", "addresses": ["auto", "auto"]}]}"#,
                "network.interfaces[0].addresses[0]: one \"auto\" address per interface",
            ),
            (
                r#"{"interfaces": [{"name": "a", "mac": "52:54:00:00:00:01", "dhcp4": true}],
                    "dns": {"search": ["bad domain"]}}"#,
                "network.dns.search[0]:",
            ),
        ];
        for (json, want) in cases {
            let got = refusal(json);
            assert!(got.starts_with(want), "{json}\n got: {got}\nwant: {want}");
        }
    }

    #[test]
    fn prefixes_hold_their_addresses() {
        let p = |s: &str| parse_prefix(s).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(prefix_contains(p("10.0.0.5/24"), ip("10.0.0.1")));
        assert!(!prefix_contains(p("10.0.0.5/24"), ip("10.0.1.1")));
        assert!(prefix_contains(p("10.0.0.5/0"), ip("192.168.1.1")));
        assert!(prefix_contains(p("fd00::5/64"), ip("fd00::1")));
        assert!(!prefix_contains(p("fd00::5/64"), ip("10.0.0.1")));
        assert!(!prefix_contains(p("10.0.0.5/32"), ip("10.0.0.6")));
        assert_eq!(host_bits(ip("10.80.0.0"), 16), 0);
        assert_ne!(host_bits(ip("10.80.0.5"), 16), 0);
        assert_eq!(parse_prefix("10.0.0.5/024"), None);
    }

    #[test]
    fn unknown_fields_and_modes_are_refused_when_read() {
        assert!(serde_json::from_str::<NetworkConfig>(r#"{"interfaces": [], "x": 1}"#).is_err());
        assert!(serde_json::from_str::<Bond>(r#"{"members": [], "mode": "802.3ab"}"#).is_err());
    }
}
