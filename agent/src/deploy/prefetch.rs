//! The download on a thread of its own: receiving, hashing and resuming run beside the
//! decoder and the disk writes instead of taking turns with them. Measured under QEMU TCG
//! (`cargo xtask bench deploy`), one thread doing all of it was CPU-bound at about half of
//! `dd`'s rate for the same bytes; two cores are the least a machine worth deploying has.
//!
//! The thread reads the whole file (to its end, so the hash covers every byte whatever the
//! decoder consumed) in [`CHUNK`]-sized blocks, a few ahead at most, and gives the
//! [`Download`] back at the end with its sha256 and resume count.

use std::io::{self, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::download::{CHUNK, Download};

/// Blocks read ahead of the decoder: bounded memory, enough to ride out a slow write.
const AHEAD: usize = 8;

/// What the reading thread shares while it runs.
#[derive(Default)]
struct Counters {
    received: AtomicU64,
    /// The file's size once the server said it; `u64::MAX` until then.
    total: AtomicU64,
}

pub struct Prefetched {
    rx: Option<Receiver<io::Result<Vec<u8>>>>,
    current: Vec<u8>,
    pos: usize,
    counters: Arc<Counters>,
    thread: Option<JoinHandle<Download>>,
    /// Time the reader spent blocked on the download thread.
    waited: Duration,
    /// The download's failure, once seen: every later read fails the same way rather than
    /// looking like the end of the file (which would hash a truncated file).
    failed: Option<(io::ErrorKind, String)>,
}

impl Prefetched {
    pub fn start(mut download: Download) -> Self {
        let (tx, rx) = sync_channel(AHEAD);
        let counters = Arc::new(Counters {
            received: AtomicU64::new(0),
            total: AtomicU64::new(u64::MAX),
        });
        let shared = Arc::clone(&counters);
        let thread = std::thread::spawn(move || {
            loop {
                let mut block = vec![0u8; CHUNK];
                let result = super::http::read_full(&mut download, &mut block);
                shared
                    .received
                    .store(download.received(), Ordering::Relaxed);
                if let Some(t) = download.total() {
                    shared.total.store(t, Ordering::Relaxed);
                }
                match result {
                    Ok(0) => break,
                    Ok(n) => {
                        block.truncate(n);
                        // The reader stopped listening (it failed): nothing more to do.
                        if tx.send(Ok(block)).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        break;
                    }
                }
            }
            download
        });
        Self {
            rx: Some(rx),
            current: Vec::new(),
            pos: 0,
            counters,
            thread: Some(thread),
            waited: Duration::ZERO,
            failed: None,
        }
    }

    /// Compressed bytes received so far (ahead of what was read from here).
    pub fn received(&self) -> u64 {
        self.counters.received.load(Ordering::Relaxed)
    }

    /// How long reads waited for the download: the network (or the hash) was the limit then.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    pub fn total(&self) -> Option<u64> {
        Some(self.counters.total.load(Ordering::Relaxed)).filter(|t| *t != u64::MAX)
    }

    /// Reads whatever is left, then gives the download back (its hash covers the whole file
    /// unless the download failed).
    pub fn finish(mut self) -> io::Result<Download> {
        io::copy(&mut self, &mut io::sink())?;
        self.join()
    }

    fn join(&mut self) -> io::Result<Download> {
        // Dropping our end stops a thread still sending. (Dropping a `Prefetched` early does
        // the same: the thread ends at its next block.)
        self.rx = None;
        self.thread
            .take()
            .ok_or_else(|| io::Error::other("the download was already taken"))?
            .join()
            .map_err(|_| io::Error::other("the download thread panicked"))
    }
}

impl Read for Prefetched {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some((kind, why)) = &self.failed {
            return Err(io::Error::new(*kind, why.clone()));
        }
        while self.pos == self.current.len() {
            let Some(rx) = &self.rx else {
                return Ok(0);
            };
            let t = Instant::now();
            let next = rx.recv();
            self.waited += t.elapsed();
            match next {
                Ok(Ok(block)) => {
                    self.current = block;
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.failed = Some((e.kind(), format!("{e:#}")));
                    return Err(e);
                }
                // The thread is done: the file ended.
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
