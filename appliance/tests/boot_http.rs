//! Boot files over plain HTTP, answered by the listener's own `sendfile` responder (issue
//! 18), checked with curl: whole files byte for byte, ranges, HEAD, conditional requests,
//! refusals, a keep-alive connection that goes on to other routes (hyper's), and a client
//! that stops reading. Hosts are loopback addresses (127.0.0.2 is "the attacker").

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Options, Server, connect_from};
use stork_lab::wait_for;

const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// Deterministic bytes that do not repeat in short periods (a range off by one shows).
fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// What one curl run gave: status of each URL, the response headers (lower case), the body.
struct Fetched {
    status: Vec<u16>,
    headers: String,
    body: Vec<u8>,
}

/// curl with `args`, body to a file, headers dumped; `-w` prints each URL's status.
fn curl(dir: &Path, args: &[&str]) -> Fetched {
    let (body, headers) = (dir.join("curl.body"), dir.join("curl.headers"));
    let _ = std::fs::remove_file(&body);
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "-w", "%{http_code}\n", "-D"])
        .arg(&headers)
        .arg("-o")
        .arg(&body)
        .args(args)
        .output()
        .expect("curl runs");
    let status = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse().unwrap_or(0))
        .collect();
    Fetched {
        status,
        headers: std::fs::read_to_string(&headers)
            .unwrap_or_default()
            .to_ascii_lowercase(),
        body: std::fs::read(&body).unwrap_or_default(),
    }
}

#[test]
fn boot_files_are_served_whole_in_ranges_and_by_head_and_refused_outside_the_root() {
    let server = Server::start(Options::default());
    let tmp = tempfile::tempdir().expect("tempdir");
    let big = content(3 << 20, 1);
    server.boot_file("images/big.bin", &big);
    server.boot_file("with space.txt", b"spaced");
    let outside = server.dir.path().join("secret.txt");
    std::fs::write(&outside, "the appliance's own file").expect("outside file");
    let boot = server.data_dir().join("boot");
    std::os::unix::fs::symlink(&outside, boot.join("escape.txt")).expect("symlink");
    let url = |p: &str| format!("{}/boot/{p}", server.plain_base());
    let get = |p: &str, extra: &[&str]| {
        let u = url(p);
        let mut args: Vec<&str> = extra.to_vec();
        args.push(&u);
        curl(tmp.path(), &args)
    };

    // Whole, byte for byte, with ServeDir's headers.
    let f = get("images/big.bin", &[]);
    assert_eq!(f.status, [200]);
    assert!(f.body == big, "the downloaded file differs");
    for h in [
        &format!("content-length: {}\r\n", big.len()),
        "content-type: application/octet-stream\r\n",
        "accept-ranges: bytes\r\n",
        "last-modified: ",
        "etag: \"",
    ] {
        assert!(f.headers.contains(h), "{h} in {}", f.headers);
    }

    // Ranges: a-b, a-, -n; one past the end is unsatisfiable.
    let len = big.len();
    for (range, start, end) in [
        ("100-199", 100, 199),
        ("3000000-", 3_000_000, len - 1),
        ("-10", len - 10, len - 1),
        ("0-99999999", 0, len - 1),
    ] {
        let f = get("images/big.bin", &["-r", range]);
        assert_eq!(f.status, [206], "{range}");
        assert!(f.body == big[start..=end], "range {range}: wrong bytes");
        let want = format!("content-range: bytes {start}-{end}/{len}\r\n");
        assert!(f.headers.contains(&want), "{want} in {}", f.headers);
    }
    let f = get("images/big.bin", &["-r", &format!("{len}-")]);
    assert_eq!(f.status, [416]);
    assert!(f.headers.contains(&format!("content-range: bytes */{len}")));
    // Several ranges are ServeDir's to refuse, as before.
    assert_eq!(get("images/big.bin", &["-r", "0-1,5-6"]).status, [416]);

    // HEAD: the length, no body (curl -I writes the head where the body would go; a raw
    // socket shows nothing follows it).
    let f = get("images/big.bin", &["-I"]);
    assert_eq!(f.status, [200]);
    assert!(f.headers.contains(&format!("content-length: {len}\r\n")));
    let answer = raw(
        server.port,
        b"HEAD /boot/images/big.bin HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with(b"HTTP/1.1 200 OK\r\n"));
    assert!(answer.ends_with(b"\r\n\r\n"), "a body after HEAD");
    // If-Modified-Since with the file's own date (as sent: dates are case-sensitive): not
    // modified.
    let head = String::from_utf8_lossy(&answer);
    let last_modified = head
        .lines()
        .find_map(|l| l.strip_prefix("last-modified: "))
        .expect("last-modified");
    let ims = format!("If-Modified-Since: {last_modified}");
    let f = get("images/big.bin", &["-H", &ims]);
    assert_eq!(f.status, [304]);
    assert!(f.body.is_empty());

    // Percent-decoding; missing files, directories, links out of the root and `..`.
    let f = get("with%20space.txt", &[]);
    assert_eq!(
        (f.status.as_slice(), f.body.as_slice()),
        (&[200][..], &b"spaced"[..])
    );
    for p in [
        "missing.bin",
        "images",
        "images/",
        "",
        "escape.txt",
        "../secret.txt",
        "%2e%2e/secret.txt",
        "images/%2E%2E/%2E%2E/secret.txt",
    ] {
        let f = get(p, &["--path-as-is"]);
        assert_eq!(f.status, [404], "/boot/{p}");
        assert!(!String::from_utf8_lossy(&f.body).contains("appliance's own"));
    }
    // And a request head that is broken gets a 400 and a close.
    let answer = raw(
        server.port,
        b"GET /boot/images/big.bin HTTP/1.1\r\nNo colon here\r\n\r\n",
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
}

/// `request` on a fresh connection to the plain port; everything read until it closes.
fn raw(port: u16, request: &[u8]) -> Vec<u8> {
    let mut s = connect_from(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    s.write_all(request).expect("send");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    answer
}

#[test]
fn a_keep_alive_connection_goes_on_from_boot_files_to_other_routes() {
    let server = Server::start(Options::default());
    let file = content(200 << 10, 2);
    server.boot_file("nbp.efi", &file);
    let base = server.plain_base();
    let urls = [
        format!("{base}/boot/nbp.efi"),
        format!("{base}/boot/nbp.efi"),
        format!("{base}/ipxe/52:54:00:12:34:56"),
        // Hyper's from here on: ServeDir answers it the same.
        format!("{base}/boot/nbp.efi"),
        format!("{base}/api/v1/openapi.json"),
    ];
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "30",
            "-w",
            "%{http_code} %{num_connects} %{size_download}\n",
        ])
        .args(urls.iter().flat_map(|u| ["-o", "/dev/null", u.as_str()]))
        .output()
        .expect("curl runs");
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let n = file.len();
    // One connection (only the first URL connects); the API answers over plain HTTP that it
    // wants HTTPS (403), as it did before.
    assert_eq!(lines.len(), 5, "{out:?}");
    assert_eq!(lines[0], format!("200 1 {n}"), "{lines:?}");
    assert_eq!(lines[1], format!("200 0 {n}"), "{lines:?}");
    assert!(lines[2].starts_with("200 0 "), "{lines:?}");
    assert_eq!(lines[3], format!("200 0 {n}"), "{lines:?}");
    assert!(lines[4].starts_with("403 0 "), "{lines:?}");

    // Pipelined on one socket: a boot file, then a script, answered in order.
    let answer = raw(
        server.port,
        b"GET /boot/nbp.efi HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\n\
          GET /ipxe/52:54:00:12:34:56 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 206 "), "{text}");
    let second = text.find("HTTP/1.1 200 OK").expect("the script's answer");
    assert!(text[second..].contains("#!ipxe"), "{text}");
    let body_start = text.find("\r\n\r\n").expect("a head") + 4;
    assert_eq!(&answer[body_start..body_start + 10], &file[..10]);
}

#[test]
fn a_client_that_stops_reading_gives_its_slot_back() {
    let server = Server::start(Options {
        http: "max_connections_per_ip = 1\nbody_timeout = 1\nheader_timeout = 1\n",
        ..Options::default()
    });
    let tmp = tempfile::tempdir().expect("tempdir");
    // Far more than the socket buffers on both sides hold.
    server.boot_file("big.bin", &content(64 << 20, 3));
    server.boot_file("ok.txt", b"a boot file");
    let ok = format!("{}/boot/ok.txt", server.plain_base());
    let from_attacker = || curl(tmp.path(), &["--interface", "127.0.0.2", &ok]).status;

    let mut stalled = connect_from(ATTACKER, server.port);
    stalled
        .write_all(b"GET /boot/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    // The attacker's one slot is taken (once the server has the request, its answer starts).
    let mut first = [0u8; 16];
    stalled.read_exact(&mut first).expect("the answer starts");
    assert_eq!(&first[..12], b"HTTP/1.1 200");
    assert_ne!(from_attacker(), [200], "a second connection within the cap");
    // Everyone else is served meanwhile.
    assert_eq!(curl(tmp.path(), &[&ok]).status, [200]);
    // The server closes the stalled one after its idle deadline (one second; allow a loaded
    // machine thirty) and the slot serves again.
    wait_for(
        "the stalled connection's slot",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || Ok((from_attacker() == [200]).then_some(())),
    )
    .expect("the slot is given back");
    let stats = server.client().stats().expect("stats");
    assert!(stats.http["refused_per_ip"] >= 1, "{:?}", stats.http);
    let logs = server.logs();
    assert!(logs.contains("took nothing"), "the stall is logged");
}

#[test]
fn more_files_at_once_than_the_blocking_pool_share_all_arrive_whole() {
    let server = Server::start(Options::default());
    // Far more than the socket buffers hold: a send cannot finish while its client does not
    // read, so while none reads, the first 32 hold the blocking pool's share of sends and
    // the rest go out on the runtime.
    let file = content(32 << 20, 5);
    server.boot_file("big.bin", &file);
    let mut conns: Vec<_> = (0..40)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
            c.write_all(b"GET /boot/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
                .expect("send");
            c
        })
        .collect();
    // The requests are written in turn and the server reads them concurrently: read nothing
    // until it has taken all 40, or the first body read frees a pool slot for a late request.
    let runtime_sends = || {
        let stats = server.client().stats().expect("stats");
        stats.http["boot_sends_on_runtime"]
    };
    wait_for(
        "the eight sends beyond the pool's share on the runtime",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || Ok((runtime_sends() >= 8).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e}: {}", runtime_sends()));
    for (n, c) in conns.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            c.read_exact(&mut byte).expect("the head");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{n}: {head}");
        assert!(
            head.contains(&format!("content-length: {}", file.len())),
            "{n}: {head}"
        );
        let mut body = vec![0u8; file.len()];
        c.read_exact(&mut body).expect("the body");
        assert!(body == file, "connection {n}: the body differs");
    }
    assert_eq!(runtime_sends(), 8, "no send counted twice");
}
