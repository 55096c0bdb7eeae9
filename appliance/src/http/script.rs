//! Per-machine iPXE boot scripts: the answer to "what should this machine boot now?".

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use stork_proto::{MacAddr, cmdline};

use super::AppState;
use crate::auth;
use crate::config::Config;
use crate::store::{Machine, StoreError, now_ms};

/// What a network-booting machine gets, decided by its status alone.
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
        Some(m) if m.status == crate::lifecycle::Status::New => BootChoice::Enlist,
        Some(m) if m.status.boots_agent() && m.netboot => BootChoice::Agent {
            machine_id: m.id.clone(),
        },
        Some(_) => BootChoice::LocalDisk,
    }
}

pub async fn ipxe_script(State(state): State<AppState>, Path(mac): Path<String>) -> Response {
    let mac = match mac.parse::<MacAddr>() {
        Ok(mac) => mac,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("#!ipxe\necho {e}\n")).into_response(),
    };
    match script_for(&state, mac).await {
        Ok(script) => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            script,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(%mac, error = %e, "cannot build the boot script");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "#!ipxe\necho Stork: appliance error, retrying in 10 s\nsleep 10\nreboot\n",
            )
                .into_response()
        }
    }
}

async fn script_for(state: &AppState, mac: MacAddr) -> Result<String, StoreError> {
    let store = state.store.clone();
    let cfg = state.cfg.clone();
    let script = store
        .call(move |st| {
            let m = st.find_by_mac(mac)?;
            let choice = choose(m.as_ref());
            tracing::info!(%mac, ?choice, "serving iPXE script");
            Ok(match (choice, m) {
                (BootChoice::Agent { .. }, Some(mut m)) => {
                    // Each boot gets its own token; the previous one stops working.
                    let (token, hash) = auth::generate(auth::AGENT_PREFIX);
                    m.agent_token = Some(hash);
                    m.updated_at = now_ms();
                    let m = st.save_machine(&m, &[])?;
                    agent_script(&cfg, mac, Some((&m.id, &token)))
                }
                (BootChoice::LocalDisk, _) => local_disk_script(),
                _ => agent_script(&cfg, mac, None),
            })
        })
        .await?;
    Ok(script)
}

/// Boot from the next device in the firmware's order (the local disk).
pub fn local_disk_script() -> String {
    "#!ipxe\necho Stork: booting from local disk\nexit\n".to_string()
}

/// The script that boots the Stork agent. The address comes from iPXE's own settings
/// (`netX` is the interface iPXE configured last), so it is right whether Stork or another
/// DHCP server leased it. `known` carries the machine id and this boot's agent token.
pub fn agent_script(cfg: &Config, mac: MacAddr, known: Option<(&str, &str)>) -> String {
    let base = cfg.base_url();
    let boot = &cfg.boot;
    let identity = match known {
        Some((id, token)) => format!(" {}={id} {}={token}", cmdline::MACHINE, cmdline::TOKEN),
        None => String::new(),
    };
    // UEFI: the kernel finds its initrd only if `initrd=<name>` names it (FACTS.md).
    format!(
        "#!ipxe\n\
         echo Stork: booting the agent on {mac}\n\
         kernel {base}/boot/{kernel} initrd={initrd} {extra} {url}={base} {bootif}={bootif_val} {ip}=${{netX/ip}}/${{netX/netmask}} {gw}=${{netX/gateway}}{identity} || goto failed\n\
         initrd {base}/boot/{initrd} || goto failed\n\
         boot || goto failed\n\
         :failed\n\
         echo Stork: boot failed, retrying in 10 s\n\
         sleep 10\n\
         reboot\n",
        kernel = boot.kernel,
        initrd = boot.initrd,
        extra = boot.cmdline,
        url = cmdline::URL,
        bootif = cmdline::BOOTIF,
        bootif_val = mac.to_bootif(),
        ip = cmdline::IP,
        gw = cmdline::GATEWAY,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FileConfig;
    use crate::lifecycle::Status;
    use stork_proto::cmdline::AgentArgs;

    fn expand(kernel_line: &str) -> AgentArgs {
        let expanded = kernel_line
            .replace("${netX/ip}", "10.77.0.100")
            .replace("${netX/netmask}", "255.255.255.0")
            .replace("${netX/gateway}", "")
            .replace(" || goto failed", "");
        AgentArgs::parse(&expanded).unwrap()
    }

    #[test]
    fn script_carries_what_the_agent_parses() {
        let cfg = FileConfig::default().validate().unwrap();
        let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        let s = agent_script(&cfg, mac, None);
        assert!(s.starts_with("#!ipxe\n"));
        let kernel = s.lines().find(|l| l.starts_with("kernel ")).unwrap();
        assert!(kernel.contains("http://10.77.0.1:8080/boot/vmlinuz initrd=initrd.img "));
        assert!(s.contains("\ninitrd http://10.77.0.1:8080/boot/initrd.img"));
        let args = expand(kernel);
        assert_eq!(args.url, "http://10.77.0.1:8080");
        assert_eq!(args.boot_mac, mac);
        assert_eq!(args.ip.to_string(), "10.77.0.100");
        assert_eq!(args.prefix_len, 24);
        assert_eq!(args.gateway, None);
        assert_eq!(args.token, None);

        let s = agent_script(&cfg, mac, Some(("m1", "stork_agent_abc")));
        let args = expand(s.lines().find(|l| l.starts_with("kernel ")).unwrap());
        assert_eq!(args.machine_id.as_deref(), Some("m1"));
        assert_eq!(args.token.as_deref(), Some("stork_agent_abc"));
    }

    #[test]
    fn boot_choice_by_status() {
        assert_eq!(choose(None), BootChoice::Enlist);
        let mut m = Machine::new("m1".into(), vec![], 0);
        for status in Status::ALL {
            m.status = status;
            let want = match status {
                Status::New => BootChoice::Enlist,
                Status::Commissioning | Status::Deploying | Status::DiskErasing => {
                    BootChoice::Agent {
                        machine_id: "m1".into(),
                    }
                }
                _ => BootChoice::LocalDisk,
            };
            assert_eq!(choose(Some(&m)), want, "{status}");
        }
        // Once the agent installed the image, the deploying machine boots from disk.
        m.status = Status::Deploying;
        m.netboot = false;
        assert_eq!(choose(Some(&m)), BootChoice::LocalDisk);
    }
}
