//! Fuzzing on the stable toolchain, in `cargo xtask test`: raw datagrams through exactly the
//! code the DHCP and TFTP socket loops run (`dhcp::Server::on_batch`: edge checks,
//! handler, journal records, reply encoding, in full and proxy mode, on ports 67 and 4011;
//! `tftp::server::classify`, then the root's confinement, the negotiation and the transfer
//! state machine fed with hostile client packets); and the lease journal's bytes
//! (`dhcp::journal::Record::decode`, then a whole file through `journal::load` and
//! `Journal::open`); and the agent's kernel command line (`cmdline::AgentArgs::parse`),
//! seeded with the lines the boot script writes (`cmdline_corpus_is_current` keeps them
//! current), with word-level mutations beside the byte ones: what parses keeps the parser's
//! promises (one printable word per value) and renders to a line that parses back the same;
//! and DHCPv6 datagrams through `dhcp6::Handler::handle` (its edge checks, the handler, the
//! reply's encoding, the lease changes' line format) and the lease file's replay.
//!
//! Inputs: the corpus in `appliance/fuzz/corpus/`, every crash ever found in
//! `appliance/fuzz/regressions/` (run first, each a regression test), then mutations of them
//! from a seeded generator for a bounded time (`STORK_FUZZ_SECS`, default 10 per target;
//! `STORK_FUZZ_SEED` replays a run). A caught panic is still a bug: the input is written to
//! `target/fuzz-crashes/` and the test fails with it in hex. libFuzzer targets over the same
//! functions live in `appliance/fuzz/` for longer runs on nightly.
// Test helpers: a failure is a test failure, so they unwrap.
#![allow(clippy::unwrap_used)]

mod fuzz_common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use dhcproto::v4::{Decodable, Decoder, Message};
use stork::config::FileConfig;
use stork::dhcp::handler::{Handler, ServerInfo};
use stork::dhcp::journal::{
    Journal, JournalError, LiveSet, MAGIC, RECORD_LEN, Record, load, record, unix_secs,
};
use stork::dhcp::{Batch, Port, Server, Stats};
use stork::tftp::options::MAX_CLIENT_TIMEOUT_SECS;
use stork::tftp::packet::Repr;
use stork::tftp::request::netascii;
use stork::tftp::server::{Listen, classify_caught, plan};
use stork::tftp::transfer::Transfer;
use stork::tftp::{TftpConfig, fs::Root};
use stork_proto::cmdline::{self, AgentArgs, CmdlineError};

use fuzz_common::{Rng, caught, drive, drive_with, fuzz_dir, mutate, read_dir, seed};

fn info(text: &str) -> ServerInfo {
    let cfg = FileConfig::parse(text, Path::new("fuzz"))
        .and_then(|f| f.validate())
        .expect("fuzz config is valid");
    ServerInfo::new(&cfg)
}

/// Full mode with a relay subnet, reservations, exclusions and a rate limit; proxy mode.
fn dhcp_configs() -> [ServerInfo; 2] {
    [
        info(include_str!("../fuzz/dhcp-full.toml")),
        info("[dhcp]\nmode = \"proxy\"\n"),
    ]
}

#[test]
fn dhcp_datagrams_from_raw_bytes() {
    let stats = Arc::new(Stats::default());
    let mut servers: Vec<Server> = dhcp_configs()
        .into_iter()
        .map(|i| Server::new(Handler::new(i), stats.clone()))
        .collect();
    let mut clock = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let peers = [
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68)),
        SocketAddr::from((Ipv4Addr::new(10, 78, 0, 1), 67)),
        SocketAddr::from((Ipv4Addr::new(10, 77, 0, 60), 68)),
    ];
    let mut i = 0usize;
    let n = drive("dhcp", |input| {
        i += 1;
        clock += Duration::from_millis(700);
        let peer = peers[i % peers.len()];
        for server in &mut servers {
            for port in [Port::Dhcp, Port::Pxe] {
                let panics = stats.panics.load(Ordering::Relaxed);
                // As the socket loop does: a received batch (here of one) into a `Batch`.
                let mut batch = Batch::default();
                server.on_batch([(input, peer)], port, clock, &mut batch);
                if stats.panics.load(Ordering::Relaxed) != panics {
                    return Err(format!("handling panicked on {port:?}"));
                }
                let commit = batch.take_commit().unwrap_or_default();
                for s in batch.immediate.iter().chain(&commit.replies) {
                    Message::decode(&mut Decoder::new(&s.bytes))
                        .map_err(|e| format!("our reply does not decode: {e}"))?;
                }
                for r in &commit.records {
                    if Record::decode(&r.encode()) != Some(*r) {
                        return Err(format!("journal record does not round-trip: {r:?}"));
                    }
                }
            }
        }
        Ok(())
    });
    let s = stats.snapshot();
    // The run reached the handler and the drop reasons both, not only one side.
    assert!(s.discover > 0 && s.replied + s.ignored > 0, "{s:?}");
    assert!(
        s.drop_hardware > 0 && s.drop_options > 0 && s.drop_truncated > 0,
        "{s:?}"
    );
    assert!(n > 0);
}

#[test]
fn tftp_datagrams_from_raw_bytes() {
    let root_dir = tempfile::tempdir().unwrap();
    std::fs::write(root_dir.path().join("snponly.efi"), vec![7u8; 5000]).unwrap();
    std::fs::write(root_dir.path().join("undionly.kpxe"), b"kpxe").unwrap();
    std::fs::create_dir(root_dir.path().join("dir")).unwrap();
    std::fs::write(root_dir.path().join("dir/file.txt"), b"a\nb\r\n").unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"secret").unwrap();
    let _ = std::os::unix::fs::symlink(outside.path(), root_dir.path().join("escape"));
    let root = Root::new(root_dir.path(), true).unwrap();
    let canonical = root.path().to_path_buf();
    let cfg = TftpConfig::default();
    let stats = stork::tftp::Stats::default();
    let peer = SocketAddr::from((IpAddr::V4(Ipv4Addr::new(10, 77, 0, 100)), 2000));
    let mut rng = Rng(seed());
    let n = drive("tftp", |input| {
        let panics = stats.panics.load(Ordering::Relaxed);
        let listen = classify_caught(input, peer, &stats);
        if stats.panics.load(Ordering::Relaxed) != panics {
            return Err("classify panicked".into());
        }
        let Listen::Start(req) = listen else {
            return Ok(());
        };
        // The request layer's promise: a relative path without `.`, `..` or empty parts.
        if req
            .path
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(format!("request path not normalised: {:?}", req.path));
        }
        let size = match root.open(&req.path) {
            Ok(o) => {
                if !o.path.starts_with(&canonical) {
                    return Err(format!("served outside the root: {}", o.path.display()));
                }
                o.len
            }
            Err(_) => 4096,
        };
        let p = plan(&req, size, &cfg);
        if !(8..=cfg.max_block).contains(&p.params.block_size)
            || !(1..=cfg.max_window).contains(&p.params.window)
        {
            return Err(format!("negotiated out of bounds: {:?}", p.params));
        }
        // A client's `timeout` is acknowledged only up to the cap, and never moves the end
        // of the server's retry budget.
        let cap = Duration::from_secs(u64::from(MAX_CLIENT_TIMEOUT_SECS));
        if p.neg.timeout.is_some_and(|t| t > cap) || p.params.timing.budget != cfg.retry_budget() {
            return Err(format!("client timeout not bounded: {:?}", p.params.timing));
        }
        // The transfer's state machine on what a hostile client sends back: the input
        // itself, then ACKs and ERRORs around the window, with timeouts between.
        let mut t = Transfer::new(p.params, Instant::now());
        let start = Instant::now();
        for step in 0..32u64 {
            while t.poll_transmit().is_some() {}
            let now = start + Duration::from_millis(step * 300);
            let packet = match rng.below(4) {
                0 => input.to_vec(),
                1 => {
                    let b = rng.next() as u16;
                    [0, 4, (b >> 8) as u8, b as u8].to_vec()
                }
                2 => [0, 4, 0, step as u8].to_vec(),
                _ => [0, 5, 0, rng.byte(), 0].to_vec(),
            };
            if let Ok(repr) = Repr::parse_bytes(&packet) {
                t.on_packet(&repr, now);
            } else {
                t.on_timeout(now);
            }
        }
        // The input as a file sent in netascii, streamed in odd blocks and raw chunks.
        let want = netascii::encode(input);
        let mut enc = netascii::Encoder::new(input.len() as u64);
        let block = 1 + rng.below(600);
        let chunk = 1 + rng.below(300);
        let mut offset = 0;
        while offset <= want.len() {
            let len = block.min(want.len() - offset);
            enc.release_before(offset as u64);
            while let Some((at, n)) = enc.wants(offset as u64, len, chunk) {
                let at = usize::try_from(at).unwrap();
                enc.feed(
                    input
                        .get(at..at + n)
                        .ok_or("netascii asked past the file")?,
                );
            }
            if enc.get(offset as u64, len) != want.get(offset..offset + len) {
                return Err(format!("netascii differs at {offset}"));
            }
            offset += block;
        }
        Ok(())
    });
    assert!(n > 0);
    assert!(stats.requests.load(Ordering::Relaxed) > 0);
}

/// Gives some of the records a right CRC again, so mutations reach what decoding checks
/// behind it (the kind, the fields a kind leaves zero) and the live set sees odd records;
/// sometimes shifts them off the 24-byte grid first, so loading must resynchronise.
fn mutate_journal(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut p = mutate(rng, seeds);
    if rng.below(4) == 0 && p.len() > MAGIC.len() {
        // Bytes lost or inserted inside the body.
        let at = MAGIC.len() + rng.below(p.len() - MAGIC.len());
        if rng.below(2) == 0 {
            let n = (1 + rng.below(RECORD_LEN)).min(p.len() - at);
            p.drain(at..at + n);
        } else {
            let n = 1 + rng.below(RECORD_LEN);
            let bytes: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
            p.splice(at..at, bytes);
        }
    }
    if rng.below(2) == 0 {
        let start = if p.starts_with(MAGIC) { MAGIC.len() } else { 0 };
        for r in p[start..].chunks_exact_mut(RECORD_LEN) {
            if rng.below(4) != 0 {
                let crc = crc32fast::hash(&r[..RECORD_LEN - 4]);
                r[RECORD_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
            }
        }
    }
    p
}

/// Every record in `input` (read from the start, and from after a magic's length) that
/// decodes must re-encode to the same bytes.
fn journal_records(input: &[u8]) -> Result<u64, String> {
    let mut decoded = 0;
    for start in [0, MAGIC.len()] {
        for chunk in input
            .get(start..)
            .unwrap_or_default()
            .chunks_exact(RECORD_LEN)
        {
            let bytes: &[u8; RECORD_LEN] = chunk.try_into().unwrap();
            if let Some(r) = Record::decode(bytes) {
                decoded += 1;
                if &r.encode() != bytes {
                    return Err(format!("{r:?} decoded from other bytes than it encodes to"));
                }
            }
        }
    }
    Ok(decoded)
}

/// `input` as a journal file: every good record is read, in file order, whatever bad bytes
/// lie between (skipped) or after (a torn tail); a file without the magic is refused and, on
/// open, left as it was; an open drops the bad bytes and keeps exactly the live records.
fn journal_file(path: &Path, input: &[u8], open: bool) -> Result<(), String> {
    std::fs::write(path, input).unwrap();
    let foreign = !input.is_empty() && !input.starts_with(MAGIC);
    let loaded = match (load(path), foreign) {
        (Ok(l), false) => l,
        (Err(JournalError::NotAJournal { .. }), true) => {
            if open {
                if !matches!(
                    Journal::open(path, SystemTime::UNIX_EPOCH),
                    Err(JournalError::NotAJournal { .. })
                ) {
                    return Err("a file without the magic was opened".into());
                }
                if std::fs::read(path).unwrap() != input {
                    return Err("a file without the magic was overwritten".into());
                }
            }
            return Ok(());
        }
        (Ok(_), true) => return Err("a file without the magic was loaded".into()),
        (Err(e), _) => return Err(format!("load failed: {e}")),
    };
    let body = input.get(MAGIC.len()..).unwrap_or_default();
    let good = loaded.records.len() * RECORD_LEN;
    if good + loaded.skipped_bytes + loaded.torn_bytes != body.len() {
        return Err(format!(
            "{} records, {} skipped and {} torn bytes from a body of {}",
            loaded.records.len(),
            loaded.skipped_bytes,
            loaded.torn_bytes,
            body.len()
        ));
    }
    if (loaded.skipped_bytes == 0) != (loaded.skipped_runs == 0) {
        return Err(format!(
            "{} bytes skipped in {} runs",
            loaded.skipped_bytes, loaded.skipped_runs
        ));
    }
    // Each record read is in the file, after the previous one, and no good record starts
    // anywhere in the bytes between them: nothing good was skipped.
    let starts_good = |at: usize| {
        body.get(at..at + RECORD_LEN)
            .is_some_and(|b| Record::decode(b.try_into().unwrap()).is_some())
    };
    let mut at = 0;
    for r in &loaded.records {
        let bytes = r.encode();
        let Some(found) = (at..=body.len().saturating_sub(RECORD_LEN))
            .find(|&i| body.get(i..i + RECORD_LEN) == Some(&bytes[..]))
        else {
            return Err(format!("{r:?} is not in the file after offset {at}"));
        };
        if let Some(missed) = (at..found).find(|&i| starts_good(i)) {
            return Err(format!("a good record at {missed} was skipped"));
        }
        at = found + RECORD_LEN;
    }
    if let Some(missed) = (at..body.len()).find(|&i| starts_good(i)) {
        return Err(format!("a good record at {missed} was left in the tail"));
    }
    if body.len() - at != loaded.torn_bytes {
        return Err(format!(
            "{} bytes after the last record, {} torn",
            body.len() - at,
            loaded.torn_bytes
        ));
    }
    if open {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_003_605);
        let (_journal, live) = Journal::open(path, now).map_err(|e| format!("open: {e}"))?;
        if live != LiveSet::from_records(&loaded.records).snapshot(unix_secs(now)) {
            return Err("open kept other records than the live ones".into());
        }
        let after = load(path).map_err(|e| format!("reload: {e}"))?;
        if after.torn_bytes != 0 || after.records != live {
            return Err(format!(
                "after open the file holds {:?} and {} torn bytes, not the live records",
                after.records, after.torn_bytes
            ));
        }
    }
    Ok(())
}

#[test]
fn journal_from_raw_bytes() {
    // In memory where there is a tmpfs: on disk, rewriting a file and `Journal::open`'s
    // fsyncs make each input about a hundred times slower.
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let path = dir.path().join(stork::dhcp::journal::FILE_NAME);
    let (mut i, mut decoded) = (0u64, 0u64);
    let n = drive_with("journal", mutate_journal, |input| {
        i += 1;
        caught(|| {
            decoded += journal_records(input)?;
            // Opening also rewrites the file: the seeds, then every 8th input.
            journal_file(&path, input, i <= 16 || i % 8 == 0)
        })?
    });
    assert!(n > 0);
    // The CRC repair worked: mutated records got past the CRC, not only the corpus.
    assert!(decoded > n / 4, "{decoded} records decoded from {n} inputs");
}

/// The seeds are what `Record::encode` writes: records of each kind, whole journals.
#[test]
fn journal_corpus_is_real_records() {
    let corpus = read_dir(&fuzz_dir("journal", "corpus"));
    let mut kinds = std::collections::HashSet::new();
    for (name, bytes) in &corpus {
        let records = if bytes.starts_with(MAGIC) {
            let l = record::parse(bytes).unwrap();
            assert!(l.records.len() > 2, "{name}");
            assert!(bytes.starts_with(&record::emit(&l.records)), "{name}");
            l.records
        } else {
            let bytes: &[u8; RECORD_LEN] = bytes.as_slice().try_into().unwrap();
            let r = Record::decode(bytes).unwrap_or_else(|| panic!("{name} is not a record"));
            assert_eq!(&r.encode(), bytes, "{name}");
            vec![r]
        };
        kinds.extend(records.iter().map(std::mem::discriminant));
    }
    assert_eq!(kinds.len(), 3, "one of each kind");
}

// ---------------------------------------------------------------------------------------
// The agent's kernel command line
// ---------------------------------------------------------------------------------------

/// The kernel command line of an iPXE script from `agent_script`, as the agent reads it in
/// `/proc/cmdline`: the `kernel` line's arguments with iPXE's settings expanded.
fn kernel_args(script: &str, ip: &str, netmask: &str, gateway: &str) -> String {
    let line = script
        .lines()
        .find_map(|l| l.strip_prefix("kernel "))
        .expect("the script has a kernel line");
    let line = line.strip_suffix(" || goto failed").unwrap_or(line);
    // The first word is the kernel's URL; the rest is its command line.
    let (_, args) = line.split_once(' ').expect("kernel arguments");
    // `/proc/cmdline` ends with a newline.
    args.replace("${netX/ip}", ip)
        .replace("${netX/netmask}", netmask)
        .replace("${netX/gateway}", gateway)
        + "\n"
}

/// Command lines the appliance's boot script really produces: enlisting and known machines,
/// with and without the ephemeral root, a gateway or not, other addresses and masks, and
/// extra kernel arguments from `boot.cmdline`.
fn cmdline_corpus() -> Vec<(String, Vec<u8>)> {
    use stork::http::script::{EphemeralRoot, agent_script};
    let config = |text: &str| {
        FileConfig::parse(text, Path::new("fuzz"))
            .and_then(|f| f.validate())
            .expect("fuzz config is valid")
    };
    let default = config("");
    let other = config(
        "address = \"192.168.40.2\"\n[http]\nport = 80\n[boot]\n\
         kernel = \"vmlinuz-6.12\"\ninitrd = \"initrd-6.12.img\"\n\
         cmdline = \"console=tty0 console=ttyS1,115200n8 nomodeset quiet\"\n\
         [dhcp]\nmode = \"proxy\"\nrange = [\"192.168.40.100\", \"192.168.40.199\"]\n",
    );
    let mac: stork_proto::MacAddr = "52:54:00:12:34:56".parse().unwrap();
    let other_mac: stork_proto::MacAddr = "0c:c4:7a:e2:00:ff".parse().unwrap();
    // Tokens and ids as `auth::generate` and `new_id` make them, fixed so the corpus is.
    let token = format!("{}{}", stork::auth::AGENT_PREFIX, "5a".repeat(32));
    let known = Some(("3f2c9a1b7d4e", token.as_str()));
    let ephemeral = EphemeralRoot {
        file: "ephemeral.squashfs".into(),
        sha256: "7b1b23cd4c12e49a47448b31ea7eed51aef9f776e0faf9b5be6490ceb63d9e78".into(),
    };
    // The API over HTTPS, as `stork serve` names it when TLS is on.
    let api = |cfg: &stork::config::Config| cmdline::ApiTls {
        url: cfg.api_url().replacen("http://", "https://", 1),
        fingerprint: format!("sha256:{}", "c3".repeat(32)),
    };
    let (api_default, api_other) = (api(&default), api(&other));
    // The script's requester: over IPv4 iPXE fills the address in itself.
    let from: std::net::IpAddr = "10.77.0.100".parse().unwrap();
    // A configuration's script, with its agent kernel as `stork serve` finds it with no
    // second one.
    let script = |cfg: &stork::config::Config, mac, known, ephemeral, api| {
        let kernel =
            stork::agent_kernels::AgentKernel::configured(&cfg.boot.kernel, &cfg.boot.initrd);
        agent_script(cfg, mac, from, known, ephemeral, api, &kernel)
    };
    let lines = [
        (
            "enlist",
            script(&default, mac, None, None, None),
            ("10.77.0.100", "255.255.255.0", ""),
        ),
        (
            "known",
            script(&default, mac, known, None, None),
            ("10.77.0.100", "255.255.255.0", ""),
        ),
        (
            "known-ephemeral",
            script(&default, mac, known, Some(&ephemeral), None),
            ("10.77.0.101", "255.255.255.0", "10.77.0.1"),
        ),
        (
            "enlist-ephemeral-gateway",
            script(&default, other_mac, None, Some(&ephemeral), None),
            ("10.77.3.9", "255.255.252.0", "10.77.0.254"),
        ),
        (
            "proxy-extra-args",
            script(&other, other_mac, known, Some(&ephemeral), None),
            ("192.168.40.77", "255.255.0.0", "192.168.40.1"),
        ),
        (
            "proxy-enlist-slash8",
            script(&other, mac, None, None, None),
            ("10.1.2.3", "255.0.0.0", ""),
        ),
        (
            "known-tls",
            script(&default, mac, known, None, Some(&api_default)),
            ("10.77.0.100", "255.255.255.0", ""),
        ),
        (
            "proxy-tls-ephemeral",
            script(&other, other_mac, known, Some(&ephemeral), Some(&api_other)),
            ("192.168.40.78", "255.255.255.0", "192.168.40.1"),
        ),
    ];
    lines
        .into_iter()
        .map(|(name, script, (ip, mask, gw))| {
            (
                format!("{name}.bin"),
                kernel_args(&script, ip, mask, gw).into_bytes(),
            )
        })
        .collect()
}

/// The corpus is the boot script's current output: `cmdline_corpus_is_current` checks it,
/// `STORK_FUZZ_WRITE_CORPUS=1 cargo test -p stork --test fuzz cmdline_corpus_is_current`
/// writes it again after the script changes. Each seed parses.
#[test]
fn cmdline_corpus_is_current() {
    let seeds = cmdline_corpus();
    for (name, bytes) in &seeds {
        let text = std::str::from_utf8(bytes).unwrap();
        AgentArgs::parse(text).unwrap_or_else(|e| panic!("{name}: {e}: {text}"));
    }
    fuzz_common::check_corpus("cmdline", "fuzz cmdline_corpus_is_current", seeds);
}

/// Pieces a command line is made of, for the word-level mutations: the keys, values of the
/// shapes each key takes (and near misses), and separators, ASCII whitespace and not.
const CMDLINE_PIECES: &[&str] = &[
    "stork.url=",
    "stork.ip=",
    "stork.gw=",
    "BOOTIF=",
    "stork.machine=",
    "stork.token=",
    "stork.ephemeral=",
    "stork.ephemeral.sha256=",
    "stork.ephemeral.sha256",
    "stork.api=",
    "stork.tls=",
    "sha256:",
    "http://",
    "https://",
    "http://10.77.0.1:8080/",
    "https://10.77.0.1:8443/",
    "/",
    "//",
    "=",
    "==",
    "01-52-54-00-12-34-56",
    "01-52-54-00-12-34",
    "52:54:00:12:34:56",
    "10.77.0.100/24",
    "10.77.0.100/255.255.255.0",
    "10.77.0.100/255.0.255.0",
    "/33",
    "/0",
    "/255.255.255.255",
    "0.0.0.0",
    "255.255.255.255",
    "1.2.3.4.5",
    "7B1B23CD4C12E49A47448B31EA7EED51AEF9F776E0FAF9B5BE6490CEB63D9E78",
    " ",
    "\t",
    "\n",
    "\r\n",
    "\u{a0}",
    "\u{2003}",
    "\u{85}",
    "\u{0}",
    "\u{7f}",
    "\"",
    "é",
];

/// Byte mutations half the time; otherwise word-level ones on the text: a piece inserted,
/// a word dropped, doubled or moved, a word's value swapped for another's.
fn mutate_cmdline(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    if rng.below(2) == 0 {
        return mutate(rng, seeds);
    }
    let seed = String::from_utf8_lossy(&seeds[rng.below(seeds.len())]).into_owned();
    let mut words: Vec<String> = seed.split(' ').map(String::from).collect();
    for _ in 0..=rng.below(3) {
        let n = words.len();
        match rng.below(6) {
            0 => {
                let piece = CMDLINE_PIECES[rng.below(CMDLINE_PIECES.len())];
                let w = rng.below(n.max(1));
                if let Some(word) = words.get_mut(w) {
                    let mut at = rng.below(word.len() + 1);
                    while !word.is_char_boundary(at) {
                        at -= 1;
                    }
                    word.insert_str(at, piece);
                } else {
                    words.push(piece.into());
                }
            }
            1 if n > 0 => {
                words.remove(rng.below(n));
            }
            2 if n > 0 => {
                let w = words[rng.below(n)].clone();
                words.insert(rng.below(n + 1), w);
            }
            3 if n > 1 => {
                let a = rng.below(n);
                let b = rng.below(n);
                words.swap(a, b);
            }
            4 if n > 1 => {
                // One word's key with another's value.
                let a = words[rng.below(n)].clone();
                let b = words[rng.below(n)].clone();
                if let (Some((k, _)), Some((_, v))) = (a.split_once('='), b.split_once('=')) {
                    words.push(format!("{k}={v}"));
                }
            }
            _ => {
                let piece = CMDLINE_PIECES[rng.below(CMDLINE_PIECES.len())];
                words.insert(rng.below(n + 1), piece.into());
            }
        }
    }
    words.join(" ").into_bytes()
}

/// A value the agent takes from its command line: one word, never empty, never with
/// whitespace or control characters in it (it goes into URLs and request headers).
fn one_word(what: &str, v: &str) -> Result<(), String> {
    if v.is_empty() || v.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err(format!("{what} {v:?} is not one printable word"));
    }
    Ok(())
}

/// What `AgentArgs::parse` promises about what it accepts.
fn check_args(a: &AgentArgs) -> Result<(), String> {
    one_word("url", &a.url)?;
    if !a.url.starts_with("http://") || a.url.ends_with('/') {
        return Err(format!("url {:?}", a.url));
    }
    if a.prefix_len > 32 {
        return Err(format!("prefix /{}", a.prefix_len));
    }
    if a.machine_id.is_some() != a.token.is_some() {
        return Err("a machine id without a token, or the reverse".into());
    }
    for (what, v) in [("machine id", &a.machine_id), ("token", &a.token)] {
        if let Some(v) = v {
            one_word(what, v)?;
        }
    }
    if let Some(e) = &a.ephemeral {
        one_word("ephemeral url", &e.url)?;
        if !e.url.starts_with("http://") {
            return Err(format!("ephemeral url {:?}", e.url));
        }
        if e.sha256.len() != 64
            || !e
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!("sha256 {:?}", e.sha256));
        }
    }
    if let Some(api) = &a.api {
        one_word("api url", &api.url)?;
        if !api.url.starts_with("https://") || api.url.ends_with('/') {
            return Err(format!("api url {:?}", api.url));
        }
        let hex = api.fingerprint.strip_prefix("sha256:").unwrap_or_default();
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!("fingerprint {:?}", api.fingerprint));
        }
    }
    Ok(())
}

/// One input through the parser: no panic; what it accepts keeps its promises, renders to
/// a line that parses back to the same, and is not changed by the line it came from put in
/// front of that rendering (the last occurrence of a key wins, as in the kernel); what it
/// refuses names a key that is absent, empty or invalid there.
fn cmdline_one(text: &str) -> Result<bool, String> {
    let parsed = caught(|| AgentArgs::parse(text))?;
    match parsed {
        Ok(a) => {
            check_args(&a)?;
            let rendered = a.render();
            let words = rendered.split_ascii_whitespace().count();
            let want = 3
                + usize::from(a.gateway.is_some())
                + 2 * usize::from(a.token.is_some())
                + 2 * usize::from(a.ephemeral.is_some())
                + 2 * usize::from(a.api.is_some());
            if words != want || rendered.split(' ').count() != want {
                return Err(format!("rendered as {words} words: {rendered:?}"));
            }
            let again = AgentArgs::parse(&rendered)
                .map_err(|e| format!("its rendering {rendered:?} does not parse: {e}"))?;
            if again != a {
                return Err(format!("{a:?} rendered and parsed is {again:?}"));
            }
            let behind = AgentArgs::parse(&format!("{text} {rendered}"))
                .map_err(|e| format!("the line then its rendering does not parse: {e}"))?;
            if behind != a {
                return Err(format!("the line then its rendering parses as {behind:?}"));
            }
            Ok(true)
        }
        Err(e) => {
            let shown = caught(|| e.to_string())?;
            match &e {
                CmdlineError::Missing(key) => {
                    if cmdline::get(text, key).is_some_and(|v| !v.is_empty()) {
                        return Err(format!("{shown}, but the line has {key}"));
                    }
                }
                CmdlineError::Invalid { key, .. } => {
                    if cmdline::get(text, key).is_none() {
                        return Err(format!("{shown}, but the line has no {key}"));
                    }
                }
            }
            Ok(false)
        }
    }
}

#[test]
fn cmdline_from_raw_bytes() {
    let (mut accepted, mut refused) = (0u64, 0u64);
    let n = drive_with("cmdline", mutate_cmdline, |input| {
        // `/proc/cmdline` as the agent reads it: text (bytes that are not UTF-8 fail that
        // read before the parser), so the bytes go in as the lossy text.
        let text = String::from_utf8_lossy(input);
        if cmdline_one(&text)? {
            accepted += 1;
        } else {
            refused += 1;
        }
        Ok(())
    });
    assert!(n > 0);
    // Mutations reached both sides, not only refusals.
    assert!(
        accepted > n / 50 && refused > n / 50,
        "{accepted} accepted, {refused} refused of {n}"
    );
}

// ---- DHCPv6 ----

fn dhcp6_handler(mode: stork::dhcp6::Mode) -> stork::dhcp6::Handler {
    use stork::dhcp6::{Dhcp6Config, Handler, ServerInfo, handler::duid_ll};
    Handler::new(ServerInfo {
        cfg: Dhcp6Config {
            mode,
            address: "fd77::1".parse().unwrap(),
            prefix_len: 64,
            range: ("fd77::100".parse().unwrap(), "fd77::1ff".parse().unwrap()),
            lease_time: 3600,
            rate_limit: None,
        },
        duid: duid_ll([2, 0, 0, 0, 0, 1]),
        http_port: 8080,
        signed: Default::default(),
    })
}

/// Messages as clients send them: dhclient's Solicit, Request, Renew, Release and Confirm
/// with an IA_NA, a rapid-commit Solicit, iPXE's (user class), UEFI PXE's and HTTP boot's
/// (architecture, vendor class), an Information-request.
fn dhcp6_corpus() -> Vec<(String, Vec<u8>)> {
    use dhcproto::v6::{
        DhcpOption, DhcpOptions, IAAddr, IANA, Message, MessageType, ORO, OptionCode,
    };
    use dhcproto::{Encodable, Encoder};
    use stork::dhcp6::handler::{duid_ll, user_class, vendor_class};
    let client = duid_ll([0x52, 0x54, 0, 0x66, 0, 1]);
    let server = duid_ll([2, 0, 0, 0, 0, 1]);
    let ia = |addr: Option<&str>| {
        let mut opts = DhcpOptions::new();
        if let Some(a) = addr {
            opts.insert(DhcpOption::IAAddr(IAAddr {
                addr: a.parse().unwrap(),
                preferred_life: 3600,
                valid_life: 3600,
                opts: DhcpOptions::new(),
            }));
        }
        DhcpOption::IANA(IANA {
            id: 0x0965_bf8a,
            t1: 0,
            t2: 0,
            opts,
        })
    };
    let build = |kind: MessageType, extra: Vec<DhcpOption>| {
        let mut m = Message::new_with_id(kind, [0x12, 0x34, 0x56]);
        m.opts_mut().insert(DhcpOption::ClientId(client.clone()));
        m.opts_mut().insert(DhcpOption::ElapsedTime(0));
        m.opts_mut().insert(DhcpOption::ORO(ORO {
            opts: vec![OptionCode::DomainNameServers, OptionCode::from(59u16)],
        }));
        for o in extra {
            m.opts_mut().insert(o);
        }
        let mut out = Vec::new();
        m.encode(&mut Encoder::new(&mut out)).unwrap();
        out
    };
    let sid = || DhcpOption::ServerId(server.clone());
    let arch = |a: u16| DhcpOption::ClientArchType(vec![a.into()]);
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("solicit", build(MessageType::Solicit, vec![ia(None)])),
        (
            "solicit-rapid",
            build(
                MessageType::Solicit,
                vec![ia(None), DhcpOption::RapidCommit],
            ),
        ),
        (
            "solicit-ipxe",
            build(MessageType::Solicit, vec![ia(None), user_class(b"iPXE")]),
        ),
        (
            "solicit-uefi-pxe",
            build(MessageType::Solicit, vec![ia(None), arch(7)]),
        ),
        (
            "solicit-uefi-http",
            build(
                MessageType::Solicit,
                vec![
                    ia(None),
                    arch(16),
                    vendor_class(343, b"HTTPClient:Arch:00016:UNDI:003001"),
                ],
            ),
        ),
        (
            "request",
            build(MessageType::Request, vec![ia(Some("fd77::100")), sid()]),
        ),
        (
            "renew",
            build(MessageType::Renew, vec![ia(Some("fd77::100")), sid()]),
        ),
        (
            "rebind",
            build(MessageType::Rebind, vec![ia(Some("fd77::100"))]),
        ),
        (
            "release",
            build(MessageType::Release, vec![ia(Some("fd77::100")), sid()]),
        ),
        (
            "decline",
            build(MessageType::Decline, vec![ia(Some("fd77::100")), sid()]),
        ),
        (
            "confirm",
            build(MessageType::Confirm, vec![ia(Some("fd77::100"))]),
        ),
        (
            "information-request",
            build(MessageType::InformationRequest, vec![arch(7)]),
        ),
    ];
    seeds
        .into_iter()
        .map(|(name, bytes)| (format!("{name}.bin"), bytes))
        .collect()
}

/// `STORK_FUZZ_WRITE_CORPUS=1 cargo test -p stork --test fuzz dhcp6_corpus_is_current`
/// rewrites it.
#[test]
fn dhcp6_corpus_is_current() {
    fuzz_common::check_corpus("dhcp6", "fuzz dhcp6_corpus_is_current", dhcp6_corpus());
}

/// Raw datagrams through what the DHCPv6 socket loop runs (`dhcp6::Handler::handle`), in
/// full and stateless mode: no panic, every reply decodes, every lease change names an
/// address of the range and survives the lease file's line format; and each input as a
/// lease file's text through `leases::replay`.
#[test]
fn dhcp6_datagrams_from_raw_bytes() {
    use dhcproto::v6::Message as Message6;
    use stork::dhcp6::Mode;
    use stork::dhcp6::leases::{Change, replay};
    let mut handlers = [dhcp6_handler(Mode::Full), dhcp6_handler(Mode::Stateless)];
    let mut now = 1_000_000u64;
    let (mut replies, mut bound) = (0u64, 0u64);
    let n = drive("dhcp6", |input| {
        now += 1;
        for h in &mut handlers {
            let Ok((reply, changes)) = caught(|| h.handle(input, now))? else {
                continue;
            };
            replies += 1;
            Message6::decode(&mut dhcproto::Decoder::new(&reply))
                .map_err(|e| format!("our reply does not decode: {e}"))?;
            for c in &changes {
                if let Change::Bound { addr, .. } = c {
                    bound += 1;
                    let (lo, hi) = h.info.cfg.range;
                    if !(u128::from(lo)..=u128::from(hi)).contains(&u128::from(*addr)) {
                        return Err(format!("leased {addr} outside the range"));
                    }
                }
                let line = serde_json::to_string(c).map_err(|e| e.to_string())?;
                if serde_json::from_str::<Change>(&line).ok().as_ref() != Some(c) {
                    return Err(format!("lease change does not round-trip: {c:?}"));
                }
            }
        }
        caught(|| replay(&String::from_utf8_lossy(input), now))?;
        Ok(())
    });
    // The run reached replies and leases, not only refusals.
    assert!(
        n > 0 && replies > 0 && bound > 0,
        "{replies} replies, {bound} leases"
    );
}
