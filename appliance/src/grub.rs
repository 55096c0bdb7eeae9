//! The signed boot chain's GRUB configurations (`boot.secure_boot`), served over TFTP.
//!
//! A UEFI machine with Secure Boot cannot run iPXE (it is not signed), so DHCP sends it
//! Debian's shim, which fetches Debian's signed network GRUB (`grubx64.efi`) from the same
//! TFTP server. That GRUB's prefix is `/grub` and it reads `$prefix/grub.cfg`
//! (docs/measurements.md, "Secure Boot"). Ours is [`bootstrap`]: it hands over to the
//! machine's own configuration, `grub/machine/<mac>`, made per request like the iPXE script
//! (same boot choice, same per-boot agent token, granted only to the address that holds the
//! MAC's lease). GRUB has TFTP but no HTTP here, so kernel and initrd come over TFTP too.

use std::net::{IpAddr, Ipv4Addr};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use stork_proto::{MacAddr, cmdline};

use crate::agent_kernels::AgentKernel;
use crate::config::Config;
use crate::http::AppState;
use crate::http::script::{self, BootPlan, EphemeralRoot};
use crate::tftp::Generated;
use crate::tftp::request::Refused;

/// Where GRUB looks first, with its prefix `/grub`.
pub const BOOTSTRAP_PATH: &str = "grub/grub.cfg";
/// Each machine's configuration: `grub/machine/<mac>` (GRUB's `$net_default_mac` spelling).
pub const MACHINE_DIR: &str = "grub/machine/";

/// The configuration every machine's GRUB reads first: on to its own.
pub fn bootstrap() -> String {
    "set timeout=0\nconfigfile $prefix/machine/$net_default_mac\n".to_string()
}

/// Boot from the local disk: chainload the installed system's loader from its EFI system
/// partition (under Secure Boot, its own shim, verified like the rest of the chain); where
/// none is found, hand back to the firmware, which tries the next boot option.
pub fn local_disk() -> String {
    "echo 'Stork: booting from local disk'\n\
     if search --no-floppy --set=root --file /EFI/BOOT/BOOTX64.EFI; then\n\
     \x20 chainloader /EFI/BOOT/BOOTX64.EFI\n\
     \x20 boot\n\
     fi\n\
     exit 1\n"
        .to_string()
}

/// Boots the agent: kernel and initrd from the TFTP root, with the agent's arguments. The
/// address comes from the appliance's side (the requester's own address, the DHCP subnet's
/// prefix and router): GRUB's variables carry no netmask or gateway. `kernel`: which of
/// the agent's kernels.
pub fn agent(
    cfg: &Config,
    mac: MacAddr,
    ip: Ipv4Addr,
    known: Option<(&str, &str)>,
    ephemeral: Option<&EphemeralRoot>,
    api: Option<&cmdline::ApiTls>,
    kernel: &AgentKernel,
) -> String {
    let (prefix, gateway) = subnet_of(cfg, ip);
    let net = format!(
        "{}={ip}/{prefix} {}={}",
        cmdline::IP,
        cmdline::GATEWAY,
        gateway.map(|g| g.to_string()).unwrap_or_default()
    );
    let args = script::agent_args(cfg, mac, ip.into(), &net, known, ephemeral, api);
    let args: Vec<String> = args.split_whitespace().map(quote).collect();
    format!(
        "echo 'Stork: booting the agent on {mac}'\n\
         linux /{kernel} {args}\n\
         initrd /{initrd}\n\
         boot\n\
         echo 'Stork: boot failed, retrying in 10 s'\n\
         sleep 10\n\
         reboot\n",
        kernel = kernel.kernel,
        initrd = kernel.initrd,
        args = args.join(" "),
    )
}

/// The prefix length and router of the DHCP subnet holding `ip`; the provisioning subnet's
/// prefix and no router when none does.
fn subnet_of(cfg: &Config, ip: Ipv4Addr) -> (u8, Option<Ipv4Addr>) {
    match cfg.dhcp.subnets.iter().find(|s| s.net.contains(ip)) {
        Some(s) => (s.net.prefix_len, s.router),
        None => (cfg.dhcp.local().net.prefix_len, None),
    }
}

/// One word for GRUB's shell-like parser: single-quoted, a `'` as `'\''`.
fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The TFTP service's generated files: [`bootstrap`] and each machine's configuration.
pub struct Configs {
    state: AppState,
}

impl Configs {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

impl Generated for Configs {
    fn generate(
        &self,
        path: &str,
        peer: IpAddr,
    ) -> Option<BoxFuture<'static, Result<Vec<u8>, Refused>>> {
        if path == BOOTSTRAP_PATH {
            return Some(std::future::ready(Ok(bootstrap().into_bytes())).boxed());
        }
        let mac = path.strip_prefix(MACHINE_DIR)?;
        let Ok(mac) = mac.parse::<MacAddr>() else {
            return Some(std::future::ready(Err(Refused::NotFound)).boxed());
        };
        let state = self.state.clone();
        Some(
            async move {
                let text = match script::plan(&state, mac, peer).await {
                    Ok(BootPlan::LocalDisk) => local_disk(),
                    Ok(BootPlan::Agent {
                        known,
                        ephemeral,
                        kernel,
                    }) => {
                        let IpAddr::V4(ip) = peer else {
                            // GRUB's TFTP here is IPv4: nothing else asks.
                            return Err(Refused::NotFound);
                        };
                        agent(
                            &state.cfg,
                            mac,
                            ip,
                            known.as_ref().map(|(id, t)| (id.as_str(), t.as_str())),
                            ephemeral.as_ref(),
                            state.api_tls.as_ref(),
                            &kernel,
                        )
                    }
                    Err(e) => {
                        tracing::error!(%mac, error = %e, "cannot build the GRUB configuration");
                        "echo 'Stork: appliance error, retrying in 10 s'\nsleep 10\nreboot\n"
                            .to_string()
                    }
                };
                Ok(format!("set timeout=0\n{text}").into_bytes())
            }
            .boxed(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(cfg: &Config) -> AgentKernel {
        AgentKernel::configured(&cfg.boot.kernel, &cfg.boot.initrd)
    }

    fn cfg() -> Config {
        crate::config::FileConfig::parse(
            "[dhcp]\nrouter = \"10.77.0.254\"\n[boot]\nsecure_boot = true\n",
            std::path::Path::new("test"),
        )
        .unwrap()
        .validate()
        .unwrap()
    }

    /// The agent's arguments, unquoted, from a configuration's `linux` line.
    fn linux_args(config: &str) -> Vec<String> {
        let line = config.lines().find(|l| l.starts_with("linux ")).unwrap();
        line.split_whitespace()
            .skip(2)
            .map(|w| w.trim_matches('\'').to_string())
            .collect()
    }

    #[test]
    fn the_agent_config_carries_what_the_agent_parses() {
        let cfg = cfg();
        let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        let root = EphemeralRoot {
            file: "ephemeral.squashfs".into(),
            sha256: "ab".repeat(32),
        };
        let text = agent(
            &cfg,
            mac,
            Ipv4Addr::new(10, 77, 0, 100),
            Some(("m-1", "stork_agent_x")),
            Some(&root),
            None,
            &kernel(&cfg),
        );
        assert!(text.contains("\nlinux /vmlinuz "), "{text}");
        assert!(text.contains("\ninitrd /initrd.img\nboot\n"), "{text}");
        let args = linux_args(&text).join(" ");
        let parsed = cmdline::AgentArgs::parse(&args).unwrap();
        assert_eq!(parsed.ip, Ipv4Addr::new(10, 77, 0, 100));
        assert_eq!(parsed.prefix_len, 24);
        assert_eq!(parsed.gateway, Some(Ipv4Addr::new(10, 77, 0, 254).into()));
        assert_eq!(parsed.boot_mac, mac);
        assert_eq!(parsed.machine_id.as_deref(), Some("m-1"));
        assert_eq!(parsed.token.as_deref(), Some("stork_agent_x"));
        assert_eq!(parsed.url, cfg.base_url());
        assert!(parsed.ephemeral.is_some());
        // No `initrd=` (GRUB loads the initrd itself; the EFI stub would look for the file).
        assert!(!args.contains("initrd="), "{args}");
    }

    #[test]
    fn an_address_outside_every_subnet_gets_the_local_prefix_and_no_router() {
        let cfg = cfg();
        let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        let text = agent(
            &cfg,
            mac,
            Ipv4Addr::new(192, 0, 2, 7),
            None,
            None,
            None,
            &kernel(&cfg),
        );
        let args = linux_args(&text).join(" ");
        let parsed = cmdline::AgentArgs::parse(&args).unwrap();
        assert_eq!((parsed.prefix_len, parsed.gateway), (24, None));
        assert!(parsed.token.is_none());
    }

    #[test]
    fn words_are_quoted_for_grub() {
        assert_eq!(quote("a=b"), "'a=b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn bootstrap_and_local_disk() {
        assert!(bootstrap().contains("configfile $prefix/machine/$net_default_mac"));
        let local = local_disk();
        assert!(local.contains("chainloader /EFI/BOOT/BOOTX64.EFI"));
        assert!(local.trim_end().ends_with("exit 1"));
    }
}
