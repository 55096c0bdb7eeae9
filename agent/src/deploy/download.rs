//! An image file's download as a plain [`Read`]: the sha256 of the bytes as served, computed
//! as they arrive, and a `Range` resume when the connection drops or stalls. Below both
//! [`super::prefetch`] (which runs it on a thread of its own) and [`super::stream`] (which
//! decodes it onto a sink), so that neither imports the other for it.

use std::io::{self, BufReader, Read};
use std::thread::sleep;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::http::{self, HttpError, Url};

/// Unit of the zero test and of the writes, and of the blocks read ahead.
pub const CHUNK: usize = 1 << 20;
/// Tries in a row without a single new byte before the download is given up.
const MAX_ATTEMPTS: u32 = 6;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(8);

/// What can go wrong from the appliance's file to the sink. One type for the download and
/// the streaming: a download error reaches the streaming inside the decoder's `io::Error` and
/// is taken back out as this.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("sha256 mismatch: expected {expected}, got {actual} ({bytes} bytes received)")]
    Checksum {
        expected: String,
        actual: String,
        bytes: u64,
    },
    #[error("size mismatch: expected {expected} bytes, the server sent {actual}")]
    Size { expected: u64, actual: u64 },
    #[error("download failed after {attempts} attempts at byte {offset}")]
    Download {
        attempts: u32,
        offset: u64,
        #[source]
        source: HttpError,
    },
    #[error("download failed at byte {offset}")]
    Fatal {
        offset: u64,
        #[source]
        source: HttpError,
    },
    #[error("decompressing the image at output byte {offset}")]
    Decode {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("writing {len} bytes at byte {offset} of the disk")]
    Write {
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("the image ({needed} bytes decompressed) is larger than the disk ({capacity} bytes)")]
    TooLarge { needed: u64, capacity: u64 },
    /// The image's block map does not fit its file (`super::mapped`): the reason says where.
    #[error("block map: {0}")]
    BlockMap(super::mapped::MapFault),
}

/// An image file's download as a plain [`Read`]: hashes what it hands on, resumes with
/// `Range` when the connection breaks, and retries a few times with backoff.
pub struct Download {
    url: Url,
    /// Compressed bytes handed on so far: the `Range` start of the next GET.
    received: u64,
    /// The file's size as the server reported it.
    total: Option<u64>,
    hasher: Sha256,
    body: Option<io::Take<BufReader<std::net::TcpStream>>>,
    /// Connections opened after the first: how often the download resumed.
    pub resumes: u32,
    backoff: Duration,
}

impl Download {
    pub fn new(url: &str) -> Result<Self, StreamError> {
        let url = Url::parse(url).map_err(|source| StreamError::Fatal { offset: 0, source })?;
        Ok(Self {
            url,
            received: 0,
            total: None,
            hasher: Sha256::new(),
            body: None,
            resumes: 0,
            backoff: FIRST_BACKOFF,
        })
    }

    #[cfg(test)]
    pub fn with_backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }

    pub fn received(&self) -> u64 {
        self.received
    }

    pub fn total(&self) -> Option<u64> {
        self.total
    }

    /// The sha256 of everything read so far, in hex.
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }

    /// Opens a connection for the bytes from `self.received` on, retrying transient errors.
    fn open(&mut self) -> Result<(), StreamError> {
        let mut attempts = 0;
        let mut backoff = self.backoff;
        loop {
            attempts += 1;
            match self.try_open() {
                Ok(()) => return Ok(()),
                Err(source) if !source.is_transient() => {
                    return Err(StreamError::Fatal {
                        offset: self.received,
                        source,
                    });
                }
                Err(source) if attempts >= MAX_ATTEMPTS => {
                    return Err(StreamError::Download {
                        attempts,
                        offset: self.received,
                        source,
                    });
                }
                Err(_) => {
                    sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    fn try_open(&mut self) -> Result<(), HttpError> {
        let resp = http::get(&self.url, self.received)?;
        if resp.total.is_some() {
            self.total = resp.total;
        }
        let mut body = resp.body;
        // A server that ignored the range starts again at 0: skip what we already have.
        if resp.offset < self.received {
            let skip = self.received - resp.offset;
            let skipped =
                io::copy(&mut (&mut body).take(skip), &mut io::sink()).map_err(|source| {
                    HttpError::Io {
                        addr: self.url.host.clone(),
                        source,
                    }
                })?;
            if skipped < skip {
                return Err(HttpError::Io {
                    addr: self.url.host.clone(),
                    source: io::ErrorKind::UnexpectedEof.into(),
                });
            }
        } else if resp.offset > self.received {
            return Err(HttpError::Malformed {
                url: self.url.path.clone(),
                why: format!(
                    "asked for bytes from {}, got from {}",
                    self.received, resp.offset
                ),
            });
        }
        if self.body.is_some() || self.received > 0 {
            self.resumes += 1;
        }
        self.body = Some(body);
        Ok(())
    }
}

impl Read for Download {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut failures = 0;
        loop {
            if self.body.is_none() {
                self.open().map_err(io::Error::other)?;
            }
            let Some(body) = self.body.as_mut() else {
                continue;
            };
            let result = body.read(buf);
            match result {
                Ok(n) if n > 0 => {
                    self.hasher.update(&buf[..n]);
                    self.received += n as u64;
                    return Ok(n);
                }
                Ok(_) if body.limit() == 0 && self.total.is_none_or(|t| self.received >= t) => {
                    return Ok(0);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The connection ended early, stalled past the read timeout, or broke: resume.
                Ok(_) | Err(_) => {
                    self.body = None;
                    failures += 1;
                    if failures >= MAX_ATTEMPTS {
                        let source = match result {
                            Err(e) => e,
                            Ok(_) => io::ErrorKind::UnexpectedEof.into(),
                        };
                        return Err(io::Error::other(StreamError::Download {
                            attempts: failures,
                            offset: self.received,
                            source: HttpError::Io {
                                addr: self.url.host.clone(),
                                source,
                            },
                        }));
                    }
                    let why = match &result {
                        Err(e) => e.to_string(),
                        Ok(_) => "connection closed early".to_string(),
                    };
                    crate::console::line(&format!(
                        "image: download broke at byte {} ({why}); resuming with Range",
                        self.received
                    ));
                    sleep(self.backoff);
                }
            }
        }
    }
}
