//! `stork-image`: fetches the kernel and builds the initrd the appliance serves, the agent's
//! ephemeral SquashFS root, and deployable OS images from recipes; writes an image to a disk.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use stork_image::manifest::ImageEntry;
use stork_image::progress::Progress;
use stork_image::recipe::Recipe;
use stork_image::{ephemeral, initrd, kernel, modules, os, squashfs, write};

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
    /// Fetch the signed boot chain for Secure Boot (Debian's shim and network GRUB) with
    /// apt-get into OUT: shimx64.efi and grubx64.efi.
    Loaders(LoadersArgs),
    /// Build the agent's ephemeral root, OUT/ephemeral.squashfs (needs root: debootstrap,
    /// chroot).
    Ephemeral(EphemeralArgs),
    /// Build an OS from a recipe: OUT/<name>.root.squashfs, .root.tar.zst and .raw.zst (needs
    /// root: debootstrap, chroot).
    Os(OsArgs),
    /// Build (or find in the cache) the root tree of an image and print its path.
    Rootfs(RootfsArgs),
    /// Write a SquashFS of a directory the way the images are written (reproducible, zstd).
    Squashfs(SquashfsArgs),
    /// Build the appliance: one raw GPT disk image (BIOS and UEFI, USB stick or internal disk)
    /// with Debian, systemd and Stork, the boot files and OS images (needs root: debootstrap,
    /// chroot).
    Appliance(ApplianceArgs),
    /// Write a disk image (raw, or .raw.zst) to a USB stick or disk, then read it back and
    /// compare. Refuses mounted disks, the system's own disk, disks smaller than the image and
    /// read-only ones; asks for `yes` unless --yes.
    Write(WriteArgs),
    /// Put a newer appliance image's system on an appliance disk that is not running (a USB
    /// stick, a VM's disk image): written to the slot not in use and tried once at the next
    /// boot; the data and configuration partitions are kept.
    /// For tests: copy OS image NAME of IMAGES to OUT with range RANGE dropped from its block
    /// map (and the map's size and sha256 updated in OUT/manifest.json): a wrong map that is
    /// registered as the right one. A deploy of it must fail with "block map: ...".
    #[command(hide = true)]
    DropMapRange {
        images: PathBuf,
        name: String,
        range: usize,
        out: PathBuf,
    },
    Upgrade {
        /// The appliance disk (a block device or a disk image file).
        disk: PathBuf,
        /// The newer appliance image (raw).
        image: PathBuf,
    },
}

#[derive(Args)]
struct WriteArgs {
    /// The image: a raw disk image, or zstd-compressed (as `os` writes <name>.raw.zst).
    image: PathBuf,
    /// The whole-disk block device to overwrite, e.g. /dev/sdb or /dev/disk/by-id/usb-...
    device: PathBuf,
    /// Do not ask for confirmation (needed when stdin is not a terminal).
    #[arg(long)]
    yes: bool,
    /// Accept a regular file as DEVICE (tests, CI): written in place from byte 0, it must
    /// already be at least as large as the image (`truncate -s 4G disk.img`).
    #[arg(long)]
    allow_file: bool,
}

#[derive(Args)]
struct ApplianceArgs {
    /// Cache directory: debootstrap and apt downloads, root trees.
    #[arg(long, value_name = "DIR")]
    cache: PathBuf,
    /// The raw disk image to write (a JSON description goes beside it).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// The `stork` binary to install.
    #[arg(long, value_name = "FILE")]
    stork: PathBuf,
    /// Boot files to serve: `stork-image initrd`'s output, the ephemeral SquashFS, the network
    /// boot programs.
    #[arg(long, value_name = "DIR")]
    boot: PathBuf,
    /// Images directory (with manifest.json) holding the OS images to include.
    #[arg(long, value_name = "DIR")]
    images: PathBuf,
    /// OS image to include (repeat; default: every OS image in --images).
    #[arg(long = "image", value_name = "NAME")]
    image_names: Vec<String>,
    /// Version the system reports.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    version: String,
    /// A stork.toml to put on the configuration partition (else the appliance starts in its
    /// safe state until one is written there).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Size of each of the two system partitions.
    #[arg(long, default_value_t = stork_image::appliance::SYSTEM_MIB)]
    system_mib: u64,
    /// Rebuild the root tree with the mirror's newest packages.
    #[arg(long)]
    refresh: bool,
}

#[derive(Args)]
struct BuildArgs {
    /// Cache directory: debootstrap and apt downloads, root trees.
    #[arg(long, value_name = "DIR")]
    cache: PathBuf,
    /// Output directory; manifest.json there lists every image built into it.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Rebuild even if OUT has the image from the same inputs.
    #[arg(long)]
    force: bool,
    /// Rebuild the root tree with the mirror's newest packages (implies --force).
    #[arg(long)]
    refresh: bool,
}

#[derive(Args)]
struct EphemeralArgs {
    #[command(flatten)]
    build: BuildArgs,
}

#[derive(Args)]
struct OsArgs {
    /// Recipe file (TOML), e.g. image-builder/recipes/debian-bookworm.toml.
    #[arg(long, value_name = "FILE")]
    recipe: PathBuf,
    #[command(flatten)]
    build: BuildArgs,
}

#[derive(Args)]
struct RootfsArgs {
    #[arg(long, value_name = "DIR")]
    cache: PathBuf,
    /// The ephemeral image's tree.
    #[arg(long, conflicts_with = "recipe", required_unless_present = "recipe")]
    ephemeral: bool,
    /// The tree of this recipe's OS image.
    #[arg(long, value_name = "FILE")]
    recipe: Option<PathBuf>,
}

#[derive(Args)]
struct SquashfsArgs {
    /// Directory to pack.
    #[arg(long, value_name = "DIR")]
    source: PathBuf,
    /// SquashFS file to write.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// zstd level.
    #[arg(long, default_value_t = squashfs::DEFAULT_LEVEL)]
    level: u32,
    /// File system time; later file times are clamped to it.
    #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 0, value_parser = parse_epoch64)]
    source_date_epoch: u64,
}

#[derive(Args)]
struct KernelArgs {
    /// Cache directory: .debs go to CACHE/debs, the unpacked kernel to CACHE/kernel/<package>.
    #[arg(long, value_name = "DIR")]
    cache: PathBuf,
    /// Kernel package or metapackage to fetch.
    #[arg(long, default_value = kernel::DEFAULT_PACKAGE)]
    package: String,
    /// Another suite of the host's release to fetch it from (`bookworm-backports`).
    #[arg(long)]
    suite: Option<String>,
}

#[derive(Args)]
struct LoadersArgs {
    /// Cache directory: the .debs go to CACHE/debs.
    #[arg(long, value_name = "DIR")]
    cache: PathBuf,
    /// Where the loaders go (the boot files).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
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
    /// Another suite of the host's release to fetch it from (`bookworm-backports`).
    #[arg(long, requires = "cache")]
    suite: Option<String>,
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

/// Seconds since 1970 (64-bit); an empty value means 0.
fn parse_epoch64(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(0);
    }
    s.parse().map_err(|e| format!("{e} (seconds since 1970)"))
}

/// Prints an image's artifacts (stderr) and the output directory (stdout).
fn report(entry: &ImageEntry, out: &Path) {
    for a in &entry.artifacts {
        eprintln!(
            "stork-image: {} {} bytes ({:.1} MiB) sha256 {}",
            a.name,
            a.size,
            a.size as f64 / 1_048_576.0,
            a.sha256
        );
    }
    println!("{}", out.display());
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
            let dir = kernel::fetch(&args.cache, &args.package, args.suite.as_deref())
                .with_context(|| format!("fetching kernel package {}", args.package))?;
            println!("{}", dir.display());
        }
        Cmd::Loaders(args) => {
            stork_image::loaders::fetch(&args.cache, &args.out)
                .context("fetching the signed boot loaders")?;
            println!("{}", args.out.display());
        }
        Cmd::Initrd(args) => {
            let started = Instant::now();
            let kernel_dir = match (args.kernel_dir, args.cache) {
                (Some(dir), _) => dir,
                (None, Some(cache)) => kernel::fetch(&cache, &args.package, args.suite.as_deref())
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
        Cmd::Ephemeral(args) => {
            let b = args.build;
            let entry = ephemeral::build(&ephemeral::Request {
                cache: &b.cache,
                out: &b.out,
                force: b.force || b.refresh,
                refresh: b.refresh,
            })
            .context("building the ephemeral image")?;
            report(&entry, &b.out);
        }
        Cmd::Os(args) => {
            let recipe = Recipe::load(&args.recipe)?;
            let b = args.build;
            let entry = os::build(&os::Request {
                recipe: &recipe,
                cache: &b.cache,
                out: &b.out,
                force: b.force || b.refresh,
                refresh: b.refresh,
            })
            .with_context(|| format!("building OS image {}", recipe.name))?;
            report(&entry, &b.out);
        }
        Cmd::Rootfs(args) => {
            let tree = match &args.recipe {
                Some(path) => {
                    let recipe = Recipe::load(path)?;
                    os::tree(&recipe, &args.cache, false, &Progress::new(&recipe.name))
                }
                None => ephemeral::tree(&args.cache, false, &Progress::new(ephemeral::NAME)),
            }
            .context("preparing the root tree")?;
            println!("{}", tree.path.display());
        }
        Cmd::Appliance(a) => {
            let built = stork_image::appliance::build(&stork_image::appliance::Request {
                cache: &a.cache,
                out: &a.out,
                stork: &a.stork,
                boot: &a.boot,
                images: &a.images,
                image_names: &a.image_names,
                version: &a.version,
                config: a.config.as_deref(),
                system_mib: a.system_mib,
                refresh: a.refresh,
            })
            .context("building the appliance image")?;
            println!("{}", built.path.display());
        }
        Cmd::Upgrade { disk, image } => {
            let done =
                stork_image::appliance::upgrade::upgrade(&disk, &image).with_context(|| {
                    format!("upgrading {} from {}", disk.display(), image.display())
                })?;
            eprintln!(
                "stork-image: system written to slot {} ({} bytes, sha256 {}, read back); the \
                 next boot tries it once, slot {} stays the fallback until Stork runs on it",
                done.slot, done.bytes, done.sha256, done.committed
            );
            println!("{}", serde_json::to_string(&done).unwrap_or_default());
        }
        Cmd::Squashfs(args) => {
            let w = squashfs::write(
                &args.source,
                &args.out,
                &squashfs::Options {
                    level: args.level,
                    source_date_epoch: args.source_date_epoch,
                },
            )
            .with_context(|| format!("writing {}", args.out.display()))?;
            eprintln!(
                "stork-image: {} {} bytes sha256 {} in {:.2} s",
                args.out.display(),
                w.size,
                w.sha256,
                w.seconds
            );
            // Machine-readable for the benchmark.
            println!(
                "{}",
                serde_json::json!({"size": w.size, "sha256": w.sha256, "seconds": w.seconds})
            );
        }
        Cmd::Write(args) => write_image(&args)?,
        Cmd::DropMapRange {
            images,
            name,
            range,
            out,
        } => {
            let map = stork_image::blockmap::copy_with_range_dropped(&images, &name, range, &out)
                .with_context(|| format!("dropping range {range} of {name}'s block map"))?;
            eprintln!(
                "stork-image: {}: {name} with {} ranges in its map (range {range} dropped)",
                out.display(),
                map.ranges.len()
            );
        }
    }
    Ok(())
}

/// `stork-image write`: check, confirm, write, verify.
fn write_image(args: &WriteArgs) -> Result<()> {
    let (image, device) = (args.image.display(), args.device.display());
    let host = write::Host::current()?;
    let req = write::Request {
        image: &args.image,
        device: &args.device,
        allow_file: args.allow_file,
    };
    let plan = write::plan(&req, &host)
        .with_context(|| format!("refusing to write {image} to {device}"))?;
    let mut stderr = std::io::stderr();
    eprint!("{}", plan.summary());
    if plan.image.measured {
        eprintln!("stork-image: (the zstd header has no size: it was measured by decompressing)");
    }
    let stdin = std::io::stdin();
    write::confirm(
        &plan,
        args.yes,
        stdin.is_terminal(),
        &mut stdin.lock(),
        &mut stderr,
    )
    .with_context(|| format!("refusing to write {image} to {device}"))?;
    let terminal = stderr.is_terminal();
    let w = write::execute(&plan, &host, &mut stderr, terminal)
        .with_context(|| format!("writing {image} to {device}"))?;
    if !w.direct && plan.target.block {
        eprintln!("stork-image: (O_DIRECT was refused: written through the page cache)");
    }
    eprintln!("stork-image: sha256 written   {}", w.sha256_written);
    eprintln!("stork-image: sha256 read back {}", w.sha256_read);
    eprintln!(
        "stork-image: wrote and verified {} bytes on {device} in {:.1} s",
        w.bytes, w.seconds
    );
    if let Some(why) = &w.reread {
        eprintln!(
            "stork-image: the kernel did not re-read the partition table ({why}); replug the disk to see the new partitions"
        );
    }
    // Machine-readable, as `squashfs` prints it.
    println!(
        "{}",
        serde_json::json!({
            "device": args.device,
            "size": w.bytes,
            "sha256": w.sha256_written,
            "seconds": w.seconds,
        })
    );
    Ok(())
}
