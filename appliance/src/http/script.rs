//! Per-machine iPXE boot scripts.

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use stork_proto::{MacAddr, cmdline};

use super::AppState;
use crate::config::Config;

pub async fn ipxe_script(State(state): State<AppState>, Path(mac): Path<String>) -> Response {
    match mac.parse::<MacAddr>() {
        Ok(mac) => {
            tracing::info!(%mac, "serving iPXE script");
            (
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                agent_script(&state.cfg, mac),
            )
                .into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, format!("#!ipxe\necho {e}\n")).into_response(),
    }
}

/// The script that boots the Stork agent. The address comes from iPXE's own settings
/// (`netX` is the interface iPXE configured last), so it is right whether Stork or another
/// DHCP server leased it.
pub fn agent_script(cfg: &Config, mac: MacAddr) -> String {
    let base = cfg.base_url();
    let boot = &cfg.boot;
    // UEFI: the kernel finds its initrd only if `initrd=<name>` names it (FACTS.md).
    format!(
        "#!ipxe\n\
         echo Stork: booting the agent on {mac}\n\
         kernel {base}/boot/{kernel} initrd={initrd} {extra} {url}={base} {bootif}={bootif_val} {ip}=${{netX/ip}}/${{netX/netmask}} {gw}=${{netX/gateway}} || goto failed\n\
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
    use stork_proto::cmdline::AgentArgs;

    #[test]
    fn script_carries_what_the_agent_parses() {
        let cfg = FileConfig::default().validate().unwrap();
        let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        let s = agent_script(&cfg, mac);
        assert!(s.starts_with("#!ipxe\n"));
        let kernel = s.lines().find(|l| l.starts_with("kernel ")).unwrap();
        assert!(kernel.contains("http://10.77.0.1:8080/boot/vmlinuz initrd=initrd.img "));
        assert!(s.contains("\ninitrd http://10.77.0.1:8080/boot/initrd.img"));
        // Expand iPXE's settings the way iPXE would, then parse as the agent does.
        let expanded = kernel
            .replace("${netX/ip}", "10.77.0.100")
            .replace("${netX/netmask}", "255.255.255.0")
            .replace("${netX/gateway}", "")
            .replace(" || goto failed", "");
        let args = AgentArgs::parse(&expanded).unwrap();
        assert_eq!(args.url, "http://10.77.0.1:8080");
        assert_eq!(args.boot_mac, mac);
        assert_eq!(args.ip.to_string(), "10.77.0.100");
        assert_eq!(args.prefix_len, 24);
        assert_eq!(args.gateway, None);
    }
}
