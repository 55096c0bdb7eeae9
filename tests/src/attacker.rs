//! A hostile host beside a machine being provisioned (issue 15), shared by the end-to-end
//! tests that commission and deploy: it fetches the machine's boot script, tries the agent
//! routes with a made-up token, sends a 2 MiB report and a flood of reports, and (python3
//! in its namespace) floods DHCPDECLINEs, TFTP read requests asking for a 255 s timeout,
//! and slow HTTP connections. [`bystander_is_served`] checks that ordinary clients on
//! another host are served meanwhile.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use stork_lab::{Appliance, Lab};

/// A host beside the machine (10.77.0.66, no lease) that keeps fetching the machine's boot
/// script while it commissions, and tries the agent routes with what it got.
pub struct Attacker {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Result<Seen>>,
    /// The packet floods and slow connections (python3 in the attacker's namespace).
    flood: stork_lab::Spawned,
}

/// What the attacker's python sends until it is killed: DHCPDECLINEs for every address of
/// the pool from made-up MACs (on a lease nobody holds, or the machine's own), TFTP
/// read requests asking for a 255 s timeout that it never acknowledges, each from a
/// port of its own, and connections to both HTTP ports that send half a request line and
/// stall (slowloris), opened again as the appliance closes them.
const FLOOD: &str = r#"
import os, random, socket, time
random.seed(7)
SERVER = "10.77.0.1"
d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
d.bind(("10.77.0.66", 68))
def decline(ip):
    p = bytearray(236)
    p[0:4] = b"\x01\x01\x06\x00"
    p[4:8] = os.urandom(4)
    p[28:34] = bytes([0x52, 0x54, 0x00, 0xbb, random.randrange(256), random.randrange(256)])
    p += bytes([99, 130, 83, 99, 53, 1, 4, 50, 4]) + socket.inet_aton(ip)
    p += bytes([54, 4]) + socket.inet_aton(SERVER) + b"\xff"
    d.sendto(bytes(p), (SERVER, 67))
rrq = b"\x00\x01undionly.kpxe\x00octet\x00timeout\x00255\x00blksize\x001468\x00"
tftp, slow = [], []
while True:
    for i in range(100, 200):
        decline("10.77.0.%d" % i)
    for _ in range(20):
        t = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        t.sendto(rrq, (SERVER, 69))
        tftp.append(t)
    for s in tftp[:-200]:
        s.close()
    tftp = tftp[-200:]
    for port in (8080, 8443):
        for _ in range(40):
            try:
                s = socket.create_connection((SERVER, port), timeout=1)
                s.send(b"GET /api/v1/machines HT")
                slow.append(s)
            except OSError:
                pass
    slow = slow[-600:]
    time.sleep(1)
"#;

/// What the attacker got.
#[derive(Debug, Default)]
pub struct Seen {
    scripts: usize,
    /// A script that named the machine or carried a token.
    leaked: Option<String>,
    /// Status codes of the agent routes tried with a made-up token.
    agent_answers: Vec<String>,
    /// Status codes of a 2 MiB report and of a flood of reports.
    big_report: String,
    flood: Vec<String>,
}

impl Attacker {
    /// Starts attacking machine `id` (boot MAC `mac`) from 10.77.0.66.
    pub fn start(lab: &mut Lab, id: &str, mac: &str) -> Result<Attacker> {
        let mac = mac.to_string();
        let host = lab.add_host_at("attacker", "10.77.0.66/24")?;
        // Killed when dropped, and with the test process (a failed test leaves none).
        let mut cmd = host.command("python3");
        cmd.args(["-c", FLOOD]);
        let flood = stork_lab::Spawned::start("attacker floods", cmd, &lab.dir().join("flood.log"))
            .context("starting the attacker's floods")?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, id) = (stop.clone(), id.to_string());
        // Scripts on plain HTTP; the agent routes over HTTPS (the attacker checks no
        // certificate: it has nothing to protect).
        let base = "http://10.77.0.1:8080";
        let api = "https://10.77.0.1:8443";
        // curl's output whatever its exit status: a refused upload still prints the code.
        let curl = move |args: &[&str]| -> Result<String> {
            let out = host
                .command("curl")
                .args(["-s", "-k", "-m", "5"])
                .args(args)
                .output()
                .context("running curl in the attacker's namespace")?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let thread = std::thread::spawn(move || -> Result<Seen> {
            let mut seen = Seen::default();
            let big = format!(
                "{{\"boot_mac\":\"{mac}\",\"step\":\"network\",\"ok\":false,\"message\":\"{}\"}}",
                "x".repeat(2 << 20)
            );
            let big_file =
                std::env::temp_dir().join(format!("stork-attacker-{}.json", std::process::id()));
            std::fs::write(&big_file, &big)?;
            let status = ["-o", "/dev/null", "-w", "%{http_code}"];
            seen.big_report = curl(
                &[
                    &status[..],
                    &["-H", "Content-Type: application/json", "--data-binary"],
                    &[&format!("@{}", big_file.display())],
                    &[&format!("{api}/api/v1/agent/report")],
                ]
                .concat(),
            )?;
            let _ = std::fs::remove_file(&big_file);
            let small = format!(
                "{{\"boot_mac\":\"{mac}\",\"step\":\"network\",\"ok\":false,\"message\":\"attacker\"}}"
            );
            // Forty reports in one curl (one process, one kept-alive connection), so that
            // they come faster than the limit refills however slowly processes start on a
            // loaded host.
            let url = format!("{api}/api/v1/agent/report");
            let mut args: Vec<&str> = Vec::new();
            for _ in 0..REPORT_FLOOD {
                args.extend(["-o", "/dev/null"]);
            }
            args.extend([
                "-w",
                "%{http_code}\n",
                "-H",
                "Content-Type: application/json",
                "-d",
                &small,
            ]);
            args.extend(std::iter::repeat_n(url.as_str(), REPORT_FLOOD));
            seen.flood = curl(&args)?.lines().map(str::to_string).collect();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let script = curl(&[&format!("{base}/ipxe/{mac}")])?;
                seen.scripts += 1;
                if script.contains("stork.token") || script.contains(&id) {
                    seen.leaked = Some(script);
                }
                for what in ["task", "released", "deployed"] {
                    let method = if what == "task" { "GET" } else { "POST" };
                    seen.agent_answers.push(curl(
                        &[
                            &status[..],
                            &[
                                "-X",
                                method,
                                "-H",
                                "Authorization: Bearer stork_agent_guess",
                                &format!("{api}/api/v1/agent/{id}/{what}"),
                            ],
                        ]
                        .concat(),
                    )?);
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            Ok(seen)
        });
        Ok(Attacker {
            stop,
            thread,
            flood,
        })
    }

    /// Stops every attack and returns what the attacker got.
    pub fn stop(mut self) -> Result<Seen> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(st) = self.flood.exited() {
            bail!(
                "the attacker's floods ended early ({st}):\n{}",
                self.flood.log_tail(20)
            );
        }
        drop(self.flood);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the attacker thread panicked"))?
    }
}

impl Seen {
    /// Fails unless every attack was refused as it should be.
    pub fn check(&self) -> Result<()> {
        eprintln!(
            "attacker: {} scripts fetched, {} agent calls tried, a 2 MiB report answered {}, {} of {} flooded reports refused",
            self.scripts,
            self.agent_answers.len(),
            self.big_report,
            self.flood.iter().filter(|a| *a == "429").count(),
            self.flood.len()
        );
        if self.scripts == 0 {
            bail!("the attacker fetched no script: {self:?}");
        }
        if let Some(s) = &self.leaked {
            bail!("the attacker got the machine's identity:\n{s}");
        }
        if let Some(a) = self.agent_answers.iter().find(|a| *a != "401") {
            bail!("an agent route answered {a} to a made-up token: {self:?}");
        }
        if self.big_report != "413" {
            bail!("a 2 MiB report was answered {}", self.big_report);
        }
        if !self.flood.iter().any(|a| a == "429") {
            bail!(
                "forty reports in a row were never rate-limited: {:?}",
                self.flood
            );
        }
        Ok(())
    }
}

/// Reports the attacker floods with: twice the limit's burst.
const REPORT_FLOOD: usize = 40;

/// Ordinary clients on a host of their own are served while the attacks go on: a DHCP
/// lease from busybox udhcpc, a boot file from tftp-hpa (byte for byte).
pub fn bystander_is_served(lab: &mut Lab, appliance: &Appliance) -> Result<()> {
    let host = lab.add_host("bystander")?;
    let out = crate::udhcpc(&host, std::path::Path::new("/bin/true"), &[])?;
    if !out.contains("obtained from 10.77.0.1") {
        bail!("the bystander got no lease from the appliance:\n{out}");
    }
    stork_lab::run(host.command("ip").args([
        "addr",
        "add",
        "10.77.0.251/24",
        "dev",
        &host.ifname,
    ]))?;
    let got = lab.dir().join("bystander-undionly.kpxe");
    // tftp-hpa exits 0 even when the transfer fails: the file is the proof.
    stork_lab::run(
        host.command("tftp")
            .args(["-m", "binary", "10.77.0.1", "-c", "get", "undionly.kpxe"])
            .arg(&got),
    )?;
    let fetched = std::fs::read(&got).context("the bystander's TFTP download")?;
    if fetched != std::fs::read(appliance.data_dir.join("boot/undionly.kpxe"))? {
        bail!("the bystander's TFTP download differs from the boot file");
    }
    Ok(())
}

/// After the attack: its floods were refused and counted so, and the appliance knows
/// exactly `machines` machines (the attacker's reports and scripts made none).
pub fn refusals_counted(appliance: &Appliance, machines: usize) -> Result<()> {
    let stats = appliance.stats()?;
    for (service, counter) in [("dhcp", "decline_refused"), ("tftp", "per_client_refused")] {
        if stats.counter(service, counter).unwrap_or(0) == 0 {
            bail!("{service}.{counter} is 0 after the attacker's flood: {stats:?}");
        }
    }
    if stats
        .counters
        .http
        .get("refused_per_ip")
        .copied()
        .unwrap_or(0)
        == 0
    {
        bail!("no slow connection was refused: {:?}", stats.counters.http);
    }
    let all: Vec<stork_proto::api::Machine> = appliance.cli_json(&["machine", "list", "--json"])?;
    if all.len() != machines {
        bail!("the attacker's traffic made machines: {all:?}");
    }
    Ok(())
}
