//! What the installed OS needs to configure itself and to report back: a cloud-init NoCloud
//! seed and a phone-home unit. Pure text generation plus one function that writes the files
//! under a root directory, so tests check it without a disk.
//!
//! - `meta-data`: instance id (the machine id) and local hostname.
//! - `network-config` (v2): DHCP on the NIC with the boot MAC, whatever the OS names it; with
//!   the deploy's own network config, `disabled`, and that config goes in as networkd files
//!   ([`super::network`]).
//! - `user-data`: our `#cloud-config` (hostname, the default user's SSH keys). The user's own
//!   user-data, whatever its kind (`#cloud-config`, `#!` script, ...), goes in as a second part
//!   of a MIME multipart; cloud-init types a `text/plain` part by its first line. Its
//!   `Merge-Type` appends lists and keeps our keys where both set one, so the user can add
//!   SSH keys or `runcmd` entries but cannot drop the deploy's hostname or keys.
//!   Every document is written as JSON, which YAML reads as it is: no YAML emitter needed and
//!   no quoting mistakes.
//! - Phone-home: a systemd unit ordered after `cloud-final.service` that POSTs
//!   `/api/v1/agent/<id>/deployed` with the per-boot token, using python3's urllib (cloud-init
//!   depends on python3; curl may be absent). It lives outside user-data so the user's data
//!   cannot disable it; the token is in a root-only file that the unit deletes once answered.

use std::fs;
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use serde_json::json;
use stork_proto::{DeployTask, MacAddr};

pub const SEED_DIR: &str = "var/lib/cloud/seed/nocloud";
const UNIT: &str = "stork-phone-home.service";
const UNIT_DIR: &str = "etc/systemd/system";
const STORK_DIR: &str = "etc/stork";
const PHONE_HOME_CONFIG: &str = "etc/stork/phone-home.json";
const PHONE_HOME_SCRIPT: &str = "etc/stork/phone-home.py";

/// How the user's part merges into ours (cloud-init "mergers"): lists are appended, keys we
/// set stay ours.
const USER_MERGE_TYPE: &str = "dict(recurse_array,no_replace)+list(append)";

/// The three NoCloud files, and the deploy's own network files when it asked for a network
/// config ([`super::network`]; cloud-init then configures no interface).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    pub meta_data: String,
    pub user_data: String,
    pub network_config: String,
    /// Paths relative to the root, and their text.
    pub network_files: Vec<(String, String)>,
}

/// Who the installed OS reports to.
pub struct PhoneHome<'a> {
    /// The appliance's API base URL.
    pub url: &'a str,
    /// For an `https://` URL: the certificate fingerprint to pin (`sha256:<hex>`), as the
    /// agent pinned it.
    pub pin: Option<&'a str>,
    pub machine_id: &'a str,
    pub token: &'a str,
}

/// The IP family the machine booted with: the installed OS asks DHCP of the same family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    /// DHCPv6 (the RA's managed flag says so) and no DHCPv4: on an IPv6-only network a
    /// DHCPv4 client would hold `network-online` until it gives up.
    V6,
}

pub fn seed(task: &DeployTask, machine_id: &str, boot_mac: MacAddr, family: Family) -> Seed {
    let meta = json!({
        "instance-id": machine_id,
        "local-hostname": task.hostname,
    });
    let network = json!({
        "version": 2,
        "ethernets": {
            "boot": {
                "match": { "macaddress": boot_mac.to_string() },
                "dhcp4": family == Family::V4,
                "dhcp6": family == Family::V6,
            }
        }
    });
    let mut ours = json!({
        "hostname": task.hostname,
        "preserve_hostname": false,
        "manage_etc_hosts": true,
        // Top-level keys go to the default user (`debian` in our Debian image).
        "ssh_authorized_keys": task.ssh_keys,
    });
    if task.target == stork_proto::DeployTarget::Memory {
        // The root is an overlay in RAM: no partition or file system to grow.
        ours["growpart"] = json!({ "mode": "off" });
        ours["resize_rootfs"] = json!(false);
    }
    let ours = format!("#cloud-config\n{}\n", pretty(&ours));
    let user_data = match task.user_data.as_deref().filter(|u| !u.trim().is_empty()) {
        None => ours,
        Some(theirs) => multipart(&ours, theirs),
    };
    let (network, network_files) = match &task.network {
        Some(cfg) => (json!({ "config": "disabled" }), super::network::files(cfg)),
        None => (network, Vec::new()),
    };
    Seed {
        meta_data: format!("{}\n", pretty(&meta)),
        user_data,
        network_config: format!("{}\n", pretty(&network)),
        network_files,
    }
}

fn pretty(v: &serde_json::Value) -> String {
    // Serialising a Value cannot fail; fall back to the compact form all the same.
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// A MIME multipart/mixed with our cloud-config first and the user's data second.
fn multipart(ours: &str, theirs: &str) -> String {
    let mut boundary = "==stork-boundary==".to_string();
    while ours.contains(&boundary) || theirs.contains(&boundary) {
        boundary.insert(2, 'x');
    }
    let mut s =
        format!("Content-Type: multipart/mixed; boundary=\"{boundary}\"\nMIME-Version: 1.0\n\n");
    s.push_str(&format!(
        "--{boundary}\nContent-Type: text/cloud-config; charset=\"utf-8\"\n\
         Content-Disposition: attachment; filename=\"stork.cfg\"\n\n{ours}"
    ));
    if !ours.ends_with('\n') {
        s.push('\n');
    }
    s.push_str(&format!(
        "--{boundary}\nContent-Type: text/plain; charset=\"utf-8\"\n\
         Content-Disposition: attachment; filename=\"user-data\"\n\
         Merge-Type: {USER_MERGE_TYPE}\n\n{theirs}"
    ));
    if !theirs.ends_with('\n') {
        s.push('\n');
    }
    s.push_str(&format!("--{boundary}--\n"));
    s
}

fn phone_home_unit() -> String {
    format!(
        "[Unit]\n\
         Description=Stork: report to the appliance that this OS is deployed\n\
         # After cloud-init's last stage, so Deployed means configured.\n\
         After=cloud-final.service network-online.target\n\
         Wants=network-online.target\n\
         ConditionPathExists=/{PHONE_HOME_CONFIG}\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         ExecStart=/usr/bin/python3 /{PHONE_HOME_SCRIPT}\n\
         RemainAfterExit=yes\n\
         StandardOutput=journal+console\n\
         \n\
         [Install]\n\
         WantedBy=cloud-init.target\n"
    )
}

/// python3 only, standard library only: tries for about 10 minutes, gives up on a 4xx (the
/// token was revoked or the machine is no longer deploying), deletes the token when done.
/// Over HTTPS it trusts only the certificate the agent pinned: Python's own verification
/// would want a CA and a name, so the script checks the fingerprint itself before it sends
/// the token.
fn phone_home_script() -> String {
    format!(
        r#"# Written by the Stork agent at deploy time.
import hashlib, http.client, json, os, ssl, sys, time, urllib.parse

CONFIG = "/{PHONE_HOME_CONFIG}"
with open(CONFIG) as f:
    c = json.load(f)
u = urllib.parse.urlsplit(c["url"])

def post():
    if u.scheme == "https":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the pin below is the check
        conn = http.client.HTTPSConnection(u.hostname, u.port or 443, timeout=10, context=ctx)
        conn.connect()
        got = "sha256:" + hashlib.sha256(conn.sock.getpeercert(True)).hexdigest()
        if got != c["pin"]:
            conn.close()
            raise ValueError("certificate %s is not the pinned %s" % (got, c["pin"]))
    else:
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=10)
    conn.request("POST", u.path, body=b"{{}}", headers={{
        "Authorization": "Bearer " + c["token"],
        "Content-Type": "application/json",
    }})
    r = conn.getresponse()
    return r.status, r.read()[:200]

for attempt in range(1, 121):
    try:
        status, body = post()
        if status < 300:
            print("stork-phone-home: deployed reported (HTTP %d)" % status, flush=True)
            os.remove(CONFIG)
            sys.exit(0)
        if status < 500:
            print("stork-phone-home: appliance refused: HTTP %d %s" % (status, body), flush=True)
            os.remove(CONFIG)
            sys.exit(1)
        print("stork-phone-home: attempt %d: HTTP %d" % (attempt, status), flush=True)
    except Exception as e:
        print("stork-phone-home: attempt %d: %s" % (attempt, e), flush=True)
    time.sleep(5)
sys.exit(1)
"#
    )
}

fn write(root: &Path, rel: &str, text: &str, mode: u32) -> io::Result<()> {
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(&path, text)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))
}

/// Writes the seed and the phone-home unit (enabled) under `root`, the installed OS's `/`.
pub fn install(root: &Path, seed: &Seed, home: &PhoneHome) -> io::Result<()> {
    write(
        root,
        &format!("{SEED_DIR}/meta-data"),
        &seed.meta_data,
        0o644,
    )?;
    // user-data may carry secrets of the user's.
    write(
        root,
        &format!("{SEED_DIR}/user-data"),
        &seed.user_data,
        0o600,
    )?;
    write(
        root,
        &format!("{SEED_DIR}/network-config"),
        &seed.network_config,
        0o644,
    )?;
    for (rel, text) in &seed.network_files {
        write(root, rel, text, 0o644)?;
    }

    fs::create_dir_all(root.join(STORK_DIR))?;
    fs::set_permissions(root.join(STORK_DIR), fs::Permissions::from_mode(0o700))?;
    let config = json!({
        "url": format!(
            "{}{}",
            home.url.trim_end_matches('/'),
            stork_proto::agent_path(home.machine_id, "deployed")
        ),
        "token": home.token,
        "pin": home.pin,
    });
    write(root, PHONE_HOME_CONFIG, &config.to_string(), 0o600)?;
    write(root, PHONE_HOME_SCRIPT, &phone_home_script(), 0o644)?;
    write(
        root,
        &format!("{UNIT_DIR}/{UNIT}"),
        &phone_home_unit(),
        0o644,
    )?;
    // `systemctl enable` by hand: the WantedBy symlink. cloud-final.service is ordered after
    // multi-user.target, so a unit wanted by multi-user.target and ordered after cloud-final
    // is a cycle (systemd drops the job): hang it on cloud-init.target, as cloud-final is.
    let target = if has_cloud_init(root) {
        "cloud-init.target"
    } else {
        "multi-user.target"
    };
    for t in ["cloud-init.target", "multi-user.target"] {
        let link = root.join(UNIT_DIR).join(format!("{t}.wants")).join(UNIT);
        match fs::remove_file(&link) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let wants = root.join(UNIT_DIR).join(format!("{target}.wants"));
    fs::create_dir_all(&wants)?;
    symlink(format!("/{UNIT_DIR}/{UNIT}"), wants.join(UNIT))
}

/// Whether the OS under `root` has cloud-init's systemd units (merged /usr or not).
fn has_cloud_init(root: &Path) -> bool {
    ["usr/lib/systemd/system", "lib/systemd/system"]
        .iter()
        .any(|d| root.join(d).join("cloud-final.service").exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(user_data: Option<&str>) -> DeployTask {
        DeployTask {
            target: stork_proto::DeployTarget::Disk,
            disk: None,
            hostname: "web-1".into(),
            ssh_keys: vec!["ssh-ed25519 AAAA test@lab".into(), "ssh-rsa B \"q\"".into()],
            user_data: user_data.map(String::from),
            image: vec![],
            layout: None,
            late_commands: vec![],
            network: None,
            kernel: None,
        }
    }

    fn mac() -> MacAddr {
        "52:54:00:77:00:02".parse().unwrap()
    }

    /// YAML is a superset of JSON for these documents: parse the JSON back.
    fn doc(text: &str) -> serde_json::Value {
        serde_json::from_str(text.trim_start_matches("#cloud-config\n")).unwrap()
    }

    #[test]
    fn seed_carries_identity_keys_and_dhcp_on_the_boot_nic() {
        let s = seed(&task(None), "m123", mac(), Family::V4);
        let meta = doc(&s.meta_data);
        assert_eq!(meta["instance-id"], "m123");
        assert_eq!(meta["local-hostname"], "web-1");
        assert!(s.user_data.starts_with("#cloud-config\n"));
        let user = doc(&s.user_data);
        assert_eq!(user["hostname"], "web-1");
        assert_eq!(user["ssh_authorized_keys"][1], "ssh-rsa B \"q\"");
        let net = doc(&s.network_config);
        assert_eq!(net["version"], 2);
        assert_eq!(
            net["ethernets"]["boot"]["match"]["macaddress"],
            "52:54:00:77:00:02"
        );
        assert_eq!(net["ethernets"]["boot"]["dhcp4"], true);
        assert_eq!(net["ethernets"]["boot"]["dhcp6"], false);
        let v6 = seed(&task(None), "m123", mac(), Family::V6);
        let net = doc(&v6.network_config);
        assert_eq!(net["ethernets"]["boot"]["dhcp4"], false);
        assert_eq!(net["ethernets"]["boot"]["dhcp6"], true);
    }

    #[test]
    fn a_network_config_turns_cloud_inits_off_and_goes_in_as_networkd_files() {
        let mut t = task(None);
        t.network = Some(
            serde_json::from_str(
                r#"{"interfaces": [{"name": "en0", "mac": "52:54:00:77:00:02",
                    "addresses": ["10.77.0.50/24"]}]}"#,
            )
            .unwrap(),
        );
        let s = seed(&t, "m1", mac(), Family::V4);
        assert_eq!(doc(&s.network_config), json!({"config": "disabled"}));
        let root = tempfile::tempdir().unwrap();
        let home = PhoneHome {
            url: "http://a",
            pin: None,
            machine_id: "m1",
            token: "t",
        };
        install(root.path(), &s, &home).unwrap();
        let r = root.path();
        let en0 = fs::read_to_string(r.join("etc/systemd/network/10-stork-en0.network")).unwrap();
        assert!(en0.contains("Address=10.77.0.50/24"), "{en0}");
        let off = fs::read_to_string(r.join(super::super::network::CLOUD_INIT_OFF)).unwrap();
        assert!(off.contains("config: disabled"));
    }

    #[test]
    fn user_data_becomes_a_second_part_that_merges() {
        let theirs = "#cloud-config\nruncmd:\n  - touch /x\n";
        let s = seed(&task(Some(theirs)), "m1", mac(), Family::V4);
        let u = &s.user_data;
        assert!(u.starts_with("Content-Type: multipart/mixed; boundary=\"==stork-boundary==\""));
        let parts: Vec<&str> = u.split("--==stork-boundary==").collect();
        // Preamble, two parts, and the closing "--".
        assert_eq!(parts.len(), 4, "{u}");
        assert!(parts[1].contains("text/cloud-config") && parts[1].contains("\"web-1\""));
        assert!(parts[2].contains(&format!("Merge-Type: {USER_MERGE_TYPE}")));
        assert!(parts[2].ends_with(&format!("\n\n{theirs}")));
        assert_eq!(parts[3], "--\n");

        // A boundary inside the user's data is avoided.
        let sneaky = "#!/bin/sh\necho ==stork-boundary==\n";
        let s = seed(&task(Some(sneaky)), "m1", mac(), Family::V4);
        assert!(s.user_data.contains("boundary=\"==x"));
    }

    #[test]
    fn install_writes_the_seed_and_an_enabled_root_only_phone_home() {
        let root = tempfile::tempdir().unwrap();
        let s = seed(&task(None), "m1", mac(), Family::V4);
        install(
            root.path(),
            &s,
            &PhoneHome {
                url: "http://10.77.0.1:8080/",
                pin: None,
                machine_id: "m1",
                token: "stork_agent_secret",
            },
        )
        .unwrap();
        let r = root.path();
        assert_eq!(
            fs::read_to_string(r.join(SEED_DIR).join("meta-data")).unwrap(),
            s.meta_data
        );
        let cfg: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(r.join(PHONE_HOME_CONFIG)).unwrap()).unwrap();
        assert_eq!(cfg["url"], "http://10.77.0.1:8080/api/v1/agent/m1/deployed");
        assert_eq!(cfg["token"], "stork_agent_secret");
        let mode = fs::metadata(r.join(PHONE_HOME_CONFIG))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let link =
            fs::read_link(r.join(UNIT_DIR).join("multi-user.target.wants").join(UNIT)).unwrap();
        assert_eq!(
            link,
            Path::new("/etc/systemd/system/stork-phone-home.service")
        );
        let unit = fs::read_to_string(r.join(UNIT_DIR).join(UNIT)).unwrap();
        assert!(unit.contains("After=cloud-final.service"));
        // With cloud-init it hangs on cloud-init.target (cloud-final runs after
        // multi-user.target); installing twice (a redeploy into the same tree) is fine.
        fs::create_dir_all(r.join("usr/lib/systemd/system")).unwrap();
        fs::write(r.join("usr/lib/systemd/system/cloud-final.service"), "").unwrap();
        install(
            root.path(),
            &s,
            &PhoneHome {
                url: "http://a",
                pin: None,
                machine_id: "m1",
                token: "t",
            },
        )
        .unwrap();
        assert!(
            r.join(UNIT_DIR)
                .join("cloud-init.target.wants")
                .join(UNIT)
                .is_symlink()
        );
        assert!(
            !r.join(UNIT_DIR)
                .join("multi-user.target.wants")
                .join(UNIT)
                .exists()
        );
    }
}
