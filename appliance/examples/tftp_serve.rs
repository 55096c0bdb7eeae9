//! Stork's TFTP service alone, on the same multi-threaded tokio runtime as `stork serve`:
//! for `cargo xtask bench tftp` and for trying clients by hand.
//!
//! `cargo run --release --example tftp_serve -p stork -- --root DIR --listen 0.0.0.0:69`
//! On SIGINT or SIGTERM it prints the counters as JSON on stdout and exits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use stork::tftp::{self, Stats, TftpConfig};

#[derive(Parser)]
struct Args {
    /// Directory served.
    #[arg(long)]
    root: PathBuf,
    /// Listening address and port.
    #[arg(long, default_value = "0.0.0.0:69")]
    listen: SocketAddr,
    /// Largest window granted (RFC 7440).
    #[arg(long, default_value_t = TftpConfig::default().max_window)]
    max_window: u16,
    /// Largest block size granted.
    #[arg(long, default_value_t = TftpConfig::default().max_block)]
    max_block: u16,
    /// Match names case-insensitively when the exact name is missing.
    #[arg(long)]
    case_insensitive: bool,
    /// First retransmission interval, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// Retransmissions without progress before a client is dropped.
    #[arg(long, default_value_t = TftpConfig::default().retries)]
    retries: u32,
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let defaults = TftpConfig::default();
    let cfg = TftpConfig {
        root: args.root,
        listen: args.listen,
        case_insensitive: args.case_insensitive,
        max_block: args.max_block,
        max_window: args.max_window,
        timeout: Duration::from_millis(args.timeout_ms),
        max_timeout: defaults
            .max_timeout
            .max(Duration::from_millis(args.timeout_ms)),
        retries: args.retries,
        // The bench's boot storm comes from one address: the per-address cap that holds a
        // hostile host back would refuse most of it.
        max_transfers_per_client: defaults.max_transfers,
        ..defaults
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(async move {
        let stats = Arc::new(Stats::default());
        let sock = tftp::bind(cfg.listen)?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot watch SIGTERM")?;
        let result = tokio::select! {
            r = tftp::run(sock, cfg, stats.clone()) => r.context("TFTP service"),
            _ = tokio::signal::ctrl_c() => Ok(()),
            _ = term.recv() => Ok(()),
        };
        println!("{}", serde_json::to_string(&stats.snapshot())?);
        result
    })
}
