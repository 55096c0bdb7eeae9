//! Per-machine iPXE boot scripts: the answer to "what should this machine boot now?".

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use stork_proto::{MacAddr, cmdline};

use super::AppState;
use crate::agent_kernels::AgentKernel;
use crate::config::Config;
use crate::store::{Machine, StoreError};
use stork_proto::ImageRole;

use crate::lifecycle::boot::Tools;
pub use crate::lifecycle::boot::{BootChoice, choose};

pub async fn ipxe_script(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(mac): Path<String>,
) -> Response {
    let mac = match mac.parse::<MacAddr>() {
        Ok(mac) => mac,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("#!ipxe\necho {e}\n")).into_response(),
    };
    match script_for(&state, mac, peer.ip()).await {
        // A script may carry this boot's agent token: no cache keeps it.
        Ok(script) => (
            [
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
            ],
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

/// What a machine boots now, whatever its loader (iPXE script, GRUB configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootPlan {
    /// The agent; with the machine's id and this boot's token when the machine is known and
    /// the token was granted to the requester.
    Agent {
        known: Option<(String, String)>,
        ephemeral: Option<EphemeralRoot>,
        /// The kernel the agent boots with (the machine's minimum kernel decides).
        kernel: AgentKernel,
    },
    /// The next device in the firmware's order: the local disk.
    LocalDisk,
}

/// Decides [`BootPlan`] for `mac`, asked from `from` (the token goes only to the address
/// that holds the MAC's lease: `Controller::boot`).
pub async fn plan(state: &AppState, mac: MacAddr, from: IpAddr) -> Result<BootPlan, StoreError> {
    let (choice, agent) = state
        .controller
        .boot(mac, from, state.lease_of(mac, from))
        .await?;
    // Only a task that needs the root's tools waits for its hash.
    let ephemeral = if needs_tools(state, agent.as_ref().map(|a| &a.machine)).await? {
        state.ephemeral.settled(EPHEMERAL_WAIT).await
    } else {
        None
    };
    let min = agent.as_ref().and_then(|a| a.machine.min_kernel.as_deref());
    let kernel = state.agent_kernels.for_machine(min).clone();
    Ok(match (choice, agent) {
        (BootChoice::Agent { .. }, Some(a)) => BootPlan::Agent {
            known: Some((a.machine.id, a.token)),
            ephemeral,
            kernel,
        },
        (BootChoice::LocalDisk, _) => BootPlan::LocalDisk,
        _ => BootPlan::Agent {
            known: None,
            ephemeral,
            kernel,
        },
    })
}

/// Whether the agent booted for `machine` (`None`: enlisting) needs the ephemeral root
/// ([`Tools`]), asking the store what the rule leaves open.
async fn needs_tools(state: &AppState, machine: Option<&Machine>) -> Result<bool, StoreError> {
    Ok(match crate::lifecycle::boot::tools(machine) {
        Tools::Needed => true,
        Tools::NotNeeded => false,
        Tools::IfScripts => {
            let tests = machine.map_or(&[][..], |m| m.commission_tests.as_slice());
            !crate::commissioning::task_scripts(state.controller.scripts().await?, tests).is_empty()
        }
        Tools::UnlessRaw(image) => !state
            .controller
            .boot_resource(&image)
            .await?
            .is_some_and(|r| r.files.iter().any(|f| f.role == ImageRole::Raw)),
    })
}

async fn script_for(state: &AppState, mac: MacAddr, from: IpAddr) -> Result<String, StoreError> {
    Ok(match plan(state, mac, from).await? {
        BootPlan::Agent {
            known,
            ephemeral,
            kernel,
        } => agent_script(
            &state.cfg,
            mac,
            from,
            known
                .as_ref()
                .map(|(id, token)| (id.as_str(), token.as_str())),
            ephemeral.as_ref(),
            state.api_tls.as_ref(),
            &kernel,
        ),
        BootPlan::LocalDisk => local_disk_script(),
    })
}

/// Boot from the next device in the firmware's order (the local disk). `exit 1`, not `exit`:
/// an EFI application that returns success makes UEFI firmware stop at its boot manager menu
/// (as the UEFI spec's boot manager allows; OVMF opens UiApp) instead of trying the next
/// boot option; BIOS firmware ignores the status.
pub fn local_disk_script() -> String {
    "#!ipxe\necho Stork: booting from local disk\nexit 1\n".to_string()
}

/// The script that boots the Stork agent, asked for from `from`. Over IPv4 the address
/// comes from iPXE's own settings (`netX` is the interface iPXE configured last), so it is
/// right whether Stork or another DHCP server leased it; over IPv6 it is the address the
/// script was asked from, on `[dhcp6]`'s prefix (iPXE's IPv6 settings are spread over
/// several blocks, and the source address is the one its DHCPv6 lease gave). `known`
/// carries the machine id and this boot's agent token; `ephemeral`, when the file is there,
/// the root the agent switches into before its task; `api`, when HTTPS is on, where the
/// agent calls the API and the certificate it pins; `kernel` what the agent boots with.
pub fn agent_script(
    cfg: &Config,
    mac: MacAddr,
    from: IpAddr,
    known: Option<(&str, &str)>,
    ephemeral: Option<&EphemeralRoot>,
    api: Option<&cmdline::ApiTls>,
    kernel: &AgentKernel,
) -> String {
    let base = cfg.base_url_for(from);
    let net = match crate::lifecycle::boot::canonical(from) {
        IpAddr::V6(v6) => format!("{}={v6}/{}", cmdline::IP, cfg.dhcp6.prefix_len),
        IpAddr::V4(_) => format!(
            "{ip}=${{netX/ip}}/${{netX/netmask}} {gw}=${{netX/gateway}}",
            ip = cmdline::IP,
            gw = cmdline::GATEWAY,
        ),
    };
    let args = agent_args(cfg, mac, from, &net, known, ephemeral, api);
    // UEFI: the kernel finds its initrd only if `initrd=<name>` names it (docs/measurements.md).
    format!(
        "#!ipxe\n\
         echo Stork: booting the agent on {mac}\n\
         kernel {base}/boot/{kernel} initrd={initrd} {args} || goto failed\n\
         initrd {base}/boot/{initrd} || goto failed\n\
         boot || goto failed\n\
         :failed\n\
         echo Stork: boot failed, retrying in 10 s\n\
         sleep 10\n\
         reboot\n",
        kernel = kernel.kernel,
        initrd = kernel.initrd,
    )
}

/// The agent's kernel arguments after the kernel's own, for any loader: the configured
/// extra arguments, where the appliance is (as seen from `from`, the loader's address),
/// the boot MAC, `net` (the address arguments, as the loader can give them), and the
/// machine's identity, ephemeral root and HTTPS API.
pub fn agent_args(
    cfg: &Config,
    mac: MacAddr,
    from: IpAddr,
    net: &str,
    known: Option<(&str, &str)>,
    ephemeral: Option<&EphemeralRoot>,
    api: Option<&cmdline::ApiTls>,
) -> String {
    let base = cfg.base_url_for(from);
    let mut args = format!(
        "{extra} {url}={base} {bootif}={bootif_val} {net}",
        extra = cfg.boot.cmdline,
        url = cmdline::URL,
        bootif = cmdline::BOOTIF,
        bootif_val = mac.to_bootif(),
    );
    if let Some((id, token)) = known {
        args.push_str(&format!(
            " {}={id} {}={token}",
            cmdline::MACHINE,
            cmdline::TOKEN
        ));
    }
    if let Some(e) = ephemeral {
        args.push_str(&format!(
            " {}={base}/boot/{} {}={}",
            cmdline::EPHEMERAL,
            e.file,
            cmdline::EPHEMERAL_SHA256,
            e.sha256
        ));
    }
    if let Some(a) = api {
        let url = match crate::lifecycle::boot::canonical(from) {
            IpAddr::V6(_) => cfg.api_url_for(from),
            IpAddr::V4(_) => a.url.clone(),
        };
        args.push_str(&format!(
            " {}={url} {}={}",
            cmdline::API,
            cmdline::TLS,
            a.fingerprint
        ));
    }
    args
}

/// How long a boot script waits for the ephemeral root's hash under way: hashing a few
/// hundred MiB takes about a second; past this the machine boots without the root.
pub const EPHEMERAL_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The ephemeral root as the kernel line names it: its file under `/boot/` and its sha256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EphemeralRoot {
    pub file: String,
    pub sha256: String,
}

/// The ephemeral root's sha256, kept current off the request path and off start-up: hashed
/// on a thread of its own at start and, when the file's identity (size, mtime, inode)
/// changes, again on a blocking thread. A request only stats the file; while a hash is under
/// way it waits for it (bounded, [`Ephemeral::settled`]), and past the bound it gets no
/// ephemeral keys (the agent then works from its initrd), so a machine never gets a sum that
/// does not match.
pub struct Ephemeral {
    file: String,
    path: PathBuf,
    known: Mutex<Known>,
    /// Woken when a hash ends, whatever its outcome.
    hashed: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Known {
    /// The sum and the file identity it was computed for.
    digest: Option<(Stamp, String)>,
    refreshing: bool,
    /// Last seen presence, so that appearing and disappearing are logged once each.
    present: Option<bool>,
}

/// What changes when the file is replaced or rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

fn stamp(path: &std::path::Path) -> std::io::Result<Stamp> {
    let m = std::fs::metadata(path)?;
    if !m.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
    })
}

fn sha256_file(path: &std::path::Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

impl Ephemeral {
    /// Starts hashing `boot_dir/file` on a thread of its own (a large root took the
    /// listener's start-up a second or more); warns once when it is absent.
    pub fn start(boot_dir: &std::path::Path, file: &str) -> Arc<Self> {
        let e = Arc::new(Self {
            file: file.to_string(),
            path: boot_dir.join(file),
            known: Mutex::new(Known::default()),
            hashed: tokio::sync::Notify::new(),
        });
        e.lock().refreshing = true;
        let this = Arc::clone(&e);
        if let Err(err) = std::thread::Builder::new()
            .name("ephemeral-hash".into())
            .spawn(move || this.refresh())
        {
            tracing::warn!(error = %err, "cannot start hashing the ephemeral root; hashing it here");
            e.refresh();
        }
        e
    }

    /// [`Ephemeral::current`], waiting up to `limit` for a hash under way (at start-up, or
    /// after the file was replaced) rather than booting a machine without its root.
    pub async fn settled(self: &Arc<Self>, limit: std::time::Duration) -> Option<EphemeralRoot> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // Registered before the check, so a hash that ends in between is not missed.
            let hashed = self.hashed.notified();
            tokio::pin!(hashed);
            hashed.as_mut().enable();
            if let Some(r) = self.current() {
                return Some(r);
            }
            if !self.lock().refreshing {
                return None;
            }
            if tokio::time::timeout_at(deadline, hashed).await.is_err() {
                return None;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Known> {
        // A poisoned lock only means a refresh panicked; what it guards is still consistent.
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file and its sum when the sum matches the file as it is now; otherwise `None`,
    /// having started a refresh if the file is there.
    pub fn current(self: &Arc<Self>) -> Option<EphemeralRoot> {
        let now = stamp(&self.path);
        {
            let mut k = self.lock();
            let Ok(now) = now else {
                self.note_presence(&mut k, false);
                k.digest = None;
                return None;
            };
            if let Some((seen, sum)) = &k.digest
                && *seen == now
            {
                return Some(EphemeralRoot {
                    file: self.file.clone(),
                    sha256: sum.clone(),
                });
            }
            if k.refreshing {
                return None;
            }
            k.refreshing = true;
        }
        tracing::info!(path = %self.path.display(), "ephemeral root changed; hashing it again");
        let this = Arc::clone(self);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(move || this.refresh())),
            Err(_) => drop(std::thread::spawn(move || this.refresh())),
        }
        None
    }

    /// Hashes the file and keeps the sum if the file did not change meanwhile. Blocking.
    fn refresh(&self) {
        self.hash_once();
        self.hashed.notify_waiters();
    }

    fn hash_once(&self) {
        let started = Instant::now();
        let result = stamp(&self.path).and_then(|before| {
            let sum = sha256_file(&self.path)?;
            Ok((before, sum, stamp(&self.path)?))
        });
        let mut k = self.lock();
        k.refreshing = false;
        match result {
            Ok((before, sum, after)) if before == after => {
                self.note_presence(&mut k, true);
                tracing::info!(path = %self.path.display(), size = after.size, sha256 = %sum, ms = started.elapsed().as_millis() as u64, "ephemeral root hashed");
                k.digest = Some((after, sum));
            }
            // Still being written: the next request hashes it again.
            Ok(_) => k.digest = None,
            Err(e) => {
                k.digest = None;
                if e.kind() == std::io::ErrorKind::NotFound {
                    self.note_presence(&mut k, false);
                } else {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot hash the ephemeral root; agents work from the initrd");
                }
            }
        }
    }

    fn note_presence(&self, k: &mut Known, present: bool) {
        if k.present == Some(present) {
            return;
        }
        if !present {
            tracing::warn!(path = %self.path.display(), "no ephemeral root (boot.ephemeral): agents run their tasks from the initrd");
        }
        k.present = Some(present);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FileConfig;
    use crate::lifecycle::Status;
    use crate::store::Machine;
    use stork_proto::cmdline::AgentArgs;

    fn default_kernel(cfg: &Config) -> AgentKernel {
        AgentKernel::configured(&cfg.boot.kernel, &cfg.boot.initrd)
    }

    /// An iPXE client on the default provisioning network.
    const FROM: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 77, 0, 100));

    fn expand(kernel_line: &str) -> AgentArgs {
        let expanded = kernel_line
            .replace("${netX/ip}", "10.77.0.100")
            .replace("${netX/netmask}", "255.255.255.0")
            .replace("${netX/gateway}", "")
            .replace(" || goto failed", "");
        AgentArgs::parse(&expanded).unwrap()
    }

    #[test]
    fn script_carries_the_https_api_and_the_pin() {
        let cfg = FileConfig::default().validate().unwrap();
        let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        let api = cmdline::ApiTls {
            url: cfg.api_url(),
            fingerprint: format!("sha256:{}", "0f".repeat(32)),
        };
        let s = agent_script(
            &cfg,
            mac,
            FROM,
            Some(("m1", "t")),
            None,
            Some(&api),
            &default_kernel(&cfg),
        );
        let kernel = s.lines().find(|l| l.starts_with("kernel ")).unwrap();
        let args = expand(kernel);
        assert_eq!(args.api.as_ref(), Some(&api));
        assert_eq!(args.api_url(), "https://10.77.0.1:8443");
        // Boot files stay on plain HTTP: firmware speaks nothing else.
        assert_eq!(args.url, "http://10.77.0.1:8080");
    }

    #[test]
    fn an_ipv6_requester_gets_ipv6_urls_and_its_own_address() {
        let mut file = FileConfig::default();
        file.dhcp6.mode = crate::dhcp6::Mode::Full;
        let cfg = file.validate().unwrap();
        let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        let api = cmdline::ApiTls {
            url: cfg.api_url(),
            fingerprint: format!("sha256:{}", "0f".repeat(32)),
        };
        let from: IpAddr = "fd77::105".parse().unwrap();
        let s = agent_script(
            &cfg,
            mac,
            from,
            Some(("m1", "t")),
            None,
            Some(&api),
            &default_kernel(&cfg),
        );
        assert!(
            s.contains("kernel http://[fd77::1]:8080/boot/vmlinuz "),
            "{s}"
        );
        assert!(
            s.contains("\ninitrd http://[fd77::1]:8080/boot/initrd.img"),
            "{s}"
        );
        let kernel = s.lines().find(|l| l.starts_with("kernel ")).unwrap();
        let args = AgentArgs::parse(&kernel.replace(" || goto failed", "")).unwrap();
        assert_eq!(args.url, "http://[fd77::1]:8080");
        assert_eq!(args.ip, from);
        assert_eq!(args.prefix_len, 64);
        assert_eq!(args.gateway, None);
        assert_eq!(args.api_url(), "https://[fd77::1]:8443");
        // The same appliance still answers an IPv4 requester over IPv4.
        let s = agent_script(&cfg, mac, FROM, None, None, None, &default_kernel(&cfg));
        assert!(
            s.contains("kernel http://10.77.0.1:8080/boot/vmlinuz "),
            "{s}"
        );
    }

    #[test]
    fn script_carries_what_the_agent_parses() {
        let cfg = FileConfig::default().validate().unwrap();
        let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        let s = agent_script(&cfg, mac, FROM, None, None, None, &default_kernel(&cfg));
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

        let s = agent_script(
            &cfg,
            mac,
            FROM,
            Some(("m1", "stork_agent_abc")),
            None,
            None,
            &default_kernel(&cfg),
        );
        let args = expand(s.lines().find(|l| l.starts_with("kernel ")).unwrap());
        assert_eq!(args.machine_id.as_deref(), Some("m1"));
        assert_eq!(args.token.as_deref(), Some("stork_agent_abc"));
        assert_eq!(args.ephemeral, None);
    }

    #[test]
    fn script_names_the_ephemeral_root_with_its_sum() {
        let cfg = FileConfig::default().validate().unwrap();
        let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        let root = EphemeralRoot {
            file: "ephemeral.squashfs".into(),
            sha256: "ab".repeat(32),
        };
        for known in [None, Some(("m1", "stork_agent_abc"))] {
            let s = agent_script(
                &cfg,
                mac,
                FROM,
                known,
                Some(&root),
                None,
                &default_kernel(&cfg),
            );
            let args = expand(s.lines().find(|l| l.starts_with("kernel ")).unwrap());
            assert_eq!(
                args.ephemeral,
                Some(cmdline::EphemeralRoot {
                    url: "http://10.77.0.1:8080/boot/ephemeral.squashfs".into(),
                    sha256: "ab".repeat(32),
                })
            );
            assert_eq!(args.token.as_deref(), known.map(|k| k.1));
        }
    }

    fn wait_current(e: &Arc<Ephemeral>) -> Option<EphemeralRoot> {
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(r) = e.current() {
                return Some(r);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn ephemeral_sum_is_computed_at_start_and_again_after_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ephemeral.squashfs");
        std::fs::write(&path, b"hsqs first").unwrap();
        let e = Ephemeral::start(dir.path(), "ephemeral.squashfs");
        // Hashed on a thread from the start: a request waits for that hash, not its own.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let first = rt
            .block_on(e.settled(std::time::Duration::from_secs(10)))
            .unwrap();
        assert_eq!(first.file, "ephemeral.squashfs");
        assert_eq!(first.sha256, hex::encode(Sha256::digest(b"hsqs first")));
        assert_eq!(e.current(), Some(first.clone()));

        // Replaced: never the old sum for the new file; the new one once hashed.
        let tmp = dir.path().join("new");
        std::fs::write(&tmp, b"hsqs second, longer").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let second = wait_current(&e).unwrap();
        assert_eq!(
            second.sha256,
            hex::encode(Sha256::digest(b"hsqs second, longer"))
        );

        // Removed: no keys.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(e.current(), None);
    }

    #[test]
    fn no_ephemeral_file_means_no_keys() {
        let dir = tempfile::tempdir().unwrap();
        let e = Ephemeral::start(dir.path(), "ephemeral.squashfs");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        // The start's hash finds nothing: a request waiting for it gets no keys.
        assert_eq!(
            rt.block_on(e.settled(std::time::Duration::from_secs(10))),
            None
        );
        assert_eq!(e.current(), None);
        // A directory by that name is not a root image either.
        std::fs::create_dir(dir.path().join("ephemeral.squashfs")).unwrap();
        assert_eq!(e.current(), None);
        // Appearing later is noticed.
        std::fs::remove_dir(dir.path().join("ephemeral.squashfs")).unwrap();
        std::fs::write(dir.path().join("ephemeral.squashfs"), b"x").unwrap();
        assert_eq!(
            wait_current(&e).unwrap().sha256,
            hex::encode(Sha256::digest(b"x"))
        );
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
