//! What a network-booting machine is sent: a lifecycle rule, so it lives beside the table.

use std::net::IpAddr;

use stork_proto::DeployTarget;
use stork_proto::api::AgentIdentity;

use super::Status;
use crate::store::Machine;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootChoice {
    /// Unknown or New: the agent enlists it.
    Enlist,
    /// Commissioning, Deploying, Disk erasing: the agent with a fresh per-boot token.
    Agent { machine_id: String },
    /// Everything else: leave the network boot and try the next boot device.
    LocalDisk,
}

pub fn choose(machine: Option<&Machine>) -> BootChoice {
    match machine {
        None => BootChoice::Enlist,
        Some(m) if m.status == Status::New => BootChoice::Enlist,
        Some(m) if boots_agent(m.status) && m.netboot => BootChoice::Agent {
            machine_id: m.id.clone(),
        },
        Some(_) => BootChoice::LocalDisk,
    }
}

/// What the agent of a machine in a given status is asked to do (`GET /agent/{id}/task`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentWork {
    Commission,
    /// The deploy request's task (its image and keys are looked up by the caller).
    Deploy,
    Erase {
        quick: bool,
    },
    PowerOff,
}

pub fn agent_work(m: &Machine) -> AgentWork {
    match m.status {
        Status::Commissioning => AgentWork::Commission,
        Status::Deploying => AgentWork::Deploy,
        Status::DiskErasing => AgentWork::Erase {
            quick: m.erase_quick,
        },
        _ => AgentWork::PowerOff,
    }
}

/// Whether the agent's work for a machine needs the ephemeral root's tools. The root is
/// 75 MiB fetched and mounted before the task (about 2 s of a deploy under TCG,
/// docs/measurements.md), and an unknown machine on a shared LAN should not make the
/// appliance send it: what the agent does natively (enlisting, the inventory, a raw image to
/// disk with its UEFI entry, a deploy into memory, erasing, powering off) runs from the
/// initrd. Scripts and hardware tests need a shell and their tools; a layout or a root tar
/// needs sgdisk, mkfs, mdadm, LVM, tar and grub-install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tools {
    Needed,
    NotNeeded,
    /// Commissioning: needed if it runs any script or hardware test.
    IfScripts,
    /// A disk deploy without a layout: not needed if this image has a raw disk file.
    UnlessRaw(String),
}

/// [`Tools`] for `m` (`None`: a machine the agent enlists).
pub fn tools(m: Option<&Machine>) -> Tools {
    let Some(m) = m.filter(|m| m.status != Status::New) else {
        return Tools::NotNeeded;
    };
    match agent_work(m) {
        AgentWork::Commission => Tools::IfScripts,
        AgentWork::Erase { .. } | AgentWork::PowerOff => Tools::NotNeeded,
        AgentWork::Deploy => match &m.deploy {
            Some(req) if req.target == DeployTarget::Memory => Tools::NotNeeded,
            Some(req) if req.layout.is_none() => Tools::UnlessRaw(req.image.clone()),
            // No request: the task endpoint refuses; the root changes nothing.
            _ => Tools::Needed,
        },
    }
}

/// Whether a machine in this status boots the agent when it network-boots.
pub fn boots_agent(status: Status) -> bool {
    matches!(
        status,
        Status::New | Status::Commissioning | Status::Deploying | Status::DiskErasing
    )
}

/// Whether the agent of a machine in this status sends heartbeats.
pub fn expects_heartbeats(status: Status) -> bool {
    HEARTBEAT_STATUSES.contains(&status)
}

/// Statuses whose agent sends heartbeats.
pub const HEARTBEAT_STATUSES: [Status; 3] = [
    Status::Commissioning,
    Status::Deploying,
    Status::DiskErasing,
];

/// What a boot script's requester may be given, from the machine's agent credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenGrant {
    /// A new token, bound to the requester.
    Issue,
    /// The script without a token: someone else has (or had) this boot's.
    Refuse(Refusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the request comes from {from}, not from {leased}, the address leased to this MAC")]
    NotTheLease { from: IpAddr, leased: IpAddr },
    #[error("this appliance leases addresses and has leased none to this MAC")]
    NoLease,
    #[error("this boot's token was given to {0}")]
    GivenElsewhere(IpAddr),
    #[error("this boot's agent has used its token already")]
    Used,
}

/// Who may take a booting machine's agent token (Ironic's agent token is the model: given
/// once per boot, never again). Where Stork leases the addresses (`lease` is `Some`), only
/// the holder of the MAC's lease; elsewhere, whoever asks first after the machine was
/// powered into the agent. The same address may ask again (iPXE retrying its script) until
/// the agent has used the token; then no one gets another before the next boot step.
pub fn grant(agent: &AgentIdentity, from: IpAddr, lease: Option<Option<IpAddr>>) -> TokenGrant {
    let from = canonical(from);
    match lease {
        Some(None) => return TokenGrant::Refuse(Refusal::NoLease),
        Some(Some(leased)) if from != leased => {
            return TokenGrant::Refuse(Refusal::NotTheLease { from, leased });
        }
        _ => {}
    }
    match (agent.token_hash.is_some(), agent.ip) {
        (true, _) if agent.used => TokenGrant::Refuse(Refusal::Used),
        (true, Some(bound)) if bound != from => TokenGrant::Refuse(Refusal::GivenElsewhere(bound)),
        _ => TokenGrant::Issue,
    }
}

/// Whether a request from `from` may use a token bound to `agent.ip`.
pub fn bound_here(agent: &AgentIdentity, from: IpAddr) -> bool {
    agent.ip.is_none_or(|ip| ip == canonical(from))
}

/// Whether a request from `from` may use the machine's agent token: from the address it was
/// given to, or, while the machine deploys, from a static address its deploy gives the
/// installed OS (whose phone-home comes from there, not from the agent's lease).
pub fn token_usable_from(m: &Machine, from: IpAddr) -> bool {
    let from = canonical(from);
    bound_here(&m.agent, from)
        || (m.status == Status::Deploying
            && m.deploy
                .iter()
                .any(|d| d.static_addresses().contains(&from)))
}

/// An IPv4 peer seen on a dual-stack socket (`::ffff:a.b.c.d`) as the IPv4 address it is.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const MACHINE: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 50));
    const OTHER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 66));

    fn given(ip: IpAddr, used: bool) -> AgentIdentity {
        AgentIdentity {
            token_hash: Some("h".into()),
            ip: Some(ip),
            used,
        }
    }

    #[test]
    fn with_leases_only_the_lease_holder_gets_the_token() {
        let lease = Some(Some(MACHINE));
        let fresh = AgentIdentity::default();
        assert_eq!(grant(&fresh, MACHINE, lease), TokenGrant::Issue);
        assert!(matches!(
            grant(&fresh, OTHER, lease),
            TokenGrant::Refuse(Refusal::NotTheLease { .. })
        ));
        assert_eq!(
            grant(&fresh, MACHINE, Some(None)),
            TokenGrant::Refuse(Refusal::NoLease)
        );
        // The same dual-stack peer, written as IPv6.
        let mapped: IpAddr = "::ffff:10.77.0.50".parse().unwrap();
        assert_eq!(grant(&fresh, mapped, lease), TokenGrant::Issue);
        // An IPv6 lease (DHCPv6, by MAC): only its address gets the token.
        let v6: IpAddr = "fd77::105".parse().unwrap();
        assert_eq!(grant(&fresh, v6, Some(Some(v6))), TokenGrant::Issue);
        let other6: IpAddr = "fd77::106".parse().unwrap();
        assert!(matches!(
            grant(&fresh, other6, Some(Some(v6))),
            TokenGrant::Refuse(Refusal::NotTheLease { .. })
        ));
    }

    #[test]
    fn without_leases_the_first_asker_holds_it_until_the_next_boot_step() {
        let fresh = AgentIdentity::default();
        assert_eq!(grant(&fresh, MACHINE, None), TokenGrant::Issue);
        // iPXE retrying before the agent ran: a new token, same address.
        assert_eq!(
            grant(&given(MACHINE, false), MACHINE, None),
            TokenGrant::Issue
        );
        assert_eq!(
            grant(&given(MACHINE, false), OTHER, None),
            TokenGrant::Refuse(Refusal::GivenElsewhere(MACHINE))
        );
        assert_eq!(
            grant(&given(MACHINE, true), MACHINE, None),
            TokenGrant::Refuse(Refusal::Used)
        );
    }

    #[test]
    fn a_bound_token_works_from_its_address_only() {
        assert!(bound_here(&given(MACHINE, true), MACHINE));
        assert!(!bound_here(&given(MACHINE, true), OTHER));
        assert!(bound_here(&AgentIdentity::default(), OTHER));
    }

    #[test]
    fn a_deploying_machine_phones_home_from_its_static_address_too() {
        let mut m = Machine::new(
            "m1".into(),
            vec!["52:54:00:00:00:01".parse().unwrap()],
            1000,
        );
        m.agent = given(MACHINE, true);
        m.status = Status::Deploying;
        m.deploy = Some(stork_proto::api::DeployRequest {
            image: "debian-12".into(),
            network: Some(
                serde_json::from_str(
                    r#"{"interfaces": [{"name": "en0", "mac": "52:54:00:00:00:01",
                        "addresses": ["10.77.0.66/24"]}]}"#,
                )
                .unwrap(),
            ),
            ..Default::default()
        });
        let mapped: IpAddr = "::ffff:10.77.0.66".parse().unwrap();
        assert!(token_usable_from(&m, MACHINE));
        assert!(token_usable_from(&m, OTHER));
        assert!(token_usable_from(&m, mapped));
        assert!(!token_usable_from(&m, "10.77.0.67".parse().unwrap()));
        // Once deployed (or in any other status) the lease's address only.
        m.status = Status::Deployed;
        assert!(!token_usable_from(&m, OTHER));
    }

    #[test]
    fn only_scripts_and_layout_or_tar_deploys_fetch_the_ephemeral_root() {
        // Enlisting (unknown or New): from the initrd.
        assert_eq!(tools(None), Tools::NotNeeded);
        let mut m = Machine::new(
            "m1".into(),
            vec!["52:54:00:00:00:01".parse().unwrap()],
            1000,
        );
        assert_eq!(tools(Some(&m)), Tools::NotNeeded);
        m.status = Status::Commissioning;
        assert_eq!(tools(Some(&m)), Tools::IfScripts);
        m.status = Status::DiskErasing;
        assert_eq!(tools(Some(&m)), Tools::NotNeeded);
        m.status = Status::Deploying;
        // No request: whatever the task endpoint says, the root is there.
        assert_eq!(tools(Some(&m)), Tools::Needed);
        m.deploy = Some(stork_proto::api::DeployRequest {
            image: "debian-12".into(),
            ..Default::default()
        });
        assert_eq!(tools(Some(&m)), Tools::UnlessRaw("debian-12".into()));
        if let Some(req) = m.deploy.as_mut() {
            req.layout = Some(Default::default());
        }
        assert_eq!(tools(Some(&m)), Tools::Needed);
        if let Some(req) = m.deploy.as_mut() {
            req.target = DeployTarget::Memory;
        }
        assert_eq!(tools(Some(&m)), Tools::NotNeeded);
    }
}
