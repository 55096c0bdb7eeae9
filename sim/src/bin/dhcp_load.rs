//! `stork-dhcp-load`: DHCPv4 exchanges at a fixed rate as a relay; prints the report as
//! JSON (what `cargo xtask bench dhcp` reads). See `stork_sim::dhcp_load`.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use stork_sim::dhcp_load::{Load, run};

#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The DHCP server (port 67).
    #[arg(long)]
    server: Ipv4Addr,
    /// This host's address on the server's subnet: the relay address the replies go to.
    #[arg(long)]
    relay: Ipv4Addr,
    /// Exchanges started per second.
    #[arg(long)]
    rate: u64,
    /// Seconds exchanges are started for.
    #[arg(long, default_value_t = 20)]
    secs: u64,
    /// Milliseconds replies are still waited for after the last start.
    #[arg(long, default_value_t = 300)]
    drain_ms: u64,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let report = run(&Load {
        server: a.server,
        relay: a.relay,
        rate: a.rate,
        duration: Duration::from_secs(a.secs),
        drain: Duration::from_millis(a.drain_ms),
    })
    .with_context(|| format!("exchanges from {}:67 to {}:67", a.relay, a.server))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
