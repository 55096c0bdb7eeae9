//! `stork-image`: fetches the kernel and builds the initrd the appliance serves.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use stork_image::{initrd, kernel, modules};

#[derive(Parser)]
#[command(name = "stork-image", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch a Debian kernel with apt-get and unpack it; prints the kernel directory.
    Kernel(KernelArgs),
    /// Build vmlinuz, initrd.img and manifest.json from a kernel and the agent.
    Initrd(InitrdArgs),
}

#[derive(Args)]
struct KernelArgs {
    /// Cache directory: .debs go to CACHE/debs, the unpacked kernel to CACHE/kernel/<package>.
    #[arg(long, value_name = "DIR")]
    cache: PathBuf,
    /// Kernel package or metapackage to fetch.
    #[arg(long, default_value = kernel::DEFAULT_PACKAGE)]
    package: String,
}

#[derive(Args)]
struct InitrdArgs {
    /// Unpacked kernel: the directory holding boot/ and lib/modules/<kver>/.
    #[arg(long, value_name = "DIR", required_unless_present = "cache")]
    kernel_dir: Option<PathBuf>,
    /// Fetch the kernel into this cache first, as `stork-image kernel` does.
    #[arg(long, value_name = "DIR", conflicts_with = "kernel_dir")]
    cache: Option<PathBuf>,
    /// Kernel package to fetch with --cache.
    #[arg(long, requires = "cache", default_value = kernel::DEFAULT_PACKAGE)]
    package: String,
    /// Kernel version under lib/modules; needed only when there are several.
    #[arg(long)]
    kver: Option<String>,
    /// The agent binary, installed as /init.
    #[arg(long, value_name = "PATH")]
    agent: PathBuf,
    /// Output directory for vmlinuz, initrd.img and manifest.json.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Modules to include with their dependencies ('-' and '_' are the same; built-ins are skipped).
    #[arg(
        long,
        value_delimiter = ',',
        default_values = modules::DEFAULT_MODULES.iter().copied(),
    )]
    modules: Vec<String>,
    /// Timestamp for every archive entry.
    #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 0, value_parser = parse_epoch)]
    source_date_epoch: u32,
}

/// Seconds since 1970; an empty value (an exported but blank SOURCE_DATE_EPOCH) means 0.
fn parse_epoch(s: &str) -> Result<u32, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(0);
    }
    s.parse()
        .map_err(|e| format!("{e} (seconds since 1970, at most {})", u32::MAX))
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Kernel(args) => {
            let dir = kernel::fetch(&args.cache, &args.package)
                .with_context(|| format!("fetching kernel package {}", args.package))?;
            println!("{}", dir.display());
        }
        Cmd::Initrd(args) => {
            let started = Instant::now();
            let kernel_dir = match (args.kernel_dir, args.cache) {
                (Some(dir), _) => dir,
                (None, Some(cache)) => kernel::fetch(&cache, &args.package)
                    .with_context(|| format!("fetching kernel package {}", args.package))?,
                (None, None) => anyhow::bail!("give --kernel-dir or --cache"),
            };
            let manifest = initrd::build(&initrd::Request {
                kernel_dir: &kernel_dir,
                kver: args.kver.as_deref(),
                agent: &args.agent,
                out: &args.out,
                modules: &args.modules,
                source_date_epoch: args.source_date_epoch,
            })
            .with_context(|| format!("building initrd from {}", kernel_dir.display()))?;
            for a in &manifest.artifacts {
                eprintln!(
                    "stork-image: {} {} bytes sha256 {}",
                    a.name, a.size, a.sha256
                );
            }
            eprintln!(
                "stork-image: done in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            println!("{}", args.out.display());
        }
    }
    Ok(())
}
