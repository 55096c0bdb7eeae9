//! The stable-toolchain fuzzer shared by `fuzz.rs` (DHCP, TFTP, the lease journal, the
//! agent's command line) and `fuzz_bmc.rs` (IPMI, Redfish): a seeded xorshift mutator, the
//! corpus in `appliance/fuzz/corpus/<kind>/` and the regressions in
//! `appliance/fuzz/regressions/<kind>/` (run first), a time budget (`STORK_FUZZ_SECS`,
//! default 10 per target; `STORK_FUZZ_SEED` replays a run), and a failing input kept in
//! `target/fuzz-crashes/` and shown in hex.
// Each test crate uses its own part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// xorshift64*: small, seedable, and good enough to pick mutations.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    pub fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// Values that break parsers: the ends of each range and lengths around the limits.
pub const INTERESTING: &[u8] = &[0, 1, 2, 6, 7, 16, 17, 53, 127, 128, 200, 254, 255];

pub fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut p = seeds[rng.below(seeds.len())].clone();
    for _ in 0..=rng.below(4) {
        let len = p.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                p[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                p[i] = rng.byte();
            }
            2 if len > 0 => {
                let i = rng.below(len);
                p[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            // The first four bytes: DHCP's op, htype, hlen and hops; the RMCP header.
            3 if len > 3 => p[rng.below(4)] = INTERESTING[rng.below(INTERESTING.len())],
            4 => p.truncate(rng.below(len + 1)),
            5 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
                p.splice(at..at, bytes);
            }
            6 if len > 1 => {
                let a = rng.below(len);
                let b = (a + rng.below(64)).min(len);
                p.drain(a..b);
            }
            // An option (or TFTP field) with a length that may run past the end.
            7 => {
                let code = rng.byte();
                let n = INTERESTING[rng.below(INTERESTING.len())];
                p.extend([code, n]);
                p.extend((0..rng.below(usize::from(n) + 2)).map(|_| rng.byte()));
            }
            _ => {
                let other = &seeds[rng.below(seeds.len())];
                let at = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                p.truncate(at);
                p.extend_from_slice(&other[from..]);
            }
        }
    }
    p.truncate(2048);
    p
}

pub fn read_dir(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "bin"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

pub fn fuzz_dir(kind: &str, what: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(what)
        .join(kind)
}

/// Holds the corpus in `appliance/fuzz/corpus/<kind>/` to what the code generates: fails
/// naming a missing or stale file and the `test` that rewrites it, which
/// `STORK_FUZZ_WRITE_CORPUS=1` makes it do.
pub fn check_corpus(kind: &str, test: &str, seeds: Vec<(String, Vec<u8>)>) {
    let write = std::env::var_os("STORK_FUZZ_WRITE_CORPUS").is_some();
    let dir = fuzz_dir(kind, "corpus");
    for (name, bytes) in seeds {
        let file = dir.join(&name);
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&file, &bytes).unwrap();
        } else {
            assert!(
                std::fs::read(&file).ok() == Some(bytes),
                "{} is missing or stale: run STORK_FUZZ_WRITE_CORPUS=1 cargo test -p stork \
                 --test {test}",
                file.display()
            );
        }
    }
}

pub fn budget() -> Duration {
    let secs = std::env::var("STORK_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    Duration::from_secs(secs)
}

pub fn seed() -> u64 {
    std::env::var("STORK_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        })
}

/// Fails with the input, kept under `target/fuzz-crashes/` for the regression directory.
pub fn crash(kind: &str, input: &[u8], why: &str, seed: u64) -> ! {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-crashes");
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(format!("{kind}-{seed}.bin"));
    let _ = std::fs::write(&file, input);
    panic!(
        "{kind} fuzz: {why} (seed {seed}); input kept in {} (copy it to appliance/fuzz/regressions/{kind}/): {}",
        file.display(),
        hex::encode(input)
    );
}

/// Runs `one` on the regressions, the corpus, then mutations until the budget is spent.
pub fn drive(kind: &str, one: impl FnMut(&[u8]) -> Result<(), String>) -> u64 {
    drive_with(kind, mutate, one)
}

/// [`drive`] with a mutator of the target's own (one that knows its format).
pub fn drive_with(
    kind: &str,
    mut mutator: impl FnMut(&mut Rng, &[Vec<u8>]) -> Vec<u8>,
    mut one: impl FnMut(&[u8]) -> Result<(), String>,
) -> u64 {
    let seed = seed();
    let regressions = read_dir(&fuzz_dir(kind, "regressions"));
    let corpus = read_dir(&fuzz_dir(kind, "corpus"));
    assert!(!corpus.is_empty(), "no {kind} corpus");
    for (name, input) in regressions.iter().chain(&corpus) {
        if let Err(why) = one(input) {
            crash(kind, input, &format!("{name}: {why}"), seed);
        }
    }
    let seeds: Vec<Vec<u8>> = corpus.into_iter().map(|(_, b)| b).collect();
    let mut rng = Rng(seed);
    let start = Instant::now();
    let mut n = 0u64;
    // Count-bounded too, so a fast machine does not spin for nothing.
    while start.elapsed() < budget() && n < 2_000_000 {
        let input = mutator(&mut rng, &seeds);
        if let Err(why) = one(&input) {
            crash(kind, &input, &why, seed);
        }
        n += 1;
    }
    eprintln!(
        "{kind} fuzz: {n} mutated inputs in {:.1} s, seed {seed}",
        start.elapsed().as_secs_f64()
    );
    n
}

/// Runs `f`, turning a panic into an error that carries its message (the panic hook has
/// already printed where it happened). For targets whose code has no panic catcher of
/// its own to count with.
pub fn caught<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|p| format!("panicked: {}", stork::supervise::panic_message(&*p)))
}
