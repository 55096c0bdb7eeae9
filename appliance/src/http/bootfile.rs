//! Boot files at the kernel's speed: the sans-IO half of the plain listener's `/boot/`
//! responder (issue 18). The accept loop (`listener.rs`) reads a request head into a buffer,
//! asks [`peek`] what it is, and either answers it here with `sendfile(2)` or hands the
//! connection, with the bytes already read, to hyper and the router as before.
//!
//! Why our own responder: through hyper and ServeDir every byte of a boot file is copied
//! into user space and out again in 64 KiB chunks; a 512 MiB file came at 0.65x nginx's
//! rate. `sendfile` moves page-cache pages to the socket without a copy through us.
//!
//! Why so narrow: only a plain `GET`/`HEAD` of a `/boot/` path with no body, no upgrade and
//! no condition other than `If-Modified-Since` is answered here, and a single byte range at
//! most. Everything else (a multi-range or malformed `Range`, `If-None-Match`, `If-Range`,
//! an obsolete date form, another route) goes to ServeDir through hyper, so its answers stay
//! the reference and this module only has to be right on the common case. Nothing here
//! panics on input: every index is checked.

use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The largest request head read before answering 431: hyper's default read buffer
/// (8 KiB + 100 x 4 KiB), so both paths refuse at the same size.
pub const MAX_HEAD: usize = 8192 + 4096 * 100;
/// Headers in one request, as hyper allows.
pub const MAX_HEADERS: usize = 100;

/// The only request lines this responder may take; anything that cannot start with one is
/// handed over at once (a slow client then meets hyper's header deadline, not ours first).
const PREFIXES: [&[u8]; 2] = [b"GET /boot/", b"HEAD /boot/"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
}

/// One `Range: bytes=...` of a single range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `a-b`, both inclusive.
    FromTo(u64, u64),
    /// `a-`
    From(u64),
    /// `-n`: the last `n` bytes.
    Suffix(u64),
}

/// A request this responder answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// The path below `/boot/`, still percent-encoded, without the query.
    pub path: String,
    pub range: Option<ByteRange>,
    /// Seconds since the epoch.
    pub if_modified_since: Option<u64>,
    /// The connection stays open after the answer.
    pub keep_alive: bool,
}

/// Why a head that looked like ours is refused, and the connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadHead {
    #[error("request head over {MAX_HEAD} bytes or {MAX_HEADERS} headers")]
    TooLarge,
    #[error("malformed request line")]
    RequestLine,
    #[error("malformed header line")]
    Header,
}

impl BadHead {
    pub fn status(self) -> u16 {
        match self {
            Self::TooLarge => 431,
            Self::RequestLine | Self::Header => 400,
        }
    }
}

/// What the bytes read so far of a connection's next request are.
#[derive(Debug, PartialEq, Eq)]
pub enum Peek {
    /// Could still be ours: read more.
    NeedMore,
    /// Not ours (another route, or something ServeDir should judge): hand the connection
    /// and every byte read to hyper.
    Handoff,
    /// Ours; the head took this many bytes of the buffer.
    Ours(Request, usize),
    /// Looked like ours and is broken: answer the status and close.
    Bad(BadHead),
}

/// Classifies the start of `buf`, the bytes read of the next request.
pub fn peek(buf: &[u8]) -> Peek {
    let may_be_ours = PREFIXES.iter().any(|p| {
        let n = p.len().min(buf.len());
        buf.get(..n) == p.get(..n)
    });
    if !may_be_ours {
        return Peek::Handoff;
    }
    if !PREFIXES.iter().any(|p| buf.starts_with(p)) {
        return Peek::NeedMore;
    }
    let Some(end) = head_end(buf) else {
        return if buf.len() >= MAX_HEAD {
            Peek::Bad(BadHead::TooLarge)
        } else {
            Peek::NeedMore
        };
    };
    if end > MAX_HEAD {
        return Peek::Bad(BadHead::TooLarge);
    }
    match parse(buf.get(..end).unwrap_or_default()) {
        Ok(Some(req)) => Peek::Ours(req, end),
        Ok(None) => Peek::Handoff,
        Err(e) => Peek::Bad(e),
    }
}

/// Where the head ends (after its empty line), with CRLF or bare LF line ends as hyper
/// accepts them.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(nl) = buf.get(i..)?.iter().position(|&b| b == b'\n') {
        let next = i + nl + 1;
        match buf.get(next..) {
            Some([b'\n', ..]) => return Some(next + 1),
            Some([b'\r', b'\n', ..]) => return Some(next + 2),
            _ => i = next,
        }
    }
    None
}

/// Parses a complete head; `Ok(None)`: a well-formed request that is not ours to answer.
fn parse(head: &[u8]) -> Result<Option<Request>, BadHead> {
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let line = lines.next().ok_or(BadHead::RequestLine)?;
    let line = std::str::from_utf8(line).map_err(|_| BadHead::RequestLine)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BadHead::RequestLine);
    };
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        _ => return Err(BadHead::RequestLine),
    };
    if target.is_empty() || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(BadHead::RequestLine);
    }
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(BadHead::RequestLine),
    };
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let path = path.strip_prefix("/boot/").ok_or(BadHead::RequestLine)?;

    let mut count = 0;
    let mut range = None;
    let mut ims = None;
    let mut close = !http11;
    let mut ours = true;
    let mut seen_range = false;
    for line in lines {
        if line.is_empty() {
            break;
        }
        count += 1;
        if count > MAX_HEADERS {
            return Err(BadHead::TooLarge);
        }
        let (name, value) = header(line)?;
        match name.to_ascii_lowercase().as_str() {
            "range" => {
                // A second Range, a multi-range or one we do not parse: ServeDir's call.
                if seen_range {
                    ours = false;
                }
                seen_range = true;
                match parse_range(value) {
                    Some(r) => range = Some(r),
                    None => ours = false,
                }
            }
            "if-modified-since" => match parse_http_date(value) {
                Some(t) if ims.is_none() => ims = Some(t),
                _ => ours = false,
            },
            "connection" => {
                for token in value.split(',').map(str::trim) {
                    if token.eq_ignore_ascii_case("close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case("upgrade") {
                        ours = false;
                    }
                }
            }
            // A body is never expected of a GET here; an empty one is what simple clients
            // declare.
            "content-length" if value == "0" => {}
            "content-length"
            | "transfer-encoding"
            | "upgrade"
            | "expect"
            | "if-match"
            | "if-none-match"
            | "if-unmodified-since"
            | "if-range" => ours = false,
            _ => {}
        }
    }
    if !ours {
        return Ok(None);
    }
    Ok(Some(Request {
        method,
        path: path.to_string(),
        range,
        if_modified_since: ims,
        // An HTTP/1.0 client gets one answer and a close: the keep-alive extension of 1.0
        // is not worth its edge cases for firmware that speaks 1.1.
        keep_alive: !close,
    }))
}

/// `name: value`, the name a token, the value without control characters (HTAB allowed).
fn header(line: &[u8]) -> Result<(&str, &str), BadHead> {
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or(BadHead::Header)?;
    let (name, value) = (
        line.get(..colon).ok_or(BadHead::Header)?,
        line.get(colon + 1..).ok_or(BadHead::Header)?,
    );
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.iter().all(|&b| token(b)) {
        return Err(BadHead::Header);
    }
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(BadHead::Header);
    }
    let name = std::str::from_utf8(name).map_err(|_| BadHead::Header)?;
    // Non-ASCII values are legal (obs-text) but none that we read can hold them.
    let value = std::str::from_utf8(value).unwrap_or("\u{fffd}");
    Ok((name, value.trim_matches([' ', '\t'])))
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n`; `None` for anything else (several ranges too).
pub fn parse_range(value: &str) -> Option<ByteRange> {
    let spec = value.trim().strip_prefix("bytes=")?.trim();
    let (a, b) = spec.split_once('-')?;
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let (a, b) = (a.trim(), b.trim());
    match (a.is_empty(), b.is_empty()) {
        (true, true) => None,
        (true, false) => num(b).map(ByteRange::Suffix),
        (false, true) => num(a).map(ByteRange::From),
        (false, false) => {
            let (a, b) = (num(a)?, num(b)?);
            // ServeDir answers an inverted range 416; let it.
            (a <= b).then_some(ByteRange::FromTo(a, b))
        }
    }
}

/// What a file's size and time are, as the answer needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMeta {
    pub len: u64,
    pub modified: Option<SystemTime>,
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 200: the whole file.
    Full,
    /// 206: bytes `start..=end`.
    Partial { start: u64, end: u64 },
    /// 304
    NotModified,
    /// 416
    Unsatisfiable,
    /// 404: missing, a directory, or refused (outside the root, `..`).
    NotFound,
}

impl Answer {
    pub fn status(self) -> u16 {
        match self {
            Self::Full => 200,
            Self::Partial { .. } => 206,
            Self::NotModified => 304,
            Self::Unsatisfiable => 416,
            Self::NotFound => 404,
        }
    }

    /// The file's bytes the body carries: (offset, count); none for a `HEAD`.
    pub fn body(self, method: Method, meta: &FileMeta) -> Option<(u64, u64)> {
        if method == Method::Head {
            return None;
        }
        match self {
            Self::Full => Some((0, meta.len)),
            Self::Partial { start, end } => Some((start, end - start + 1)),
            _ => None,
        }
    }
}

/// Decides the answer for `req` about a file with `meta` (`None`: no such file).
pub fn answer(req: &Request, meta: Option<&FileMeta>) -> Answer {
    let Some(meta) = meta else {
        return Answer::NotFound;
    };
    // As ServeDir: modified means strictly later than the date, at the date's precision.
    if let (Some(since), Some(modified)) = (req.if_modified_since, meta.modified.map(secs))
        && modified <= since
    {
        return Answer::NotModified;
    }
    let Some(range) = req.range else {
        return Answer::Full;
    };
    let len = meta.len;
    let last = match len.checked_sub(1) {
        Some(l) => l,
        None => return Answer::Unsatisfiable,
    };
    let (start, end) = match range {
        ByteRange::FromTo(a, b) => (a, b.min(last)),
        ByteRange::From(a) => (a, last),
        ByteRange::Suffix(0) => return Answer::Unsatisfiable,
        ByteRange::Suffix(n) => (len.saturating_sub(n), last),
    };
    if start > last {
        return Answer::Unsatisfiable;
    }
    Answer::Partial { start, end }
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

/// The response head for `answer`; `now` for the `Date` header.
pub fn response_head(
    answer: Answer,
    meta: Option<&FileMeta>,
    keep_alive: bool,
    now: SystemTime,
) -> Vec<u8> {
    use std::fmt::Write;
    let reason = match answer {
        Answer::Full => "OK",
        Answer::Partial { .. } => "Partial Content",
        Answer::NotModified => "Not Modified",
        Answer::Unsatisfiable => "Range Not Satisfiable",
        Answer::NotFound => "Not Found",
    };
    let mut h = format!("HTTP/1.1 {} {reason}\r\n", answer.status());
    let modified = meta.and_then(|m| m.modified);
    let len = meta.map_or(0, |m| m.len);
    // Header by header what ServeDir sends (its ETag's form too), but one content type:
    // firmware and the agent never look at it.
    let file_headers = |h: &mut String| {
        let _ = write!(
            h,
            "content-type: application/octet-stream\r\naccept-ranges: bytes\r\n"
        );
        if let Some(m) = modified {
            let _ = write!(h, "last-modified: {}\r\n", http_date(secs(m)));
        }
        if let Some(tag) = modified.and_then(|m| etag(len, m)) {
            let _ = write!(h, "etag: {tag}\r\n");
        }
    };
    match answer {
        Answer::Full => {
            file_headers(&mut h);
            let _ = write!(h, "content-length: {len}\r\n");
        }
        Answer::Partial { start, end } => {
            file_headers(&mut h);
            let _ = write!(
                h,
                "content-range: bytes {start}-{end}/{len}\r\ncontent-length: {}\r\n",
                end - start + 1
            );
        }
        Answer::NotModified => {
            if let Some(m) = modified {
                let _ = write!(h, "last-modified: {}\r\n", http_date(secs(m)));
            }
            if let Some(tag) = modified.and_then(|m| etag(len, m)) {
                let _ = write!(h, "etag: {tag}\r\n");
            }
        }
        Answer::Unsatisfiable => {
            let _ = write!(
                h,
                "accept-ranges: bytes\r\ncontent-range: bytes */{len}\r\n"
            );
            if let Some(m) = modified {
                let _ = write!(h, "last-modified: {}\r\n", http_date(secs(m)));
            }
            h.push_str("content-length: 0\r\n");
        }
        Answer::NotFound => h.push_str("content-length: 0\r\n"),
    }
    if !keep_alive {
        h.push_str("connection: close\r\n");
    }
    let _ = write!(h, "date: {}\r\n\r\n", http_date(secs(now)));
    h.into_bytes()
}

/// The head of a refusal that closes the connection.
pub fn refusal_head(bad: BadHead, now: SystemTime) -> Vec<u8> {
    let reason = match bad.status() {
        431 => "Request Header Fields Too Large",
        _ => "Bad Request",
    };
    format!(
        "HTTP/1.1 {} {reason}\r\ncontent-length: 0\r\nconnection: close\r\ndate: {}\r\n\r\n",
        bad.status(),
        http_date(secs(now))
    )
    .into_bytes()
}

/// ServeDir's ETag: modification time and size, so a cache sees one tag on both paths.
fn etag(len: u64, modified: SystemTime) -> Option<String> {
    let d = modified.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    Some(format!(
        "\"{:x}.{:08x}-{:x}\"",
        d.as_secs(),
        d.subsec_nanos(),
        len
    ))
}

const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// IMF-fixdate (RFC 9110 5.6.7): `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{}, {d:02} {} {y:04} {:02}:{:02}:{:02} GMT",
        DAYS.get((days % 7) as usize).copied().unwrap_or("Thu"),
        MONTHS.get((m - 1) as usize).copied().unwrap_or("Jan"),
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Parses an IMF-fixdate; the obsolete forms ServeDir also reads give `None` (and the
/// request goes to ServeDir).
pub fn parse_http_date(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 29 || b.get(3) != Some(&b',') || !s.ends_with(" GMT") {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let day = num(5..7)?;
    let month = MONTHS.iter().position(|m| Some(*m) == s.get(8..11))? as i64 + 1;
    let year = num(12..16)?;
    let (hh, mm, ss) = (num(17..19)?, num(20..22)?, num(23..25)?);
    if s.get(16..17) != Some(" ") || s.get(19..20) != Some(":") || s.get(22..23) != Some(":") {
        return None;
    }
    if !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

/// Howard Hinnant's `days_from_civil`: days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Its inverse: (year, month 1-12, day 1-31).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

/// Where a `/boot/` path leads.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The file (or directory) it resolves to, inside the root.
    Inside(PathBuf),
    /// Nothing there (or a name no file can have).
    Missing,
    /// `..`, an absolute component, or a symbolic link leading out of the root.
    Refused,
}

/// The one check of a `/boot/` path, for both paths that serve boot files: `encoded` is
/// the path below `/boot/` as the request carried it, `root` the canonical boot root.
/// Percent-decoded (as UTF-8), `..` and absolute components refused as ServeDir does, then
/// resolved through symbolic links and refused if that leaves the root, as TFTP does.
pub fn lookup(root: &Path, encoded: &str) -> Lookup {
    let Some(relative) = relative(encoded) else {
        tracing::debug!(path = encoded, "boot path refused");
        return Lookup::Refused;
    };
    match std::fs::canonicalize(root.join(&relative)) {
        Ok(target) if target.starts_with(root) => Lookup::Inside(target),
        Ok(_) => {
            tracing::warn!(path = ?relative, "boot file outside the boot root refused");
            Lookup::Refused
        }
        Err(_) => Lookup::Missing,
    }
}

/// The lexical half of [`lookup`]: the decoded relative path, or `None` if it may not be
/// looked up at all.
pub fn relative(encoded: &str) -> Option<PathBuf> {
    let decoded = percent_encoding::percent_decode_str(encoded)
        .decode_utf8()
        .ok()?;
    if decoded.contains('\0') {
        return None;
    }
    let mut out = PathBuf::new();
    for c in Path::new(decoded.trim_start_matches('/')).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(head: &str) -> Request {
        match peek(head.as_bytes()) {
            Peek::Ours(r, n) => {
                assert_eq!(n, head.len());
                r
            }
            other => panic!("{head:?}: {other:?}"),
        }
    }

    #[test]
    fn a_plain_get_is_ours_with_its_range_and_keep_alive() {
        let r = ours("GET /boot/a%20b/x.efi?v=1 HTTP/1.1\r\nHost: x\r\nRange: bytes=5-9\r\n\r\n");
        assert_eq!(r.method, Method::Get);
        assert_eq!(r.path, "a%20b/x.efi");
        assert_eq!(r.range, Some(ByteRange::FromTo(5, 9)));
        assert!(r.keep_alive);
        let r = ours("HEAD /boot/k HTTP/1.1\nConnection: keep-alive, Close\n\n");
        assert_eq!(r.method, Method::Head);
        assert!(!r.keep_alive);
        assert!(!ours("GET /boot/k HTTP/1.0\r\n\r\n").keep_alive);
        // What the tests' own client sends with every request.
        let r = ours(
            "GET /boot/k HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(r.range, None);
    }

    #[test]
    fn partial_heads_wait_and_pipelined_bytes_stay_in_the_buffer() {
        for part in [
            "G",
            "GET /bo",
            "HEAD /boot/",
            "GET /boot/x HTTP/1.1\r\nHost: y\r\n",
        ] {
            assert_eq!(peek(part.as_bytes()), Peek::NeedMore, "{part:?}");
        }
        let two = "GET /boot/a HTTP/1.1\r\n\r\nGET /boot/b HTTP/1.1\r\n\r\n";
        let Peek::Ours(r, n) = peek(two.as_bytes()) else {
            panic!("first of two")
        };
        assert_eq!((r.path.as_str(), n), ("a", two.len() / 2));
    }

    #[test]
    fn anything_else_is_handed_over_as_soon_as_it_shows() {
        for head in [
            "POST /boot/x HTTP/1.1\r\n\r\n",
            "GET /ipxe/52:54:00:00:00:01 HTTP/1.1\r\n\r\n",
            "GET /api/v1/machines HTTP/1.1\r\n\r\n",
            "GET /bootx HTTP/1.1\r\n\r\n",
            "GET /boot HTTP/1.1\r\n\r\n",
            "\r\nGET /boot/x HTTP/1.1\r\n\r\n",
            "GET /x",
            "GET /boot/x HTTP/1.1\r\nRange: bytes=0-1,5-6\r\n\r\n",
            "GET /boot/x HTTP/1.1\r\nRange: bytes=9-1\r\n\r\n",
            "GET /boot/x HTTP/1.1\r\nRange: items=1-2\r\n\r\n",
            "GET /boot/x HTTP/1.1\r\nRange: bytes=1-2\r\nRange: bytes=3-4\r\n\r\n",
            "GET /boot/x HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "GET /boot/x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            "GET /boot/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /boot/x HTTP/1.1\r\nIf-None-Match: \"a\"\r\n\r\n",
            "GET /boot/x HTTP/1.1\r\nIf-Range: \"a\"\r\nRange: bytes=1-\r\n\r\n",
            "GET /boot/x HTTP/1.1\r\nIf-Modified-Since: Sunday, 06-Nov-94 08:49:37 GMT\r\n\r\n",
        ] {
            assert_eq!(peek(head.as_bytes()), Peek::Handoff, "{head:?}");
        }
    }

    #[test]
    fn broken_heads_that_look_like_ours_are_bad_requests() {
        for (head, bad) in [
            ("GET /boot/x HTTP/2.0\r\n\r\n", BadHead::RequestLine),
            ("GET /boot/x  HTTP/1.1\r\n\r\n", BadHead::RequestLine),
            ("GET /boot/\x01 HTTP/1.1\r\n\r\n", BadHead::RequestLine),
            ("GET /boot/x HTTP/1.1\r\nNo colon\r\n\r\n", BadHead::Header),
            (
                "GET /boot/x HTTP/1.1\r\nBad name: x\r\n\r\n",
                BadHead::Header,
            ),
            ("GET /boot/x HTTP/1.1\r\nA: \x00\r\n\r\n", BadHead::Header),
            (
                "GET /boot/x HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
                BadHead::Header,
            ),
        ] {
            assert_eq!(peek(head.as_bytes()), Peek::Bad(bad), "{head:?}");
        }
        let many = format!("GET /boot/x HTTP/1.1\r\n{}\r\n", "A: b\r\n".repeat(101));
        assert_eq!(peek(many.as_bytes()), Peek::Bad(BadHead::TooLarge));
        let huge = format!("GET /boot/x HTTP/1.1\r\nA: {}", "b".repeat(MAX_HEAD));
        assert_eq!(peek(huge.as_bytes()), Peek::Bad(BadHead::TooLarge));
        assert_eq!(BadHead::TooLarge.status(), 431);
    }

    #[test]
    fn ranges_resolve_against_the_file_size() {
        let meta = FileMeta {
            len: 100,
            modified: None,
        };
        let req = |range| Request {
            method: Method::Get,
            path: "x".into(),
            range,
            if_modified_since: None,
            keep_alive: true,
        };
        let a = |r: &str| answer(&req(parse_range(r)), Some(&meta));
        let part = |start, end| Answer::Partial { start, end };
        assert_eq!(a("bytes=0-9"), part(0, 9));
        assert_eq!(a("bytes=90-200"), part(90, 99));
        assert_eq!(a("bytes=95-"), part(95, 99));
        assert_eq!(a("bytes=-10"), part(90, 99));
        assert_eq!(a("bytes=-1000"), part(0, 99));
        assert_eq!(a(" bytes= 1 - 2 "), part(1, 2));
        assert_eq!(a("bytes=100-"), Answer::Unsatisfiable);
        assert_eq!(a("bytes=-0"), Answer::Unsatisfiable);
        assert_eq!(answer(&req(None), Some(&meta)), Answer::Full);
        assert_eq!(answer(&req(None), None), Answer::NotFound);
        let empty = FileMeta { len: 0, ..meta };
        assert_eq!(
            answer(&req(parse_range("bytes=0-")), Some(&empty)),
            Answer::Unsatisfiable
        );
        assert_eq!(part(90, 99).body(Method::Get, &meta), Some((90, 10)));
        assert_eq!(part(90, 99).body(Method::Head, &meta), None);
        for bad in [
            "bytes=",
            "bytes=-",
            "bytes=a-1",
            "bytes=1-2,3-4",
            "bytes=+1-2",
        ] {
            assert_eq!(parse_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn heads_carry_servedirs_headers_and_if_modified_since_gives_304() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(784_111_777, 5);
        let meta = FileMeta {
            len: 100,
            modified: Some(t),
        };
        let head = |a: Answer, keep| {
            String::from_utf8(response_head(a, Some(&meta), keep, t)).expect("ASCII")
        };
        let full = head(Answer::Full, true);
        assert!(full.starts_with("HTTP/1.1 200 OK\r\n"), "{full}");
        for h in [
            "content-type: application/octet-stream\r\n",
            "accept-ranges: bytes\r\n",
            "content-length: 100\r\n",
            "last-modified: Sun, 06 Nov 1994 08:49:37 GMT\r\n",
            "etag: \"2ebc98a1.00000005-64\"\r\n",
        ] {
            assert!(full.contains(h), "{h} in {full}");
        }
        assert!(full.ends_with("\r\n\r\n") && !full.contains("connection:"));
        let part = head(Answer::Partial { start: 10, end: 19 }, false);
        assert!(part.contains("content-range: bytes 10-19/100\r\ncontent-length: 10\r\n"));
        assert!(part.contains("connection: close\r\n"));
        let none = head(Answer::Unsatisfiable, true);
        assert!(
            none.starts_with("HTTP/1.1 416 ") && none.contains("content-range: bytes */100\r\n")
        );

        let mut req = Request {
            method: Method::Get,
            path: "x".into(),
            range: Some(ByteRange::From(1)),
            if_modified_since: parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            keep_alive: true,
        };
        assert_eq!(answer(&req, Some(&meta)), Answer::NotModified);
        req.if_modified_since = parse_http_date("Sun, 06 Nov 1994 08:49:36 GMT");
        assert_eq!(
            answer(&req, Some(&meta)),
            Answer::Partial { start: 1, end: 99 }
        );
    }

    #[test]
    fn http_dates_round_trip() {
        assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(http_date(1_709_164_800), "Thu, 29 Feb 2024 00:00:00 GMT");
        for t in [0, 784_111_777, 1_709_164_800, 4_102_444_799] {
            assert_eq!(parse_http_date(&http_date(t)), Some(t));
        }
        for bad in [
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 06 Nov 94 08:49:37 GMT",
            "Sun, 06 Nox 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 24:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(parse_http_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn paths_are_decoded_and_never_climb() {
        assert_eq!(relative("a%20b/./c"), Some(PathBuf::from("a b/c")));
        assert_eq!(
            relative("up%2Fsecret.txt"),
            Some(PathBuf::from("up/secret.txt"))
        );
        for bad in [
            "../x",
            "a/../../x",
            "%2E%2E/x",
            "a%2F..%2Fx",
            "%ff",
            "a%00b",
        ] {
            assert_eq!(relative(bad), None, "{bad}");
        }
        // Absolute after decoding: a leading slash is the root's, not the file system's.
        assert_eq!(relative("%2Fetc/passwd"), Some(PathBuf::from("etc/passwd")));
    }

    #[test]
    fn lookups_stay_inside_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("boot");
        std::fs::create_dir_all(&root).expect("root");
        std::fs::write(root.join("ok"), b"x").expect("file");
        std::fs::write(dir.path().join("secret"), b"x").expect("file");
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("escape")).expect("link");
        let root = std::fs::canonicalize(&root).expect("canonical");
        assert_eq!(lookup(&root, "ok"), Lookup::Inside(root.join("ok")));
        assert_eq!(lookup(&root, "escape"), Lookup::Refused);
        assert_eq!(lookup(&root, "../secret"), Lookup::Refused);
        assert_eq!(lookup(&root, "nothing"), Lookup::Missing);
    }
}
