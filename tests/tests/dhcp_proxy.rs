//! proxyDHCP beside the site's DHCP server: dnsmasq (in its own namespace) leases the
//! address, Stork in proxy mode answers the PXE client with boot information only, on
//! port 67 and on the PXE boot server port 4011. A UEFI HTTP-boot client asking beside it
//! gets a proxy offer with the `http://` URL of its network boot program and option 60
//! `HTTPClient` (what EDK2's HTTP boot takes as a proxy offer with a URI).

mod dhcp_common;

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use dhcp_common::{appliance_with, counter, run_ok};
use stork_lab::{Lab, Spawned, wait_for};
use stork_tests::lab_dir;

const MAC: [u8; 6] = [0x52, 0x54, 0, 0x55, 0, 1];

const PXE_XID: [u8; 4] = [0xde, 0xad, 0xbe, 0xef];
const HTTP_XID: [u8; 4] = [0xde, 0xad, 0xbe, 0xf0];

/// A BOOTREQUEST from MAC with the given DHCP message type, option 60 as a BIOS PXE ROM
/// sends it, option 93 = 0, and the broadcast flag (so dnsmasq broadcasts its offer too).
fn pxe_packet(kind: u8, ciaddr: Ipv4Addr) -> Vec<u8> {
    boot_request(
        kind,
        ciaddr,
        PXE_XID,
        b"PXEClient:Arch:00000:UNDI:002001",
        0,
    )
}

/// A DISCOVER as OVMF's HTTP boot sends it (option 60 `HTTPClient`, option 93 = 16).
fn http_boot_discover() -> Vec<u8> {
    let class = b"HTTPClient:Arch:00016:UNDI:003000";
    boot_request(1, Ipv4Addr::UNSPECIFIED, HTTP_XID, class, 16)
}

fn boot_request(kind: u8, ciaddr: Ipv4Addr, xid: [u8; 4], class: &[u8], arch: u8) -> Vec<u8> {
    let mut p = vec![0u8; 240];
    p[0] = 1;
    p[1] = 1;
    p[2] = 6;
    p[4..8].copy_from_slice(&xid);
    p[10] = 0x80;
    p[12..16].copy_from_slice(&ciaddr.octets());
    p[28..34].copy_from_slice(&MAC);
    p[236..240].copy_from_slice(&[99, 130, 83, 99]);
    p.extend_from_slice(&[53, 1, kind]);
    p.extend_from_slice(&[60, class.len() as u8]);
    p.extend_from_slice(class);
    p.extend_from_slice(&[93, 2, 0, arch, 255]);
    p
}

#[derive(Debug)]
struct Answer {
    xid: [u8; 4],
    kind: u8,
    yiaddr: Ipv4Addr,
    siaddr: Ipv4Addr,
    server_id: Option<Ipv4Addr>,
    file: String,
    class: String,
}

fn parse(p: &[u8]) -> Option<Answer> {
    if p.len() < 240 || p[0] != 2 || p[236..240] != [99, 130, 83, 99] {
        return None;
    }
    let ip = |o: usize| Ipv4Addr::new(p[o], p[o + 1], p[o + 2], p[o + 3]);
    let mut a = Answer {
        xid: [p[4], p[5], p[6], p[7]],
        kind: 0,
        yiaddr: ip(16),
        siaddr: ip(20),
        server_id: None,
        file: String::from_utf8_lossy(&p[108..236])
            .trim_end_matches('\0')
            .to_string(),
        class: String::new(),
    };
    let mut i = 240;
    while i + 1 < p.len() && p[i] != 255 {
        if p[i] == 0 {
            i += 1;
            continue;
        }
        let (code, len) = (p[i], usize::from(p[i + 1]));
        let v = p.get(i + 2..i + 2 + len)?;
        match code {
            53 => a.kind = v[0],
            54 if len == 4 => a.server_id = Some(Ipv4Addr::new(v[0], v[1], v[2], v[3])),
            60 => a.class = String::from_utf8_lossy(v).into_owned(),
            67 => a.file = String::from_utf8_lossy(v).into_owned(),
            _ => {}
        }
        i += 2 + len;
    }
    Some(a)
}

fn collect(sock: &UdpSocket, wait: Duration) -> Vec<Answer> {
    let mut got = Vec::new();
    let end = Instant::now() + wait;
    let mut buf = [0u8; 1500];
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("read timeout");
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => got.extend(parse(&buf[..n])),
            Err(_) => break,
        }
    }
    got
}

#[test]
#[ignore = "needs root and dnsmasq: run `cargo xtask test`"]
fn a_pxe_client_gets_its_address_from_dnsmasq_and_its_boot_file_from_stork() {
    let mut lab = Lab::new("dhcp_proxy", &lab_dir()).unwrap();
    let appliance = appliance_with(&lab, "[dhcp]\nmode = \"proxy\"\n");
    // The site's DHCP server.
    let site = lab.add_host_at("site", "10.77.0.2/24").unwrap();
    let mut cmd = site.command("dnsmasq");
    cmd.args([
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--port=0",
        "--interface=eth0",
        "--bind-interfaces",
        "--no-ping",
        "--log-dhcp",
        "--log-facility=-",
        "--dhcp-range=10.77.0.150,10.77.0.160,255.255.255.0,1h",
    ])
    .arg(format!(
        "--dhcp-leasefile={}",
        lab.dir().join("dnsmasq.leases").display()
    ))
    .arg(format!(
        "--pid-file={}",
        lab.dir().join("dnsmasq.pid").display()
    ));
    let dnsmasq = Spawned::start("dnsmasq", cmd, &lab.dir().join("dnsmasq.log")).unwrap();
    wait_for(
        "dnsmasq to listen",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            let out = run_ok(site.command("ss").args(["-Hlun", "sport = :67"]));
            Ok((!out.trim().is_empty()).then_some(()))
        },
    )
    .unwrap();

    // The PXE client: a UDP socket on port 68 in a namespace of its own. It needs a
    // route for the limited broadcast; its address is the one dnsmasq will give it.
    let client = lab.add_host("pxe").unwrap();
    run_ok(
        client
            .command("ip")
            .args(["route", "add", "255.255.255.255", "dev", "eth0"]),
    );
    let probe = lab.dir().join("pxe-client");
    let exe = std::env::current_exe().unwrap();
    // Run this test binary's helper mode inside the client namespace.
    let out = Command::new("ip")
        .args(["netns", "exec", &client.netns])
        .arg(&exe)
        .args([
            "--exact",
            "pxe_client_helper",
            "--include-ignored",
            "--nocapture",
        ])
        .env("STORK_PXE_HELPER_OUT", &probe)
        .output()
        .unwrap();
    let report = std::fs::read_to_string(&probe).unwrap_or_default();
    assert!(
        out.status.success() && report.starts_with("Ok("),
        "helper failed: {}\n{}\nreport: {report}\n--- dnsmasq ---\n{}\n--- stork ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        dnsmasq.log_tail(20),
        appliance.log_tail(20)
    );
    assert!(
        counter(&appliance, "proxy_replies") >= 2,
        "offer on 67 and ACK on 4011"
    );
    assert_eq!(counter(&appliance, "acks"), 0, "proxy mode leases nothing");
}

/// Runs inside the client namespace (started by the test above); a no-op otherwise.
#[test]
#[ignore = "helper of the proxy test"]
fn pxe_client_helper() {
    let Some(out) = std::env::var_os("STORK_PXE_HELPER_OUT") else {
        return;
    };
    let result = pxe_client();
    std::fs::write(&out, format!("{result:?}")).unwrap();
    result.unwrap();
}

fn pxe_client() -> Result<String, String> {
    let sock = UdpSocket::bind("0.0.0.0:68").map_err(|e| e.to_string())?;
    sock.set_broadcast(true).map_err(|e| e.to_string())?;
    for request in [pxe_packet(1, Ipv4Addr::UNSPECIFIED), http_boot_discover()] {
        sock.send_to(&request, "255.255.255.255:67")
            .map_err(|e| e.to_string())?;
    }
    let answers = collect(&sock, Duration::from_secs(3));
    let http = answers
        .iter()
        .find(|a| a.xid == HTTP_XID && a.kind == 2 && a.yiaddr.is_unspecified())
        .ok_or(format!(
            "no proxy offer to the HTTP-boot client: {answers:?}"
        ))?;
    if http.server_id != Some(Ipv4Addr::new(10, 77, 0, 1))
        || !(http.file.starts_with("http://10.77.0.1:") && http.file.ends_with("/boot/snponly.efi"))
        || http.class != "HTTPClient"
    {
        return Err(format!(
            "wrong proxy offer to the HTTP-boot client: {http:?}"
        ));
    }
    let http = http.file.clone();
    let answers: Vec<Answer> = answers.into_iter().filter(|a| a.xid == PXE_XID).collect();
    let lease = answers
        .iter()
        .find(|a| a.kind == 2 && !a.yiaddr.is_unspecified())
        .ok_or(format!("no address offer: {answers:?}"))?;
    if lease.server_id != Some(Ipv4Addr::new(10, 77, 0, 2)) {
        return Err(format!("the address offer is not dnsmasq's: {lease:?}"));
    }
    let boot = answers
        .iter()
        .find(|a| a.kind == 2 && a.yiaddr.is_unspecified())
        .ok_or(format!("no proxy offer: {answers:?}"))?;
    if boot.server_id != Some(Ipv4Addr::new(10, 77, 0, 1))
        || boot.siaddr != Ipv4Addr::new(10, 77, 0, 1)
        || boot.file != "undionly.kpxe"
        || boot.class != "PXEClient"
    {
        return Err(format!("wrong proxy offer: {boot:?}"));
    }
    // PXE 2.1: with the address from dnsmasq, ask the boot server on port 4011.
    let ip = lease.yiaddr;
    let status = Command::new("ip")
        .args(["addr", "add", &format!("{ip}/24"), "dev", "eth0"])
        .status()
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err("cannot configure the leased address".into());
    }
    drop(sock);
    let s4011 = UdpSocket::bind(SocketAddrV4::new(ip, 68)).map_err(|e| e.to_string())?;
    s4011
        .send_to(&pxe_packet(3, ip), "10.77.0.1:4011")
        .map_err(|e| e.to_string())?;
    let acks = collect(&s4011, Duration::from_secs(3));
    let ack = acks
        .iter()
        .find(|a| a.kind == 5)
        .ok_or(format!("no ACK from port 4011: {acks:?}"))?;
    if ack.file != "undionly.kpxe" {
        return Err(format!("wrong 4011 ACK: {ack:?}"));
    }
    Ok(format!(
        "ok: address {ip} from dnsmasq, boot file {} from Stork; HTTP boot: {}",
        boot.file, http
    ))
}
