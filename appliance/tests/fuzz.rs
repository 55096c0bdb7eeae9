//! Fuzzing on the stable toolchain, in `cargo xtask test`: raw datagrams through exactly the
//! code the DHCP and TFTP socket loops run (`dhcp::Server::on_datagram`: edge checks,
//! handler, journal records, reply encoding, in full and proxy mode, on ports 67 and 4011;
//! `tftp::server::classify`, then the root's confinement, the negotiation and the transfer
//! state machine fed with hostile client packets); and the lease journal's bytes
//! (`dhcp::journal::Record::decode`, then a whole file through `journal::load` and
//! `Journal::open`).
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
use stork::dhcp::{Action, Port, Server, Stats};
use stork::tftp::options::MAX_CLIENT_TIMEOUT_SECS;
use stork::tftp::packet::Repr;
use stork::tftp::request::netascii;
use stork::tftp::server::{Listen, classify_caught, plan};
use stork::tftp::transfer::Transfer;
use stork::tftp::{TftpConfig, fs::Root};

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
                let action = server.on_datagram(input, peer, port, clock);
                if stats.panics.load(Ordering::Relaxed) != panics {
                    return Err(format!("handling panicked on {port:?}"));
                }
                match action {
                    Action::Nothing => {}
                    Action::Send(s) => {
                        Message::decode(&mut Decoder::new(&s.bytes))
                            .map_err(|e| format!("our reply does not decode: {e}"))?;
                    }
                    Action::Journal(job) => {
                        for r in &job.records {
                            if Record::decode(&r.encode()) != Some(*r) {
                                return Err(format!("journal record does not round-trip: {r:?}"));
                            }
                        }
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
