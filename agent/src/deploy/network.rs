//! A deploy's network config as systemd-networkd files for the installed OS. Pure text: tests
//! read it without a root.
//!
//! Why networkd files and not cloud-init's network-config: the Debian 12 image's cloud-init
//! (22.4) renders version 2 config through its networkd renderer, which has no bonds, VLANs
//! or bridges (`cloudinit/net/networkd.py` of that release). networkd itself has them all.
//! cloud-init's own network step is turned off when these are written, so the two never
//! both configure a NIC.
//!
//! Each file is `10-stork-<name>.{netdev,network}`: they sort before the image's catch-all
//! DHCP file (`90-stork-dhcp.network`), and networkd takes the first `.network` that
//! matches. NICs match by permanent MAC: a bond gives its members its own MAC, so the
//! current one would match the bond and its other members too.

use std::fmt::Write;

use stork_proto::netconf::{BondMode, Interface, NetworkConfig, What};

/// Where networkd reads its files, relative to the root.
pub const NETWORKD_DIR: &str = "etc/systemd/network";
/// cloud-init's system config that turns its network step off.
pub const CLOUD_INIT_OFF: &str = "etc/cloud/cloud.cfg.d/99-stork-network.cfg";
const CLOUD_INIT_OFF_TEXT: &str = "\
# Written by the Stork agent: the deploy's network config is in /etc/systemd/network
# (10-stork-*); cloud-init configures no interface.
network: {config: disabled}
";

/// The files (path relative to the root, text) that configure `cfg`.
pub fn files(cfg: &NetworkConfig) -> Vec<(String, String)> {
    let mut out = vec![(CLOUD_INIT_OFF.to_string(), CLOUD_INIT_OFF_TEXT.to_string())];
    for iface in &cfg.interfaces {
        let stem = format!("{NETWORKD_DIR}/10-stork-{}", iface.name);
        if let Some(netdev) = netdev(cfg, iface) {
            out.push((format!("{stem}.netdev"), netdev));
        }
        out.push((format!("{stem}.network"), network(cfg, iface)));
    }
    out
}

const HEADER: &str = "# Written by the Stork agent from the deploy's network config.\n";

/// A bond's, VLAN's or bridge's device; a NIC has none.
fn netdev(cfg: &NetworkConfig, iface: &Interface) -> Option<String> {
    let (kind, section) = match iface.what()? {
        What::Nic(_) => return None,
        What::Bond(bond) => {
            let mut s = format!(
                "[Bond]\nMode={}\n\
                 # Link monitoring: without it a failed member is never noticed.\n\
                 MIIMonitorSec=100ms\n",
                bond.mode.name()
            );
            if bond.mode == BondMode::Lacp {
                s.push_str("LACPTransmitRate=fast\nTransmitHashPolicy=layer3+4\n");
            }
            ("bond", s)
        }
        What::Vlan(vlan) => ("vlan", format!("[VLAN]\nId={}\n", vlan.id)),
        What::Bridge(_) => ("bridge", String::new()),
    };
    let mut t = format!("{HEADER}[NetDev]\nName={}\nKind={kind}\n", iface.name);
    if let Some(mtu) = iface.mtu {
        let _ = writeln!(t, "MTUBytes={mtu}");
    }
    if let Some(mac) = first_mac(cfg, iface) {
        // The first member's, as the kernel's own bonds take it (networkd would make one up):
        // DHCP over the bond then gets the lease that NIC holds, and switches see a MAC they
        // know.
        let _ = writeln!(t, "MACAddress={mac}");
    }
    if !section.is_empty() {
        let _ = write!(t, "\n{section}");
    }
    Some(t)
}

/// The MAC of a bond's or bridge's first member, through a bond in a bridge.
fn first_mac(cfg: &NetworkConfig, iface: &Interface) -> Option<stork_proto::MacAddr> {
    let first = cfg.get(iface.members().first()?)?;
    match first.mac {
        Some(mac) => Some(mac),
        None if first.bond.is_some() => first_mac(cfg, first),
        None => None,
    }
}

fn network(cfg: &NetworkConfig, iface: &Interface) -> String {
    let mut t = String::from(HEADER);
    t.push_str("[Match]\n");
    match iface.mac {
        Some(mac) => {
            let _ = writeln!(t, "PermanentMACAddress={mac}");
        }
        None => {
            let _ = writeln!(t, "Name={}", iface.name);
        }
    }
    if let (Some(mtu), Some(_)) = (iface.mtu, iface.mac) {
        let _ = write!(t, "\n[Link]\nMTUBytes={mtu}\n");
    }
    t.push_str("\n[Network]\n");
    if let Some(master) = cfg.master_of(&iface.name) {
        let key = if master.bond.is_some() {
            "Bond"
        } else {
            "Bridge"
        };
        let _ = writeln!(t, "{key}={}", master.name);
        return t;
    }
    let dhcp = match (iface.dhcp4, iface.dhcp6) {
        (true, true) => "yes",
        (true, false) => "ipv4",
        (false, true) => "ipv6",
        (false, false) => "no",
    };
    let _ = writeln!(t, "DHCP={dhcp}");
    if !iface.addressed() {
        // A carrier of VLANs only: no address, no router solicitations of its own.
        t.push_str("LinkLocalAddressing=no\nIPv6AcceptRA=no\n");
    }
    for a in &iface.addresses {
        let _ = writeln!(t, "Address={a}");
    }
    if let Some(g) = iface.gateway4 {
        let _ = writeln!(t, "Gateway={g}");
    }
    if let Some(g) = iface.gateway6 {
        let _ = writeln!(t, "Gateway={g}");
    }
    if iface.addressed() {
        for s in &cfg.dns.servers {
            let _ = writeln!(t, "DNS={s}");
        }
        if !cfg.dns.search.is_empty() {
            let _ = writeln!(t, "Domains={}", cfg.dns.search.join(" "));
        }
    }
    for v in cfg.vlans_on(&iface.name) {
        let _ = writeln!(t, "VLAN={}", v.name);
    }
    // Up without a carrier too: a bond or bridge with its members still coming up, a VLAN
    // on it.
    if iface.mac.is_none() {
        t.push_str("ConfigureWithoutCarrier=yes\n");
    }
    for r in &iface.routes {
        let _ = write!(t, "\n[Route]\n");
        if r.to != "default" {
            let _ = writeln!(t, "Destination={}", r.to);
        }
        let _ = writeln!(t, "Gateway={}", r.via);
        if let Some(m) = r.metric {
            let _ = writeln!(t, "Metric={m}");
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(json: &str) -> Vec<(String, String)> {
        let cfg: NetworkConfig = serde_json::from_str(json).unwrap();
        cfg.validate().unwrap();
        files(&cfg)
    }

    fn file<'a>(files: &'a [(String, String)], name: &str) -> &'a str {
        files
            .iter()
            .find(|(p, _)| p.ends_with(name))
            .map(|(_, t)| t.as_str())
            .unwrap_or_else(|| panic!("no {name} in {files:?}"))
    }

    #[test]
    fn a_bond_of_two_nics_with_a_vlan_and_static_addresses() {
        let f = rendered(
            r#"{"interfaces": [
            {"name": "en0", "mac": "52:54:00:77:01:31"},
            {"name": "en1", "mac": "52:54:00:77:01:32", "mtu": 9000},
            {"name": "bond0", "bond": {"members": ["en0", "en1"], "mode": "802.3ad"},
             "addresses": ["10.77.0.50/24"], "gateway4": "10.77.0.1",
             "routes": [{"to": "10.80.0.0/16", "via": "10.77.0.254", "metric": 50}]},
            {"name": "bond0.100", "vlan": {"link": "bond0", "id": 100},
             "addresses": ["10.78.0.50/24", "fd78::50/64"]}],
            "dns": {"servers": ["10.77.0.1"], "search": ["lab", "example"]}}"#,
        );
        assert_eq!(f[0].0, CLOUD_INIT_OFF);
        assert!(f[0].1.contains("network: {config: disabled}"));
        assert_eq!(
            file(&f, "10-stork-en0.network"),
            format!(
                "{HEADER}[Match]\nPermanentMACAddress=52:54:00:77:01:31\n\n[Network]\nBond=bond0\n"
            )
        );
        assert!(file(&f, "10-stork-en1.network").contains("[Link]\nMTUBytes=9000\n"));
        assert!(!f.iter().any(|(p, _)| p.ends_with("en0.netdev")));
        let bond = file(&f, "10-stork-bond0.netdev");
        assert!(
            bond.contains(
                "Name=bond0\nKind=bond\nMACAddress=52:54:00:77:01:31\n\n[Bond]\nMode=802.3ad\n"
            ),
            "{bond}"
        );
        assert!(bond.contains("MIIMonitorSec=100ms") && bond.contains("LACPTransmitRate=fast"));
        let net = file(&f, "10-stork-bond0.network");
        for line in [
            "[Match]\nName=bond0\n",
            "DHCP=no\n",
            "Address=10.77.0.50/24\n",
            "Gateway=10.77.0.1\n",
            "DNS=10.77.0.1\n",
            "Domains=lab example\n",
            "VLAN=bond0.100\n",
            "ConfigureWithoutCarrier=yes\n",
            "\n[Route]\nDestination=10.80.0.0/16\nGateway=10.77.0.254\nMetric=50\n",
        ] {
            assert!(net.contains(line), "{line:?} not in\n{net}");
        }
        assert!(!net.contains("LinkLocalAddressing=no"));
        assert!(file(&f, "10-stork-bond0.100.netdev").contains("Kind=vlan\n\n[VLAN]\nId=100\n"));
        let vlan = file(&f, "10-stork-bond0.100.network");
        assert!(
            vlan.contains("Address=10.78.0.50/24\nAddress=fd78::50/64\n"),
            "{vlan}"
        );
        assert!(!vlan.contains("Gateway="));
    }

    #[test]
    fn a_vlan_carrier_has_no_address_and_a_bridge_takes_its_ports() {
        let f = rendered(
            r#"{"interfaces": [
            {"name": "en0", "mac": "52:54:00:77:01:31"},
            {"name": "en0.7", "vlan": {"link": "en0", "id": 7}, "dhcp4": true},
            {"name": "en1", "mac": "52:54:00:77:01:32"},
            {"name": "br0", "bridge": {"members": ["en1"]}, "dhcp4": true, "dhcp6": true, "mtu": 1400}]}"#,
        );
        let carrier = file(&f, "10-stork-en0.network");
        assert!(
            carrier.contains("DHCP=no\nLinkLocalAddressing=no\nIPv6AcceptRA=no\nVLAN=en0.7\n"),
            "{carrier}"
        );
        assert!(file(&f, "10-stork-en0.7.network").contains("DHCP=ipv4\n"));
        assert!(file(&f, "10-stork-en1.network").contains("Bridge=br0\n"));
        let br = file(&f, "10-stork-br0.netdev");
        assert!(
            br.contains("Kind=bridge\nMTUBytes=1400\nMACAddress=52:54:00:77:01:32\n"),
            "{br}"
        );
        assert!(!file(&f, "10-stork-en0.7.netdev").contains("MACAddress"));
        assert!(file(&f, "10-stork-br0.network").contains("DHCP=yes\n"));
    }
}
