//! `stork serve`: builds the runtime config and runs every service under one JoinSet.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, Result};
use tokio::task::JoinSet;

use crate::config::{Config, FileConfig};
use crate::dhcp::{self, handler::ServerInfo};
use crate::http::{self, AppState};
use crate::lifecycle::secure_boot::SignedBoot;
use crate::lifecycle::{Controller, DriverPower};
use crate::supervise::{Backoff, Health, supervise};

/// The command line's say over the configuration file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub interface: Option<String>,
    pub address: Option<Ipv4Addr>,
    pub dhcp_range: Option<[Ipv4Addr; 2]>,
    pub data_dir: Option<PathBuf>,
    /// `sqlite:PATH` or a `postgres://` URL (overrides `database`).
    pub database: Option<String>,
    /// The site (overrides `site`).
    pub site: Option<String>,
    pub http_port: Option<u16>,
    /// Busy-status timeout in seconds (overrides `lifecycle.timeout`).
    pub timeout: Option<u64>,
}

/// Reads the file (or the embedded default), applies command-line overrides, validates.
pub fn load_config(o: &Overrides) -> Result<Config> {
    let mut file = match &o.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    if let Some(v) = &o.interface {
        file.interface = v.clone();
    }
    if let Some(v) = o.address {
        file.address = v;
    }
    if let Some(v) = o.dhcp_range {
        file.dhcp.range = v;
    }
    if let Some(v) = &o.data_dir {
        file.data_dir = v.clone();
    }
    if let Some(v) = &o.database {
        file.database = Some(v.clone());
    }
    if let Some(v) = &o.site {
        file.site = Some(v.clone());
    }
    if let Some(v) = o.http_port {
        file.http.port = v;
    }
    if let Some(v) = o.timeout {
        file.lifecycle.timeout = v;
    }
    Ok(file.validate()?)
}

pub fn serve(args: Overrides) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_http=warn".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cfg = Arc::new(load_config(&args)?);
    std::fs::create_dir_all(cfg.boot_dir())
        .with_context(|| format!("cannot create {}", cfg.boot_dir().display()))?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(run(cfg))
}

/// A service's sockets: bound once before the services start, so that a bind error is a
/// fatal configuration error reported at start, and bound again by each restart.
struct Prebound<T> {
    first: Mutex<Option<T>>,
    bind: Box<dyn Fn() -> Result<T> + Send + Sync>,
}

impl<T> Prebound<T> {
    fn new(bind: impl Fn() -> Result<T> + Send + Sync + 'static) -> Result<Arc<Self>> {
        let first = bind()?;
        Ok(Arc::new(Self {
            first: Mutex::new(Some(first)),
            bind: Box::new(bind),
        }))
    }

    /// The sockets bound at start the first time, fresh ones after.
    fn take(&self) -> Result<T> {
        let first = self
            .first
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        first.map_or_else(|| (self.bind)(), Ok)
    }
}

async fn run(cfg: Arc<Config>) -> Result<()> {
    // HTTPS first: a bad certificate stops the start before anything listens.
    let tls = match &cfg.tls {
        Some(t) => {
            let loaded = t.load(cfg.address).context("HTTPS")?;
            tracing::info!(
                url = %cfg.api_url(),
                fingerprint = %loaded.fingerprint,
                cert = %t.cert.display(),
                "HTTPS serving the API; clients pin this fingerprint (`stork config show`)"
            );
            Some((SocketAddr::new(cfg.http_listen.ip(), t.port), loaded))
        }
        None => None,
    };
    // Opening may block on the network (PostgreSQL), and its client runs a runtime of its
    // own: on the blocking pool, as every later store call is.
    let (database, data_dir) = (cfg.database.clone(), cfg.data_dir.clone());
    let store = tokio::task::spawn_blocking(move || database.open(&data_dir))
        .await
        .context("opening the database")?
        .with_context(|| format!("cannot open the database ({})", cfg.database))?;
    let controller = Controller::new(store, Arc::new(DriverPower)).with_site(&cfg.site);
    let health = Arc::new(Health::default());
    let agent_kernels = crate::agent_kernels::AgentKernels::discover(
        &cfg.boot_dir(),
        &cfg.boot.kernel,
        &cfg.boot.initrd,
    );
    for k in agent_kernels.listed() {
        tracing::info!(name = %k.name, version = %k.version, "the agent's kernel");
    }
    let state = AppState {
        cfg: cfg.clone(),
        controller: controller.clone(),
        dhcp_stats: Arc::default(),
        tftp_stats: Arc::default(),
        dhcp6_stats: Arc::default(),
        health: health.clone(),
        leases: Arc::default(),
        http_stats: Arc::default(),
        api_tls: tls.as_ref().map(|(_, t)| stork_proto::cmdline::ApiTls {
            url: cfg.api_url(),
            fingerprint: t.fingerprint.to_string(),
        }),
        agent_limiter: unauthenticated_limiter(&cfg),
        audit_limiter: unauthenticated_limiter(&cfg),
        agent_kernels: Arc::new(agent_kernels),
        ephemeral: http::script::Ephemeral::start(&cfg.boot_dir(), &cfg.boot.ephemeral),
        signed: Arc::new(SignedBoot::new(cfg.boot.secure_boot)),
    };
    let mut tasks = JoinSet::new();
    let mut service = |name: &'static str, start: Box<dyn Fn() -> ServiceFuture + Send + Sync>| {
        tasks.spawn(supervise(name, health.clone(), Backoff::default(), start));
    };
    if let Some(every) = cfg.power_poll {
        let c = controller.clone();
        service(
            "power_poll",
            Box::new(move || {
                let c = c.clone();
                Box::pin(async move {
                    c.run_power_poll(every).await;
                    Ok(())
                })
            }),
        );
    }
    if let Some(site) = controller.site() {
        tracing::info!(%site, "on a shared database: serving this site's machines' power");
        let c = controller.clone();
        service(
            "power_requests",
            Box::new(move || {
                let c = c.clone();
                Box::pin(async move {
                    c.run_power_requests().await;
                    Ok(())
                })
            }),
        );
    }
    let (c, signed) = (controller.clone(), state.signed.clone());
    service(
        "signed_boot",
        Box::new(move || {
            let (c, signed) = (c.clone(), signed.clone());
            Box::pin(async move {
                signed.follow(c).await;
                Ok(())
            })
        }),
    );
    let (timeout, every) = (cfg.timeout, cfg.check_interval);
    let c = controller.clone();
    service(
        "timeouts",
        Box::new(move || {
            let c = c.clone();
            Box::pin(async move {
                c.run_timeouts(timeout, every).await;
                Ok(())
            })
        }),
    );

    if cfg.dhcp.serves() {
        let sockets = Prebound::new({
            let cfg = cfg.clone();
            move || -> Result<DhcpSockets> {
                let sock = dhcp::bind(&cfg.interface, dhcproto::v4::SERVER_PORT)
                    .map_err(|e| interface_hint(e.into(), &cfg.interface))?;
                // proxyDHCP also answers on the PXE boot server port.
                let pxe = if cfg.dhcp.proxies() {
                    Some(dhcp::bind(&cfg.interface, dhcp::PXE_PORT)?)
                } else {
                    None
                };
                Ok((sock, pxe))
            }
        })?;
        let info = ServerInfo::new(&cfg).with_signed(state.signed.clone());
        let stats = state.dhcp_stats.clone();
        let leases = state.leases.clone();
        let journal = match (cfg.dhcp.ha, controller.store().postgres_config()) {
            // An HA pair: the leases in the shared database, under the pair's site.
            (Some(_), Some(config)) => dhcp::LeaseStore::Postgres {
                config: Box::new(config),
                site: cfg.site.clone(),
            },
            _ => dhcp::LeaseStore::File(dhcp::journal_path(&cfg.data_dir)),
        };
        service(
            "dhcp",
            Box::new(move || {
                let (sockets, info, stats, journal, leases) = (
                    sockets.clone(),
                    info.clone(),
                    stats.clone(),
                    journal.clone(),
                    leases.clone(),
                );
                Box::pin(async move {
                    let (sock, pxe) = sockets.take()?;
                    dhcp::run(sock, pxe, info, &journal, stats, leases)
                        .await
                        .context("DHCP service")
                })
            }),
        );
        let local = cfg.dhcp.local();
        tracing::info!(interface = %cfg.interface, mode = ?local.mode, ranges = ?local.ranges, subnets = cfg.dhcp.subnets.len(), "DHCP serving");
        crate::dhcp::neighbours::ensure(&cfg.dhcp);
    }

    // DHCPv6 names UEFI HTTP boot clients that need a router to the RA service.
    let (router_hints, _) = tokio::sync::broadcast::channel::<std::net::Ipv6Addr>(64);
    // Beside DHCPv4 ("no IPv6 here", so iPXE stops waiting) or DHCPv6 (the M and O flags).
    if cfg.dhcp.ipv6_ra && (cfg.dhcp.serves() || cfg.dhcp6.serves()) {
        let interface = cfg.interface.clone();
        let hints = router_hints.clone();
        let (prefix, len) = (cfg.dhcp6.network(), cfg.dhcp6.prefix_len);
        let ipv6 = match cfg.dhcp6.mode {
            crate::dhcp6::Mode::Full => dhcp::ra::Ipv6Service::Managed { prefix, len },
            crate::dhcp6::Mode::Stateless => dhcp::ra::Ipv6Service::Other { prefix, len },
            crate::dhcp6::Mode::Off => dhcp::ra::Ipv6Service::None,
        };
        service(
            "ipv6_ra",
            Box::new(move || {
                let (interface, hints) = (interface.clone(), hints.subscribe());
                Box::pin(async move {
                    if let Err(e) = dhcp::ra::run(interface, ipv6, hints).await {
                        // Booting still works without: iPXE just waits longer.
                        tracing::warn!(error = %e, "no IPv6 router advertisements");
                    }
                    // Not a failure to restart for.
                    std::future::pending::<()>().await;
                    Ok(())
                })
            }),
        );
    }

    if cfg.dhcp6.serves() {
        let socket = Prebound::new({
            let interface = cfg.interface.clone();
            move || {
                crate::dhcp6::bind(&interface)
                    .with_context(|| format!("cannot serve DHCPv6 on {interface}"))
            }
        })?;
        let (cfg6, http_port, signed) = (cfg.dhcp6.clone(), cfg.http_port, state.signed.clone());
        let stats = state.dhcp6_stats.clone();
        let leases_path = crate::dhcp6::leases_path(&cfg.data_dir);
        let shared = state.leases.clone();
        let router_hints = router_hints.clone();
        service(
            "dhcp6",
            Box::new(move || {
                let (socket, cfg6, stats) = (socket.clone(), cfg6.clone(), stats.clone());
                let router_hints = router_hints.clone();
                let (leases, shared, signed) =
                    (leases_path.clone(), shared.clone(), signed.clone());
                Box::pin(async move {
                    let (sock, duid) = socket.take()?;
                    let info = crate::dhcp6::ServerInfo {
                        cfg: cfg6,
                        duid,
                        http_port,
                        signed,
                    };
                    crate::dhcp6::run(sock, info, leases, stats, shared, router_hints)
                        .await
                        .context("DHCPv6 service")
                })
            }),
        );
    }

    if let Some(tftp_cfg) = cfg.tftp.clone() {
        // The signed chain's GRUB reads its configuration over TFTP (it has no HTTP). Any
        // machine may boot it (a tag, its inventory: `lifecycle::secure_boot`).
        let grub: Option<Arc<dyn crate::tftp::Generated>> =
            Some(Arc::new(crate::grub::Configs::new(state.clone())));
        tracing::info!(listen = %tftp_cfg.listen, root = %tftp_cfg.root.display(), "TFTP serving");
        let twin = cfg.ipv6_twin(tftp_cfg.listen).map(|l| ("tftp6", l));
        for (name, listen) in std::iter::once(("tftp", tftp_cfg.listen)).chain(twin) {
            let socket = Prebound::new(move || {
                crate::tftp::bind(listen)
                    .with_context(|| format!("cannot listen for TFTP on {listen}"))
            })?;
            let (stats, tftp_cfg, grub) =
                (state.tftp_stats.clone(), tftp_cfg.clone(), grub.clone());
            service(
                name,
                Box::new(move || {
                    let (socket, cfg, stats) = (socket.clone(), tftp_cfg.clone(), stats.clone());
                    let grub = grub.clone();
                    Box::pin(async move {
                        let sock = socket.take()?;
                        crate::tftp::run_with(sock, cfg, stats, grub)
                            .await
                            .context("TFTP service")
                    })
                }),
            );
        }
    }

    tracing::info!(listen = %cfg.http_listen, url = %cfg.base_url(), boot_dir = %cfg.boot_dir().display(), "HTTP serving");
    let app = http::router(state.clone());
    let plain = match &tls {
        Some(_) => http::listener::Channel::PlainBesideTls(http::listener::PlainBesideTls {
            api_url: cfg.api_url().into(),
        }),
        None => http::listener::Channel::Plain,
    };
    if let Some(listen6) = cfg.ipv6_twin(cfg.http_listen) {
        let (app, plain) = (app.clone(), plain.clone());
        http_service(&mut service, "http6", listen6, &cfg, &state, app, plain)?;
    }
    http_service(
        &mut service,
        "http",
        cfg.http_listen,
        &cfg,
        &state,
        app.clone(),
        plain,
    )?;
    if let Some((listen, loaded)) = tls {
        let acceptor = tokio_rustls::TlsAcceptor::from(loaded.config);
        let channel = http::listener::Channel::Tls(acceptor);
        if let Some(listen6) = cfg.ipv6_twin(listen) {
            let (app, channel) = (app.clone(), channel.clone());
            http_service(&mut service, "https6", listen6, &cfg, &state, app, channel)?;
        }
        http_service(&mut service, "https", listen, &cfg, &state, app, channel)?;
    }

    // Every listener is bound (`Prebound` binds at creation): a `Type=notify` unit is up.
    match crate::host::notify::ready() {
        Ok(true) => tracing::info!("told systemd the service is ready"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "cannot tell systemd the service is ready"),
    }

    tokio::select! {
        // Supervisors never end on their own; one that does is a bug worth stopping for.
        done = tasks.join_next() => match done {
            Some(Err(e)) => Err(e).context("service supervisor failed"),
            _ => Ok(()),
        },
        _ = shutdown_signal() => {
            tracing::info!("shutting down");
            tasks.shutdown().await;
            Ok(())
        }
    }
}

/// One HTTP listener as a supervised service: bound now (so a taken port fails the start),
/// served by `listener::serve` with `channel` (plain, or TLS), restarted if it fails.
fn http_service(
    service: &mut impl FnMut(&'static str, Box<dyn Fn() -> ServiceFuture + Send + Sync>),
    name: &'static str,
    listen: SocketAddr,
    cfg: &Config,
    state: &AppState,
    app: axum::Router,
    channel: http::listener::Channel,
) -> Result<()> {
    let listener = Prebound::new(move || {
        tcp_listener(listen).with_context(|| format!("cannot listen for {name} on {listen}"))
    })?;
    let (limits, stats) = (cfg.http_limits.clone(), state.http_stats.clone());
    let boot_root = http::boot_root(cfg);
    service(
        name,
        Box::new(move || {
            let (listener, app, limits, stats, channel, boot_root) = (
                listener.clone(),
                app.clone(),
                limits.clone(),
                stats.clone(),
                channel.clone(),
                boot_root.clone(),
            );
            Box::pin(async move {
                let listener = listener.take()?;
                http::listener::serve(listener, app, limits, stats, channel, Some(boot_root))
                    .await
                    .with_context(|| format!("{name} service"))
            })
        }),
    );
    Ok(())
}

/// What `TcpListener::bind` does, without its await (address reuse, a 1024 backlog), and an
/// IPv6 listener takes IPv6 only: an IPv4 peer reaches the IPv4 listener beside it and keeps
/// its IPv4 address.
fn tcp_listener(listen: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(listen), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if listen.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&listen.into())?;
    s.listen(1024)?;
    tokio::net::TcpListener::from_std(s.into())
}

type ServiceFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;
type DhcpSockets = (tokio::net::UdpSocket, Option<tokio::net::UdpSocket>);

/// A DHCP bind error on a missing interface says what to do about it.
fn interface_hint(e: anyhow::Error, interface: &str) -> anyhow::Error {
    let missing = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::ENODEV))
    });
    if !missing {
        return e;
    }
    let names = interfaces();
    e.context(format!(
        "there is no interface {interface:?} on this machine. Serve DHCP on the provisioning \
         network's interface with `--interface NAME` (or `interface` in the config file), \
         and give its address with `--address`; `stork0` is the default because it is the \
         lab's bridge (`cargo xtask demo`). Interfaces here: {}",
        if names.is_empty() {
            "none found".to_string()
        } else {
            names.join(", ")
        }
    ))
}

/// The names of this machine's network interfaces, loopback left out.
fn interfaces() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "lo")
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// A per-address limit on what unauthenticated requests may cost (`http.agent_rate`,
/// `http.agent_burst`).
fn unauthenticated_limiter(
    cfg: &Config,
) -> Arc<std::sync::Mutex<crate::ratelimit::RateLimiter<std::net::IpAddr>>> {
    Arc::new(std::sync::Mutex::new(crate::ratelimit::RateLimiter::new(
        crate::config::RateLimit {
            per_second: cfg.http_limits.agent_rate,
            burst: cfg.http_limits.agent_burst,
        },
    )))
}
