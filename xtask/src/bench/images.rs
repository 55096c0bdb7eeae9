//! `cargo xtask bench images`: SquashFS of the same trees written Stork's way
//! (`stork-image squashfs`: mksquashfs with zstd-15, 1 MiB blocks, times clamped to
//! SOURCE_DATE_EPOCH, then hashed and renamed into place) and by plain `mksquashfs` at the same
//! compression (zstd level 15; its default 128 KiB blocks, and 1 MiB blocks to separate the
//! block size from the rest), in one run: time and size ratios. Then the initrd's build time.
//!
//! Trees: the ephemeral image's (small) and the Debian OS image's (large), from the cache
//! (built first if missing, which needs root). Medians of `STORK_BENCH_RUNS` runs (default 3;
//! the large tree once unless set). Numbers are printed, never asserted.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

const LEVEL: &str = "15";
/// A fixed epoch for both writers: the comparison is about the writer, not the tree's date.
const EPOCH: &str = "1700000000";

/// Makes the command of one writer.
type Maker<'a> = Box<dyn Fn() -> Command + 'a>;

struct Row<'a> {
    name: &'a str,
    seconds: f64,
    size: u64,
}

fn runs(default: usize) -> usize {
    std::env::var("STORK_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Wall time of `cmd` (which must succeed) and the size of `out` afterwards.
fn time(cmd: &mut Command, out: &Path) -> Result<(f64, u64)> {
    let _ = std::fs::remove_file(out);
    let t = Instant::now();
    let o = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let secs = t.elapsed().as_secs_f64();
    if !o.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok((secs, std::fs::metadata(out)?.len()))
}

fn plain(tree: &Path, out: &Path, block: Option<&str>) -> Command {
    let mut c = Command::new("mksquashfs");
    c.arg(tree)
        .arg(out)
        .args(["-noappend", "-quiet", "-no-progress", "-comp", "zstd"])
        .args(["-Xcompression-level", LEVEL]);
    if let Some(b) = block {
        c.args(["-b", b]);
    }
    c
}

fn bench_tree(label: &str, tree: &Path, bin: &Path, scratch: &Path, n: usize) -> Result<()> {
    let out = scratch.join("bench.sqfs");
    let stork = || {
        let mut c = Command::new(bin);
        c.args(["squashfs", "--level", LEVEL, "--source"])
            .arg(tree)
            .arg("--out")
            .arg(&out)
            .env("SOURCE_DATE_EPOCH", EPOCH);
        c
    };
    let writers: [(&str, Maker); 3] = [
        ("Stork (stork-image squashfs)", Box::new(stork)),
        (
            "mksquashfs, default blocks",
            Box::new(|| plain(tree, &out, None)),
        ),
        (
            "mksquashfs -b 1M",
            Box::new(|| plain(tree, &out, Some("1M"))),
        ),
    ];
    // Rounds of one run per writer, so a change in the machine's load hits all of them alike.
    let mut times = vec![Vec::new(); writers.len()];
    let mut sizes = vec![0u64; writers.len()];
    for _ in 0..n {
        for (i, (_, make)) in writers.iter().enumerate() {
            let (s, z) = time(&mut make(), &out)?;
            times[i].push(s);
            sizes[i] = z;
        }
    }
    let _ = std::fs::remove_file(&out);
    let rows: Vec<Row> = writers
        .iter()
        .zip(times)
        .zip(sizes)
        .map(|(((name, _), t), size)| Row {
            name,
            seconds: median(t),
            size,
        })
        .collect();

    println!("\n{label}: {} ({n} run(s), median)", tree.display());
    println!(
        "  {:<32} {:>9} {:>12} {:>10} {:>10}",
        "writer (zstd-15)", "time s", "bytes", "time/plain", "size/plain"
    );
    let base = &rows[1];
    for r in &rows {
        println!(
            "  {:<32} {:>9.2} {:>12} {:>10.2} {:>10.3}",
            r.name,
            r.seconds,
            r.size,
            r.seconds / base.seconds,
            r.size as f64 / base.size as f64
        );
    }
    Ok(())
}

pub fn run() -> Result<()> {
    crate::deps::ensure()?;
    crate::step("building stork-image");
    crate::status(crate::cargo().args(["build", "--quiet", "-p", "stork-image"]))?;
    let bin = crate::target().join("debug/stork-image");
    // The images and their trees, from the cache when nothing changed (building needs root).
    crate::os_images::build(&crate::target())?;
    let small = crate::os_images::tree(None)?;
    let big = crate::os_images::tree(crate::os_images::RECIPES.first().copied())?;
    let scratch = crate::target().join("stork/bench-images");
    std::fs::create_dir_all(&scratch)?;

    let n = runs(3);
    let big_runs = std::env::var("STORK_BENCH_RUNS").map_or(1, |_| n);
    crate::step("SquashFS: Stork's writer against plain mksquashfs, same trees, same level");
    bench_tree("ephemeral tree", &small, &bin, &scratch, n)?;
    bench_tree("Debian OS tree", &big, &bin, &scratch, big_runs)?;

    crate::step("initrd build time (agent and kernel already built and cached)");
    let boot = crate::images()?;
    let agent = crate::target()
        .join(crate::AGENT_TARGET)
        .join("release/stork-agent");
    let out: PathBuf = scratch.join("initrd");
    let mut times = Vec::new();
    for _ in 0..n {
        let mut c = Command::new(&bin);
        c.args(["initrd", "--cache"])
            .arg(crate::cache())
            .arg("--agent")
            .arg(&agent)
            .arg("--out")
            .arg(&out);
        times.push(time(&mut c, &out.join("initrd.img"))?.0);
    }
    let size = std::fs::metadata(out.join("initrd.img"))?.len();
    println!(
        "\ninitrd: {:.2} s ({n} run(s), median), {size} bytes (the set in {} is the xtask's)",
        median(times),
        boot.display()
    );
    appliance(&bin, &boot, &scratch)
}

/// Bytes under `path` as `du` counts them (allocated, hard links once).
fn du(path: &Path) -> Result<u64> {
    let o = Command::new("du").args(["-s", "-B1"]).arg(path).output()?;
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("du printed no size")
}

/// The appliance image against the sum of its parts: its build time (root tree cached) beside
/// the time to copy those parts once (`cp -a`, the floor of writing them anywhere), and its
/// allocated size beside theirs.
fn appliance(bin: &Path, boot: &Path, scratch: &Path) -> Result<()> {
    crate::step("appliance image: build time and size against its parts");
    let os = crate::os_images::build(&crate::target())?;
    // The image from the xtask first: it builds `stork` (release) and the cached tree.
    let profile = crate::appliance::Profile::Release;
    let built = crate::appliance::build(&crate::target(), boot, &os, None, profile)?;
    let stork = crate::target().join(crate::appliance::STORK);
    let out = scratch.join("appliance.raw");
    let mut c = Command::new(bin);
    c.env("RUST_BACKTRACE", "0")
        .args(["appliance", "--cache"])
        .arg(crate::cache())
        .arg("--stork")
        .arg(&stork)
        .arg("--boot")
        .arg(boot)
        .arg("--images")
        .arg(&os)
        .arg("--out")
        .arg(&out);
    let (seconds, logical) = time(&mut c, &out)?;
    let allocated = du(&out)?;
    let tree = std::fs::read_dir(crate::cache().join("rootfs"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("appliance-"))
        })
        .context("no appliance tree in the cache")?;
    let parts = [tree.clone(), stork.clone(), boot.to_path_buf(), os.clone()];
    let mut parts_bytes = 0;
    for p in &parts {
        parts_bytes += du(p)?;
    }
    let copy = scratch.join("parts");
    let _ = std::fs::remove_dir_all(&copy);
    std::fs::create_dir_all(&copy)?;
    let t = Instant::now();
    for p in &parts {
        crate::status(Command::new("cp").arg("-a").arg(p).arg(&copy))?;
    }
    let copy_seconds = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&copy);
    let _ = std::fs::remove_file(&out);
    println!(
        "\nappliance image ({}):\n  {:<34} {:>9} {:>14}\n  {:<34} {:>9.1} {:>14}\n  {:<34} {:>9.1} {:>14}\n  ratio {:.2}x the time, {:.2}x the bytes; the image's logical size is {logical} bytes (sparse)",
        built.display(),
        "",
        "time s",
        "bytes",
        "stork-image appliance (tree cached)",
        seconds,
        allocated,
        "cp -a of its parts (floor)",
        copy_seconds,
        parts_bytes,
        seconds / copy_seconds,
        allocated as f64 / parts_bytes as f64,
    );
    Ok(())
}
