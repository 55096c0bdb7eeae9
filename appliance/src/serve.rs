//! `stork serve`: builds the runtime config and runs every service under one JoinSet.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::task::JoinSet;

use crate::config::{Config, FileConfig};
use crate::controller::{Controller, DriverPower};
use crate::dhcp::{self, handler::ServerInfo};
use crate::http::{self, AppState};
use crate::store::Store;

/// The command line's say over the configuration file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub interface: Option<String>,
    pub address: Option<Ipv4Addr>,
    pub dhcp_range: Option<[Ipv4Addr; 2]>,
    pub data_dir: Option<PathBuf>,
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

async fn run(cfg: Arc<Config>) -> Result<()> {
    let store = Store::open(&cfg.db_path())
        .with_context(|| format!("cannot open the database {}", cfg.db_path().display()))?;
    let controller = Controller::new(store.clone(), Arc::new(DriverPower));
    let state = AppState {
        cfg: cfg.clone(),
        store,
        controller: controller.clone(),
        dhcp_stats: Arc::default(),
        tftp_stats: Arc::default(),
    };
    let mut tasks = JoinSet::new();
    if let Some(every) = cfg.power_poll {
        let c = controller.clone();
        tasks.spawn(async move {
            c.run_power_poll(every).await;
            Ok(())
        });
    }
    let (timeout, every) = (cfg.timeout, cfg.check_interval);
    tasks.spawn(async move {
        controller.run_timeouts(timeout, every).await;
        Ok(())
    });

    if cfg.dhcp.serves() {
        let sock = dhcp::bind(&cfg.interface, dhcproto::v4::SERVER_PORT)?;
        // proxyDHCP also answers on the PXE boot server port.
        let pxe = if cfg.dhcp.proxies() {
            Some(dhcp::bind(&cfg.interface, dhcp::PXE_PORT)?)
        } else {
            None
        };
        let info = ServerInfo {
            server_ip: cfg.address,
            http_base: cfg.base_url(),
            dhcp: cfg.dhcp.clone(),
        };
        let stats = state.dhcp_stats.clone();
        let journal = dhcp::journal_path(&cfg.data_dir);
        tasks.spawn(async move {
            dhcp::run(sock, pxe, info, &journal, stats)
                .await
                .context("DHCP service")
        });
        let local = cfg.dhcp.local();
        tracing::info!(interface = %cfg.interface, mode = ?local.mode, ranges = ?local.ranges, subnets = cfg.dhcp.subnets.len(), "DHCP serving");
        if cfg.dhcp.ipv6_ra {
            let interface = cfg.interface.clone();
            tasks.spawn(async move {
                if let Err(e) = dhcp::ra::run(interface).await {
                    // Booting still works without: iPXE just waits longer.
                    tracing::warn!(error = %e, "no IPv6 router advertisements");
                }
                // Ending would end the whole service (see the select below).
                std::future::pending::<()>().await;
                Ok(())
            });
        }
    }

    if let Some(tftp_cfg) = cfg.tftp.clone() {
        let sock = crate::tftp::bind(tftp_cfg.listen)
            .with_context(|| format!("cannot listen for TFTP on {}", tftp_cfg.listen))?;
        let stats = state.tftp_stats.clone();
        tracing::info!(listen = %tftp_cfg.listen, root = %tftp_cfg.root.display(), "TFTP serving");
        tasks.spawn(async move {
            crate::tftp::run(sock, tftp_cfg, stats)
                .await
                .context("TFTP service")
        });
    }

    let listener = tokio::net::TcpListener::bind(cfg.http_listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", cfg.http_listen))?;
    tracing::info!(listen = %cfg.http_listen, url = %cfg.base_url(), boot_dir = %cfg.boot_dir().display(), "HTTP serving");
    let app = http::router(state);
    tasks.spawn(async move { axum::serve(listener, app).await.context("HTTP service") });

    tokio::select! {
        done = tasks.join_next() => match done {
            Some(Ok(Err(e))) => Err(e),
            Some(Err(e)) => Err(e).context("service task panicked"),
            _ => Ok(()),
        },
        _ = shutdown_signal() => {
            tracing::info!("shutting down");
            tasks.shutdown().await;
            Ok(())
        }
    }
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
