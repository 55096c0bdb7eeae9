//! The host's systemd services over D-Bus (zbus, typed proxies, blocking: `stork appliance
//! setup` is a one-shot command): networkd re-reads its configuration, hostnamed sets the
//! transient host name (/etc is read-only on the image). Addresses come from the kernel
//! (`getifaddrs`).

use super::Host;
use super::network::{self, Ipv4Cidr};

#[zbus::proxy(
    interface = "org.freedesktop.network1.Manager",
    default_service = "org.freedesktop.network1",
    default_path = "/org/freedesktop/network1",
    gen_async = false,
    blocking_name = "NetworkdProxy"
)]
trait Networkd {
    /// Re-reads `.network` files and reconfigures the links whose files changed.
    fn reload(&self) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.hostname1",
    default_service = "org.freedesktop.hostname1",
    default_path = "/org/freedesktop/hostname1",
    gen_async = false,
    blocking_name = "HostnamedProxy"
)]
trait Hostnamed {
    /// The transient host name; `interactive`: may ask for authorisation (never here).
    fn set_hostname(&self, hostname: &str, interactive: bool) -> zbus::Result<()>;
}

#[derive(Debug, thiserror::Error)]
#[error("D-Bus: {call}")]
pub struct BusError {
    /// `service.Method`, for the message.
    pub call: &'static str,
    /// Boxed: zbus' error is large, and the common path returns `Ok`.
    #[source]
    pub source: Box<zbus::Error>,
}

/// The real host: the system bus, connected on first use.
#[derive(Default)]
pub struct LiveHost {
    bus: std::sync::OnceLock<zbus::blocking::Connection>,
}

impl LiveHost {
    fn bus(&self, call: &'static str) -> Result<&zbus::blocking::Connection, BusError> {
        if let Some(c) = self.bus.get() {
            return Ok(c);
        }
        let c = zbus::blocking::Connection::system().map_err(|source| BusError {
            call,
            source: Box::new(source),
        })?;
        Ok(self.bus.get_or_init(|| c))
    }
}

impl Host for LiveHost {
    fn reload_networkd(&self) -> Result<(), BusError> {
        const CALL: &str = "org.freedesktop.network1.Manager.Reload";
        let err = |source| BusError {
            call: CALL,
            source: Box::new(source),
        };
        NetworkdProxy::new(self.bus(CALL)?)
            .and_then(|p| p.reload())
            .map_err(err)
    }

    fn set_hostname(&self, name: &str) -> Result<(), BusError> {
        const CALL: &str = "org.freedesktop.hostname1.SetHostname";
        let err = |source| BusError {
            call: CALL,
            source: Box::new(source),
        };
        HostnamedProxy::new(self.bus(CALL)?)
            .and_then(|p| p.set_hostname(name, false))
            .map_err(err)
    }

    fn ipv4_addresses(&self, interface: &str) -> Vec<Ipv4Cidr> {
        network::ipv4_addresses(interface)
    }
}
