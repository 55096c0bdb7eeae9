//! A minimal HTTP/1.1 GET for image downloads, with a `Range` start and an idle timeout.
//!
//! Why not ureq (which the API client uses): ureq 3 only has total budgets (whole call, whole
//! body), so a stalled connection in the middle of a 400 MB image would either hang for the
//! whole budget or need a budget too short for a slow link. A plain socket with a read timeout
//! notices a stall in [`READ_TIMEOUT`] whatever the image's size. The appliance serves `/boot/`
//! with a `Content-Length` (tower-http `ServeDir`) and answers `Range` with 206, which is all
//! this needs; chunked bodies are refused with a clear error.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence from the server before the connection counts as dropped.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Response headers larger than this are not from our appliance.
const MAX_HEADER_BYTES: usize = 16 << 10;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0:?} is not an http:// URL with a host")]
    BadUrl(String),
    #[error("connecting to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("talking to {addr}")]
    Io {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("{url}: server answered {status} {reason}")]
    Status {
        url: String,
        status: u16,
        reason: String,
    },
    #[error("{url}: malformed response: {why}")]
    Malformed { url: String, why: String },
}

impl HttpError {
    /// Worth another try: the network or a busy server, not a wrong URL or a missing file.
    pub fn is_transient(&self) -> bool {
        match self {
            HttpError::Connect { .. } | HttpError::Io { .. } => true,
            HttpError::Status { status, .. } => *status >= 500,
            HttpError::BadUrl(_) | HttpError::Malformed { .. } => false,
        }
    }
}

/// `http://host[:port]/path`, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl Url {
    pub fn parse(url: &str) -> Result<Self, HttpError> {
        let bad = || HttpError::BadUrl(url.to_string());
        let rest = url.strip_prefix("http://").ok_or_else(bad)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        // An IPv6 host is in brackets (`[fd77::1]:8080`) and keeps them: `addr` and the
        // Host header want them so.
        let port_sep = match authority.rfind(']') {
            Some(end) => authority
                .get(end..)
                .and_then(|t| t.find(':'))
                .map(|i| end + i),
            None => authority.rfind(':'),
        };
        let (host, port) = match port_sep {
            Some(i) => (
                &authority[..i],
                authority[i + 1..].parse().map_err(|_| bad())?,
            ),
            None => (authority, 80),
        };
        if host.is_empty() || path.contains(char::is_whitespace) {
            return Err(bad());
        }
        Ok(Self {
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }

    fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// An answered GET: the body is read from `body` (exactly `length` bytes).
pub struct Response {
    /// Where the body starts in the whole file: the `Range` start on a 206, else 0.
    pub offset: u64,
    /// Bytes in this body.
    pub length: u64,
    /// The whole file's size, when the server said (`Content-Range: bytes a-b/total`, or the
    /// `Content-Length` of a 200).
    pub total: Option<u64>,
    pub body: io::Take<BufReader<TcpStream>>,
}

/// GETs `url`, from byte `from` on when it is not 0 (`Range: bytes=from-`). A server that
/// ignores the range answers 200 from byte 0: the caller sees `offset == 0` and skips.
pub fn get(url: &Url, from: u64) -> Result<Response, HttpError> {
    let addr = url.addr();
    let io_err = |source| HttpError::Io {
        addr: addr.clone(),
        source,
    };
    let full = format!("http://{}{}", addr, url.path);
    let malformed = |why: &str| HttpError::Malformed {
        url: full.clone(),
        why: why.to_string(),
    };

    let stream = connect(&addr)?;
    stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .map_err(io_err)?;
    stream
        .set_write_timeout(Some(READ_TIMEOUT))
        .map_err(io_err)?;
    let range = if from > 0 {
        format!("Range: bytes={from}-\r\n")
    } else {
        String::new()
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: stork-agent\r\nAccept-Encoding: identity\r\n{range}Connection: close\r\n\r\n",
        url.path, addr
    );
    (&stream).write_all(request.as_bytes()).map_err(io_err)?;

    let mut reader = BufReader::with_capacity(256 << 10, stream);
    let mut head = Vec::new();
    loop {
        let before = head.len();
        let n = reader.read_until(b'\n', &mut head).map_err(io_err)?;
        if n == 0 {
            return Err(io_err(io::ErrorKind::UnexpectedEof.into()));
        }
        if head.len() > MAX_HEADER_BYTES {
            return Err(malformed("headers too large"));
        }
        if &head[before..] == b"\r\n" || &head[before..] == b"\n" {
            break;
        }
    }
    let head = String::from_utf8_lossy(&head);
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(malformed("no status line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(malformed("not HTTP/1.x"));
    }
    let status: u16 = code.parse().map_err(|_| malformed("bad status code"))?;
    let reason = parts.next().unwrap_or_default().trim().to_string();
    let mut length = None;
    let mut content_range = None;
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            length = Some(
                v.parse::<u64>()
                    .map_err(|_| malformed("bad Content-Length"))?,
            );
        } else if k.eq_ignore_ascii_case("content-range") {
            content_range = Some(v.to_string());
        } else if k.eq_ignore_ascii_case("transfer-encoding") && !v.eq_ignore_ascii_case("identity")
        {
            return Err(malformed("chunked bodies are not supported"));
        }
    }
    if !(status == 200 || status == 206) {
        return Err(HttpError::Status {
            url: full,
            status,
            reason,
        });
    }
    let length = length.ok_or_else(|| malformed("no Content-Length"))?;
    let (offset, total) = if status == 206 {
        let cr = content_range.ok_or_else(|| malformed("206 without Content-Range"))?;
        let (start, total) =
            parse_content_range(&cr).ok_or_else(|| malformed("bad Content-Range"))?;
        (start, total)
    } else {
        (0, Some(length))
    };
    Ok(Response {
        offset,
        length,
        total,
        body: reader.take(length),
    })
}

fn connect(addr: &str) -> Result<TcpStream, HttpError> {
    let err = |source| HttpError::Connect {
        addr: addr.to_string(),
        source,
    };
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for sa in addr.to_socket_addrs().map_err(err)? {
        match TcpStream::connect_timeout(&sa, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(err(last))
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`) to `(START, Some(TOTAL))`.
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let total = if total.trim() == "*" {
        None
    } else {
        Some(total.trim().parse().ok()?)
    };
    Some((start.trim().parse().ok()?, total))
}

/// Reads until `buf` is full or the reader ends; returns how much was read.
pub fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_appliance_urls() {
        assert_eq!(
            Url::parse("http://10.77.0.1:8080/boot/img/x.raw.zst").unwrap(),
            Url {
                host: "10.77.0.1".into(),
                port: 8080,
                path: "/boot/img/x.raw.zst".into()
            }
        );
        assert_eq!(Url::parse("http://h").unwrap().port, 80);
        assert_eq!(Url::parse("http://h").unwrap().path, "/");
        assert!(Url::parse("https://h/x").is_err());
        assert!(Url::parse("http://:80/x").is_err());
        assert!(Url::parse("http://h:port/x").is_err());
        let v6 = Url::parse("http://[fd77::1]:8080/boot/vmlinuz").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("[fd77::1]", 8080));
        assert_eq!(
            v6.addr().parse::<std::net::SocketAddr>().unwrap().port(),
            8080
        );
        assert_eq!(Url::parse("http://[fd77::1]/x").unwrap().port, 80);
    }

    #[test]
    fn parses_content_ranges() {
        assert_eq!(
            parse_content_range("bytes 100-199/200"),
            Some((100, Some(200)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }
}
