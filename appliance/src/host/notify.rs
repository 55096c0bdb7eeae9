//! systemd's readiness protocol (`sd_notify(3)`): one datagram `READY=1` to the socket
//! `$NOTIFY_SOCKET` names, so a `Type=notify` unit counts as started only once `stork serve`
//! listens. A few lines over `UnixDatagram` rather than a crate: the protocol is one send.
//! A name starting with `@` is an abstract socket. Without `NOTIFY_SOCKET` (not under
//! systemd) nothing is sent.

use std::os::unix::net::UnixDatagram;

#[derive(Debug, thiserror::Error)]
#[error("cannot notify systemd through {socket:?}")]
pub struct NotifyError {
    socket: String,
    #[source]
    source: std::io::Error,
}

/// Tells systemd the service is ready. `Ok(false)`: no `NOTIFY_SOCKET`, nothing sent.
pub fn ready() -> Result<bool, NotifyError> {
    match std::env::var("NOTIFY_SOCKET") {
        Ok(socket) if !socket.is_empty() => send(&socket, "READY=1\n").map(|()| true),
        _ => Ok(false),
    }
}

/// Sends `state` to the notification socket `socket` (a path, or `@name` for an abstract
/// socket).
pub fn send(socket: &str, state: &str) -> Result<(), NotifyError> {
    let err = |source| NotifyError {
        socket: socket.to_string(),
        source,
    };
    let sock = UnixDatagram::unbound().map_err(err)?;
    match socket.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr =
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).map_err(err)?;
            sock.send_to_addr(state.as_bytes(), &addr).map_err(err)?;
        }
        None => {
            sock.send_to(state.as_bytes(), socket).map_err(err)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_and_to_an_abstract_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        send(path.to_str().unwrap(), "READY=1\n").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("stork-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let abstract_listener = UnixDatagram::bind_addr(&addr).unwrap();
        send(&format!("@{name}"), "READY=1\n").unwrap();
        let n = abstract_listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");

        let e = send(dir.path().join("none").to_str().unwrap(), "READY=1\n").unwrap_err();
        assert!(e.to_string().contains("none"), "{e}");
    }
}
