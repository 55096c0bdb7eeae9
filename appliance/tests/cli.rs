//! The `stork` binary as a newcomer meets it: help texts, the message on a machine without
//! the lab's interface, `stork image import`, and the health the daemon reports.
// Test helpers: a failure is a test failure, so they unwrap.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Output};

use common::{BIN, Options, Server};
use stork_proto::ImageRole;
use stork_proto::api::{
    BootResource, HealthReport, Machine, MachineFilter, NewMachine, PowerConfig, ResourceFile,
    ServiceState,
};

fn stork(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("STORK_URL")
        .env_remove("STORK_TOKEN")
        // Every test server's certificate ([`common::test_cert`]).
        .env(
            "STORK_FINGERPRINT",
            common::test_cert().fingerprint.to_string(),
        )
        // The message a user reads, not a backtrace.
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("running stork")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn serve_help_lists_no_client_options() {
    for args in [&["serve", "--help"][..], &["config", "check", "--help"]] {
        let out = stork(args);
        assert!(out.status.success());
        let help = text(&out);
        assert!(
            help.contains("--interface") || help.contains("--config"),
            "{help}"
        );
        assert!(!help.contains("--url"), "stork {args:?}: {help}");
        assert!(!help.contains("--token"), "stork {args:?}: {help}");
    }
    // The client commands have them, before or after the command.
    let help = text(&stork(&["machine", "list", "--help"]));
    assert!(help.contains("--url") && help.contains("--token"), "{help}");
}

#[test]
fn every_command_has_help_text() {
    let out = stork(&["machine", "--help"]);
    let help = text(&out);
    for cmd in ["mark-broken", "mark-fixed", "delete"] {
        let line = help
            .lines()
            .find(|l| l.trim_start().starts_with(cmd))
            .unwrap_or_else(|| panic!("no {cmd} in {help}"));
        assert!(
            line.trim_start().len() > cmd.len() + 10,
            "{cmd} has no help text: {line:?}"
        );
    }
    for cmd in ["list", "import", "register"] {
        let help = text(&stork(&["image", "--help"]));
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(cmd) && l.len() > cmd.len() + 12),
            "image {cmd}: {help}"
        );
    }
}

#[test]
fn serve_without_the_lab_interface_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let out = stork(&[
        "serve",
        "--interface",
        "nosuch0",
        "--data-dir",
        &dir.path().to_string_lossy(),
    ]);
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(
        msg.contains("there is no interface \"nosuch0\" on this machine"),
        "{msg}"
    );
    assert!(msg.contains("--interface NAME"), "{msg}");
    assert!(msg.contains("lab's bridge"), "{msg}");
    assert!(msg.contains("Interfaces here:"), "{msg}");
    // A user's error, not a crash: no backtrace even with RUST_BACKTRACE set.
    assert!(!msg.contains("Stack backtrace"), "{msg}");
}

/// A `stork-image os` output directory with one small image.
fn image_dir(sum: Option<&str>) -> tempfile::TempDir {
    use sha2::Digest;
    let d = tempfile::tempdir().unwrap();
    let tar = b"not really a tar, but checked like one".as_slice();
    let raw = vec![0x5au8; 3 << 20];
    std::fs::write(d.path().join("root.tar.zst"), tar).unwrap();
    std::fs::write(d.path().join("disk.raw.zst"), &raw).unwrap();
    let hex = |b: &[u8]| hex::encode(sha2::Sha256::digest(b));
    let manifest = serde_json::json!({"images": [{
    "name": "tiny", "kind": "os", "arch": "amd64", "inputs": {"suite": "bookworm"},
    "artifacts": [
        {"name": "root.tar.zst", "kind": "root_tar_zst", "size": tar.len(),
         "sha256": hex(tar), "compression": "zstd-15"},
        {"name": "disk.raw.zst", "kind": "raw_disk_zst", "size": raw.len(),
         "sha256": sum.map_or_else(|| hex(&raw), str::to_string), "compression": "zstd-15"}
    ]}]});
    std::fs::write(d.path().join("manifest.json"), manifest.to_string()).unwrap();
    d
}

#[test]
fn image_import_checks_copies_and_registers_in_one_step() {
    let server = Server::start(Options::default());
    let dir = image_dir(None);
    let data = server.data_dir();
    let out = stork(&[
        "image",
        "import",
        &dir.path().to_string_lossy(),
        "--data-dir",
        &data.to_string_lossy(),
        "--url",
        &server.base(),
        "--token",
        &server.token,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("imported tiny (2 files"),
        "{}",
        text(&out)
    );
    let list = stork(&[
        "--url",
        &server.base(),
        "--token",
        &server.token,
        "image",
        "list",
        "--json",
    ]);
    let v: Vec<BootResource> = serde_json::from_slice(&list.stdout).unwrap();
    let files = &v[0].files;
    assert_eq!(v[0].name, "tiny");
    assert_eq!(files[0].role, ImageRole::Tar);
    assert_eq!(files[0].path, "images/tiny/root.tar.zst");
    assert_eq!(files[1].role, ImageRole::Raw);
    // The appliance serves what was copied.
    let served = ureq::get(&format!(
        "{}/boot/images/tiny/disk.raw.zst",
        server.plain_base()
    ))
    .call()
    .unwrap()
    .into_body()
    .read_to_vec()
    .unwrap();
    assert_eq!(
        served,
        std::fs::read(dir.path().join("disk.raw.zst")).unwrap()
    );

    // A file that does not match its manifest is named, and nothing is registered.
    let bad = image_dir(Some(&"ab".repeat(32)));
    let out = stork(&[
        "image",
        "import",
        &bad.path().to_string_lossy(),
        "--name",
        "tiny",
        "--data-dir",
        &server.dir.path().join("other").to_string_lossy(),
        "--url",
        &server.base(),
        "--token",
        &server.token,
    ]);
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(msg.contains("disk.raw.zst: the sha256 is"), "{msg}");
    assert!(msg.contains(&"ab".repeat(32)), "{msg}");
}

#[test]
fn health_reports_every_service_running() {
    let server = Server::start(Options::default());
    let out = stork(&["stats", "--url", &server.base(), "--token", &server.token]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("health ok"), "{t}");
    assert!(t.contains("health.http running restarts=0"), "{t}");
    assert!(t.contains("health.timeouts running restarts=0"), "{t}");
}

/// A service that fails is restarted with backoff while the rest serve on, and the API says
/// so; once the cause is gone it runs again. The failure is real: the DHCP lease journal's
/// path is a directory, so the DHCP service cannot start.
#[test]
fn a_failing_service_is_restarted_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let journal = data.join("dhcp-leases.journal");
    std::fs::create_dir_all(&journal).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("stork.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\ninterface = \"lo\"\naddress = \"127.0.0.1\"\n\
             [http]\nlisten = \"127.0.0.1\"\nport = {port}\n\
             [dhcp]\nrange = [\"127.0.0.100\", \"127.0.0.120\"]\nipv6_ra = false\n\
             [tftp]\nenabled = false\n[tls]\nenabled = false\n"
        ),
    )
    .unwrap();
    let token = String::from_utf8(
        stork(&["token", "create", "--data-dir", &data.to_string_lossy()]).stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--config", &config.to_string_lossy()]);
    let mut server =
        stork_lab::Spawned::start("stork", cmd, &dir.path().join("stork.log")).unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let health = || -> Option<HealthReport> {
        let out = stork(&["stats", "--json", "--url", &url, "--token", &token]);
        serde_json::from_slice::<StatsJson>(&out.stdout)
            .ok()
            .map(|v| v.health)
    };
    let restarts = |h: &HealthReport, service: &str| h.services.get(service).map(|s| s.restarts);
    let failed = stork_lab::wait_for(
        "the DHCP service to fail and be restarted",
        std::time::Duration::from_secs(30),
        std::time::Duration::from_millis(200),
        || Ok(health().filter(|h| restarts(h, "dhcp") >= Some(2))),
    )
    .unwrap();
    assert_eq!(failed.status, "degraded", "{failed:#?}");
    let why = failed.services["dhcp"].last_error.as_deref().unwrap();
    assert!(why.contains("lease journal"), "{why}");
    // The rest of the daemon serves on.
    assert_eq!(
        failed.services["http"].state,
        ServiceState::Running,
        "{failed:#?}"
    );
    assert_eq!(failed.services["http"].restarts, 0, "{failed:#?}");
    assert!(server.exited().is_none());

    // The cause goes away: the next restart succeeds.
    std::fs::remove_dir(&journal).unwrap();
    let back = stork_lab::wait_for(
        "the DHCP service running again",
        std::time::Duration::from_secs(60),
        std::time::Duration::from_millis(200),
        || {
            Ok(health().filter(|h| {
                h.services
                    .get("dhcp")
                    .is_some_and(|s| s.state == ServiceState::Running)
                    && journal.is_file()
            }))
        },
    )
    .unwrap();
    assert!(restarts(&back, "dhcp") >= Some(2));
    let log = std::fs::read_to_string(dir.path().join("stork.log")).unwrap();
    assert!(log.contains("service failed; restarting"), "{log}");
    assert!(!log.contains(&token), "the token leaked into the log");
}

/// `stork stats --json`: the API's counters by service, and the health beside them (only
/// the health is read here).
#[derive(serde::Deserialize)]
struct StatsJson {
    health: HealthReport,
}

/// A table's lines as cells with where each starts and ends (in characters): the CLI's
/// tables put at least two blanks between columns and one at most inside a cell.
fn cells(line: &str) -> Vec<(usize, usize, String)> {
    let chars: Vec<char> = line.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == ' ' {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && !(chars[i] == ' ' && chars.get(i + 1).is_none_or(|c| *c == ' ')) {
            i += 1;
        }
        out.push((start, i, chars[start..i].iter().collect()));
    }
    out
}

/// Checks a table as a person and `awk` read it: the header row, then one row per item, the
/// same number of cells on each, every column starting (or, for `right` ones, ending) at the
/// same place on every line, no borders and no trailing blanks. Returns the rows' cells.
fn read_table(text: &str, header: &[&str], right: &[usize]) -> Vec<Vec<String>> {
    let lines: Vec<&str> = text.lines().collect();
    assert!(!lines.is_empty(), "no table: {text:?}");
    let head = cells(lines[0]);
    let titles: Vec<&str> = head.iter().map(|(_, _, t)| t.as_str()).collect();
    assert_eq!(titles, header, "header row of\n{text}");
    assert_eq!(head[0].0, 0, "the first column starts the line:\n{text}");
    for line in &lines {
        assert_eq!(line.trim_end(), *line, "trailing blanks:\n{text}");
        // ('+' inside a cell is a kernel version's, `6.12.95+deb12-amd64`.)
        assert!(
            !line.contains(['|', '─', '│', '┌', '═'])
                && !line.starts_with('+')
                && !line.contains(" +"),
            "a border:\n{text}"
        );
        let row = cells(line);
        assert_eq!(row.len(), head.len(), "{line:?} in\n{text}");
        for (i, ((start, end, cell), (h_start, h_end, title))) in row.iter().zip(&head).enumerate()
        {
            if right.contains(&i) {
                assert_eq!(
                    end, h_end,
                    "{cell:?} not right-aligned under {title}:\n{text}"
                );
            } else {
                assert_eq!(start, h_start, "{cell:?} not under {title}:\n{text}");
            }
        }
    }
    lines[1..]
        .iter()
        .map(|l| cells(l).into_iter().map(|(_, _, c)| c).collect())
        .collect()
}

#[test]
fn machine_and_image_lists_are_aligned_tables() {
    let server = Server::start(Options::default());
    let api = server.client();
    let base = server.base();
    let client = |args: &[&str]| {
        let mut all = vec!["--url", &base, "--token", &server.token];
        all.extend_from_slice(args);
        let out = stork(&all);
        assert!(out.status.success(), "stork {args:?}: {}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    };

    // Values of different widths, and a machine without a hostname.
    let mut ids = Vec::new();
    for (n, hostname) in [
        (1, Some("n1")),
        (2, Some("a-much-longer-hostname")),
        (3, None),
    ] {
        let m = api
            .create_machine(&NewMachine {
                macs: vec![common::mac(n).parse().unwrap()],
                hostname: hostname.map(str::to_string),
                power: Some(PowerConfig::manual()),
                ..Default::default()
            })
            .unwrap();
        ids.push(m.id);
    }
    let list = client(&["machine", "list"]);
    let rows = read_table(
        &list,
        &[
            "ID", "STATUS", "BOOT MAC", "HOSTNAME", "CPUS", "MEMORY", "DISKS",
        ],
        &[4, 5, 6],
    );
    assert_eq!(rows.len(), 3, "one row per machine:\n{list}");
    for (n, id) in ids.iter().enumerate() {
        let row = rows
            .iter()
            .find(|r| r[0] == *id)
            .unwrap_or_else(|| panic!("no row for {id}:\n{list}"));
        let hostname = ["n1", "a-much-longer-hostname", "-"][n];
        let mac = common::mac(n as u32 + 1);
        assert_eq!(row[1..], ["new", &mac, hostname, "0", "-", "0"], "{list}");
    }

    for (name, arch, files, kernels) in [
        ("tiny", Some("amd64"), &["tar"][..], &[][..]),
        (
            "debian-12-bookworm-generic",
            None,
            &["tar", "raw"],
            &[
                ("stable", "6.1.0-50-amd64"),
                ("backports", "6.12.95+deb12-amd64"),
            ],
        ),
    ] {
        let files: Vec<_> = files
            .iter()
            .map(|role| {
                let path = format!("images/{name}/{role}");
                let (size, sha256) = server.boot_file(&path, role.as_bytes());
                ResourceFile {
                    role: ImageRole::from(*role),
                    path,
                    sha256,
                    size,
                }
            })
            .collect();
        api.register_boot_resource(&BootResource {
            name: name.to_string(),
            kind: "os".to_string(),
            arch: arch.map(str::to_string),
            files,
            kernels: kernels
                .iter()
                .map(|(name, version)| stork_proto::kernel::ImageKernel {
                    name: name.to_string(),
                    version: version.to_string(),
                })
                .collect(),
        })
        .unwrap();
    }
    let list = client(&["image", "list"]);
    let mut rows = read_table(&list, &["NAME", "KIND", "ARCH", "KERNELS", "FILES"], &[]);
    rows.sort();
    assert_eq!(
        rows,
        [
            [
                "debian-12-bookworm-generic",
                "os",
                "-",
                "stable=6.1.0-50-amd64 backports=6.12.95+deb12-amd64",
                "tar=images/debian-12-bookworm-generic/tar raw=images/debian-12-bookworm-generic/raw",
            ],
            ["tiny", "os", "amd64", "-", "tar=images/tiny/tar"],
        ],
        "{list}"
    );

    // `--json` is the API's answer, untouched.
    let json: Vec<Machine> = serde_json::from_str(&client(&["machine", "list", "--json"])).unwrap();
    assert_eq!(json, api.machines(&MachineFilter::default()).unwrap());
}

/// `watch --until-settled` follows a busy machine until it settles, and returns at once for
/// one that is not busy (its replayed history, which starts with `created`, settles
/// nothing).
#[test]
fn watch_until_settled_waits_for_the_busy_status_to_end() {
    let server = Server::start(Options::default());
    let api = server.client();
    let m = api
        .create_machine(&NewMachine {
            macs: vec![common::mac(7).parse().unwrap()],
            power: Some(PowerConfig::manual()),
            ..Default::default()
        })
        .unwrap();
    let id = m.id;
    let watch = || {
        Command::new(BIN)
            .args(server.cli_args())
            .args(["machine", "watch", &id, "--until-settled"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // New: nothing to wait for.
    let out = watch().wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("status: new\n"));

    // Commissioning (a manual machine waits for a person): the watch follows until the
    // abort moves it to its failed status.
    api.commission(&id).unwrap();
    let mut child = watch();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "watch returned while the machine is still commissioning"
    );
    api.abort(&id).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.ends_with("status: failed_commissioning\n"), "{text}");
}

#[test]
fn config_show_prints_the_urls_and_the_fingerprint_clients_pin() {
    let server = Server::start(Options::default());
    let out = stork(&[
        "config",
        "show",
        "--config",
        &server.dir.path().join("stork.toml").to_string_lossy(),
    ]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains(&format!("https://10.77.0.1:{}/api/v1", server.tls_port)),
        "{t}"
    );
    assert!(
        t.contains(&format!("http://10.77.0.1:{}/boot/", server.port)),
        "{t}"
    );
    // What the server serves is what `config show` prints.
    let served = stork_tls::probe(
        "127.0.0.1",
        server.tls_port,
        std::time::Duration::from_secs(5),
    )
    .expect("the served certificate");
    let fp = stork_tls::Fingerprint::of(&served).to_string();
    assert!(t.contains(&format!("fingerprint:  {fp}")), "{t}");
}

#[test]
fn release_flags_that_contradict_each_other_are_refused() {
    let pairs = [
        ["--erase", "--no-erase"],
        ["--no-erase", "--full"],
        ["--no-erase", "--quick"],
        ["--full", "--quick"],
    ];
    for [a, b] in pairs {
        let out = stork(&["machine", "release", "m1", a, b]);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(2), "{a} {b}: {said}");
        assert!(said.contains("cannot be used with"), "{a} {b}: {said}");
    }
    let help = text(&stork(&["machine", "release", "--help"]));
    for flag in ["--no-erase", "--full", "--quick", "erase_on_release"] {
        assert!(help.contains(flag), "{flag}: {help}");
    }
}

/// An HTTPS server on localhost (the test certificate) answering `GET path` with its body
/// from `pages`, 404 otherwise, until the test process ends; its port.
fn key_server(pages: Vec<(&'static str, String)>) -> u16 {
    use std::io::{Read, Write};
    use stork_tls::rustls;
    use stork_tls::rustls::pki_types::pem::PemObject;
    use stork_tls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let cert = common::test_cert();
    let chain = CertificateDer::pem_file_iter(&cert.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&cert.key).unwrap();
    let config = std::sync::Arc::new(
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let conn = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                match tls.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            let head = String::from_utf8_lossy(&head);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let answer = match pages.iter().find(|(p, _)| *p == path) {
                Some((_, body)) => format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                ),
                None => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_string(),
            };
            let _ = tls.write_all(answer.as_bytes());
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
    });
    port
}

#[test]
fn ssh_keys_import_from_gh_style_sources_and_urls_then_delete() {
    const A: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop";
    const B: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 alice@desk";
    let port = key_server(vec![
        ("/alice.keys", format!("{A}\n{B}\n")),
        ("/junk", format!("{A}\n<html>not a key</html>\n")),
    ]);
    let server = Server::start(Options::default());
    let base = server.base();
    let ca = common::test_cert().cert.display().to_string();
    let gh = format!("https://localhost:{port}");
    let run = |args: &[&str]| {
        let mut all = vec!["--url", &base, "--token", &server.token];
        all.extend_from_slice(args);
        Command::new(BIN)
            .args(&all)
            .env(
                "STORK_FINGERPRINT",
                common::test_cert().fingerprint.to_string(),
            )
            .env("STORK_GH_URL", &gh)
            .output()
            .expect("running stork")
    };
    let keys = || server.client().ssh_keys().unwrap();

    let out = run(&["ssh-key", "import", "gh:alice", "--source-ca", &ca]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("2 added, 0 already known"),
        "{}",
        text(&out)
    );
    let mut names: Vec<(String, String)> = keys().into_iter().map(|k| (k.name, k.key)).collect();
    names.sort();
    assert_eq!(
        names,
        [
            ("gh:alice-1".to_string(), A.to_string()),
            ("gh:alice-2".to_string(), B.to_string())
        ]
    );
    // Again, by URL: nothing new.
    let url = format!("{gh}/alice.keys");
    let out = run(&[
        "ssh-key",
        "import",
        &url,
        "--source-ca",
        &ca,
        "--name",
        "alice",
    ]);
    assert!(
        text(&out).contains("0 added, 2 already known"),
        "{}",
        text(&out)
    );

    // Refused, nothing added: a line that is not a key, plain HTTP, a certificate not
    // trusted (the system's CAs do not know the test's), a user that is not one.
    for (args, why) in [
        (
            vec![format!("{gh}/junk"), "--source-ca".into(), ca.clone()],
            "line 2",
        ),
        (
            vec![format!("http://localhost:{port}/alice.keys")],
            "not a key source",
        ),
        (vec!["gh:alice".into()], "localhost"),
        (
            vec!["gh:../etc".into(), "--source-ca".into(), ca.clone()],
            "not a user name",
        ),
        (
            vec![format!("{gh}/nobody"), "--source-ca".into(), ca.clone()],
            "404",
        ),
    ] {
        let mut all = vec!["ssh-key", "import"];
        all.extend(args.iter().map(String::as_str));
        let out = run(&all);
        assert!(!out.status.success(), "{args:?} was taken");
        assert!(text(&out).contains(why), "{args:?}: {}", text(&out));
    }
    assert_eq!(keys().len(), 2);

    // Deleted by id.
    let id = keys()
        .into_iter()
        .find(|k| k.name == "gh:alice-2")
        .unwrap()
        .id;
    let out = run(&["ssh-key", "delete", &id]);
    assert!(out.status.success(), "{}", text(&out));
    let left: Vec<String> = keys().into_iter().map(|k| k.name).collect();
    assert_eq!(left, ["gh:alice-1"]);
}
