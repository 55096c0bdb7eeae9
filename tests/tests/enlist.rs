//! A SeaBIOS VM network-boots from Stork (DHCP, iPXE script, HTTP kernel and initrd), runs
//! the agent from RAM and enlists itself with its own hardware's inventory; then
//! `stork machine commission` takes it through commissioning to Ready, while a second host
//! on the provisioning network (the attacker) keeps fetching the machine's boot script and
//! tries the agent endpoints and the unauthenticated ones: it gets no token, changes
//! nothing, and the machine still reaches Ready.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use stork_lab::{Appliance, Lab, Vm, VmSpec, wait_for};
use stork_proto::MacAddr;
use stork_proto::api::{Machine, Status};
use stork_proto::inventory::Firmware;
use stork_tests::{boot_files, lab_dir, require_artefacts, stork_bin};

const MAC: &str = "52:54:00:77:00:01";

#[test]
#[ignore = "needs root, QEMU and built images: run `cargo xtask test`"]
fn seabios_vm_enlists_as_new_then_commissions_to_ready() {
    require_artefacts();
    let mut lab = Lab::new("enlist", &lab_dir()).unwrap();
    let mut appliance = Appliance::start(&lab, &stork_bin(), &boot_files()).unwrap();
    let mut spec = VmSpec::new("vm1", MAC);
    spec.memory_mib = 1024;
    spec.cpus = 2;
    spec.disk_bytes = 3 << 30;
    let mut vm = Vm::start(&mut lab, spec).unwrap();

    let mut result = wait_enlisted(&mut appliance, &mut vm).and_then(|m| {
        check_inventory(&m, &vm)?;
        Ok(m)
    });
    if let Ok(m) = &result {
        let id = m.id.clone();
        result = commission(&mut lab, &mut appliance, &mut vm, &id);
    }
    if let Err(e) = result {
        lab.keep_dir();
        panic!(
            "{e:#}\n--- {} console (last 40 lines) ---\n{}\n--- qemu ---\n{}\n--- stork (last 30 lines) ---\n{}\n(logs kept in {})",
            vm.describe(),
            vm.console_tail(40),
            vm.qemu_log_tail(10),
            appliance.log_tail(30),
            lab.dir().display()
        );
    }
}

fn wait_enlisted(appliance: &mut Appliance, vm: &mut Vm) -> Result<Machine> {
    appliance.wait_enlisted(vm, MAC, Duration::from_secs(300))
}

/// Commissioning with the manual power driver: the appliance records that a person must
/// power the machine on, and the test is that person.
fn commission(lab: &mut Lab, appliance: &mut Appliance, vm: &mut Vm, id: &str) -> Result<Machine> {
    wait_for(
        "the enlisted VM to power off",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || Ok(vm.exited()),
    )?;
    appliance.cli(&["machine", "commission", id])?;
    let m = appliance.machine(id)?;
    if m.status != Status::Commissioning {
        bail!("after `machine commission` the status is {}", m.status);
    }
    let events = appliance.cli(&["machine", "events", id])?;
    if !events.contains("manual power") {
        bail!("no event asks a person to power the machine on:\n{events}");
    }
    let attacker = Attacker::start(lab, id)?;
    *vm = Vm::start(lab, vm.spec.clone())?;
    let m = wait_for(
        "commissioning to finish",
        Duration::from_secs(300),
        Duration::from_millis(500),
        || {
            let m = appliance.machine(id)?;
            match m.status {
                Status::Ready => Ok(Some(m)),
                Status::Commissioning if vm.exited().is_some() => {
                    bail!("the VM stopped while commissioning")
                }
                Status::Commissioning => Ok(None),
                other => bail!("commissioning ended in {other}: {:?}", m.status_message),
            }
        },
    )?;
    check_inventory(&m, vm)?;
    attacker.stop()?.check()?;
    let events = appliance.cli(&["machine", "events", id])?;
    if !events.contains("no agent token") {
        bail!("the attacker's script fetches are not in the history:\n{events}");
    }
    for want in [
        "Commission: new -> commissioning",
        "CommissioningDone: commissioning -> ready",
    ] {
        if !events.contains(want) {
            bail!("event history lacks {want:?}:\n{events}");
        }
    }
    Ok(m)
}

fn check_inventory(m: &Machine, vm: &Vm) -> Result<()> {
    let ctx = || format!("machine as recorded: {m:#?}");
    let expect = |cond: bool, what: &str| -> Result<()> {
        if cond {
            Ok(())
        } else {
            bail!("{what}; {}", ctx())
        }
    };
    let mac: MacAddr = MAC.parse()?;
    let inv = m
        .inventory
        .as_ref()
        .with_context(|| format!("no inventory; {}", ctx()))?;
    expect(
        m.macs.contains(&mac),
        "the VM's MAC is not among the machine's interfaces",
    )?;
    let nic = inv.nics.iter().find(|n| n.mac == mac);
    expect(
        nic.is_some_and(|n| n.driver.as_deref() == Some("virtio_net")),
        "no virtio_net NIC with the VM's MAC",
    )?;
    let disk = inv
        .disks
        .iter()
        .find(|d| d.serial.as_deref() == Some(vm.spec.disk_serial.as_str()));
    expect(
        disk.is_some_and(|d| d.size_bytes == vm.spec.disk_bytes),
        "no disk with the VM's disk serial and size",
    )?;
    expect(
        inv.memory.total_bytes == u64::from(vm.spec.memory_mib) << 20,
        "memory is not the VM's",
    )?;
    expect(inv.cpu.count == vm.spec.cpus, "CPU count is not the VM's")?;
    expect(inv.firmware == Firmware::Bios, "firmware is not BIOS")?;
    expect(
        inv.dmi.sys_vendor.as_deref() == Some("QEMU"),
        "DMI vendor is not QEMU",
    )?;
    Ok(())
}

/// A host beside the machine (10.77.0.66, no lease) that keeps fetching the machine's boot
/// script while it commissions, and tries the agent routes with what it got.
struct Attacker {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Result<Seen>>,
}

/// What the attacker got.
#[derive(Debug, Default)]
struct Seen {
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
    fn start(lab: &mut Lab, id: &str) -> Result<Attacker> {
        let host = lab.add_host("attacker")?;
        stork_lab::run(host.command("ip").args([
            "addr",
            "add",
            "10.77.0.66/24",
            "dev",
            &host.ifname,
        ]))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, id) = (stop.clone(), id.to_string());
        let base = "http://10.77.0.1:8080";
        // curl's output whatever its exit status: a refused upload still prints the code.
        let curl = move |args: &[&str]| -> Result<String> {
            let out = host
                .command("curl")
                .args(["-s", "-m", "5"])
                .args(args)
                .output()
                .context("running curl in the attacker's namespace")?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let thread = std::thread::spawn(move || -> Result<Seen> {
            let mut seen = Seen::default();
            let big = format!(
                "{{\"boot_mac\":\"{MAC}\",\"step\":\"network\",\"ok\":false,\"message\":\"{}\"}}",
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
                    &[&format!("{base}/api/v1/agent/report")],
                ]
                .concat(),
            )?;
            let _ = std::fs::remove_file(&big_file);
            let small = format!(
                "{{\"boot_mac\":\"{MAC}\",\"step\":\"network\",\"ok\":false,\"message\":\"attacker\"}}"
            );
            for _ in 0..40 {
                seen.flood.push(curl(
                    &[
                        &status[..],
                        &[
                            "-H",
                            "Content-Type: application/json",
                            "-d",
                            &small,
                            &format!("{base}/api/v1/agent/report"),
                        ],
                    ]
                    .concat(),
                )?);
            }
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let script = curl(&[&format!("{base}/ipxe/{MAC}")])?;
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
                                &format!("{base}/api/v1/agent/{id}/{what}"),
                            ],
                        ]
                        .concat(),
                    )?);
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            Ok(seen)
        });
        Ok(Attacker { stop, thread })
    }

    fn stop(self) -> Result<Seen> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the attacker thread panicked"))?
    }
}

impl Seen {
    fn check(&self) -> Result<()> {
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
