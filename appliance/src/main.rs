//! `stork`: the appliance daemon (`stork serve`) and its command-line client.

use stork::{cli, config, serve};

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "stork", version, about = "Bare-metal provisioning appliance")]
struct Cli {
    /// Appliance URL for client commands.
    #[arg(
        long,
        env = "STORK_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the appliance: DHCP, HTTP boot files, boot scripts and the API.
    Serve(ServeArgs),
    /// Inspect machines.
    #[command(subcommand)]
    Machine(MachineCmd),
    /// Print the services' counters (packets, malformed, replies, ...).
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Print or check configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Configuration file (TOML); every key has a default.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Provisioning interface (overrides `interface`).
    #[arg(long)]
    interface: Option<String>,
    /// This appliance's address on the provisioning network (overrides `address`).
    #[arg(long)]
    address: Option<Ipv4Addr>,
    /// DHCP range as START,END (overrides `dhcp.range`).
    #[arg(long, value_parser = parse_range)]
    dhcp_range: Option<[Ipv4Addr; 2]>,
    /// State directory (overrides `data_dir`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// HTTP port (overrides `http.port`).
    #[arg(long)]
    http_port: Option<u16>,
}

impl From<ServeArgs> for serve::Overrides {
    fn from(a: ServeArgs) -> Self {
        Self {
            config: a.config,
            interface: a.interface,
            address: a.address,
            dhcp_range: a.dhcp_range,
            data_dir: a.data_dir,
            http_port: a.http_port,
        }
    }
}

fn parse_range(s: &str) -> Result<[Ipv4Addr; 2], String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("expected START,END, got {s:?}"))?;
    let ip = |t: &str| {
        t.trim()
            .parse::<Ipv4Addr>()
            .map_err(|_| format!("{t:?} is not an IPv4 address"))
    };
    Ok([ip(a)?, ip(b)?])
}

#[derive(Subcommand)]
enum MachineCmd {
    /// List machines.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one machine by id or MAC address.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print the full default configuration, commented.
    Default,
    /// Check a configuration file and print the effective settings.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve(args) => serve::serve(args.into()),
        Cmd::Machine(MachineCmd::List { json }) => cli::machine_list(&cli.url, json),
        Cmd::Machine(MachineCmd::Show { id, json }) => cli::machine_show(&cli.url, &id, json),
        Cmd::Stats { json } => cli::stats(&cli.url, json),
        Cmd::Config(ConfigCmd::Default) => {
            print!("{}", config::DEFAULT_TOML);
            Ok(())
        }
        Cmd::Config(ConfigCmd::Check { config }) => {
            let cfg = serve::load_config(&serve::Overrides {
                config,
                ..Default::default()
            })?;
            println!("{cfg:#?}");
            Ok(())
        }
    }
}
