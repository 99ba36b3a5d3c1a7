//! The systemd notification protocol (sd_notify(3)) for `Type=notify`: datagrams such as
//! `READY=1`, `RELOADING=1` and `STOPPING=1` to the unix socket named by `$NOTIFY_SOCKET`
//! (a path, or an abstract name when it starts with `@`). Without the variable nothing is
//! sent. The socket is connected once, at start-up and before privileges are dropped, so
//! the notifications still go out after the daemon runs as its own user.

use std::os::unix::net::UnixDatagram;

/// The connection to the service manager, if there is one.
pub struct Notifier {
    sock: Option<UnixDatagram>,
}

impl Notifier {
    /// Connects to `$NOTIFY_SOCKET` when it is set; an error says why it could not.
    pub fn from_env() -> Result<Notifier, String> {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(Notifier { sock: None });
        };
        let sock = UnixDatagram::unbound().map_err(|e| format!("NOTIFY_SOCKET: {e}"))?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(name.as_os_str());
        let connected = match bytes.strip_prefix(b"@") {
            Some(abs) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(abs).and_then(|a| sock.connect_addr(&a))
            }
            None => sock.connect(&name),
        };
        connected.map_err(|e| format!("NOTIFY_SOCKET {}: {e}", name.to_string_lossy()))?;
        Ok(Notifier { sock: Some(sock) })
    }

    /// A notifier that sends nothing.
    pub fn from_env_unset() -> Notifier {
        Notifier { sock: None }
    }

    /// Whether a service manager listens.
    pub fn active(&self) -> bool {
        self.sock.is_some()
    }

    /// Sends `state` (newline-separated `KEY=VALUE` assignments); a failure is returned,
    /// not fatal.
    pub fn notify(&self, state: &str) -> std::io::Result<()> {
        match &self.sock {
            Some(s) => s.send(state.as_bytes()).map(|_| ()),
            None => Ok(()),
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) -> std::io::Result<()> {
        self.notify(&format!("READY=1\nSTATUS={status}"))
    }

    /// `RELOADING=1` with the monotonic time systemd's `Type=notify-reload` asks for.
    pub fn reloading(&self) -> std::io::Result<()> {
        self.notify(&format!("RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading the policy", monotonic_usec()))
    }

    pub fn stopping(&self) -> std::io::Result<()> {
        self.notify("STOPPING=1\nSTATUS=stopping")
    }
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into `ts`, owned here.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000).saturating_add(ts.tv_nsec as u64 / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_reach_the_socket() {
        let dir = std::env::temp_dir().join(format!("notify-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let listen = UnixDatagram::bind(&path).unwrap();
        let sock = UnixDatagram::unbound().unwrap();
        sock.connect(&path).unwrap();
        let n = Notifier { sock: Some(sock) };
        n.ready("up").unwrap();
        n.reloading().unwrap();
        let mut buf = [0u8; 512];
        let k = listen.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"READY=1\nSTATUS=up");
        let k = listen.recv(&mut buf).unwrap();
        assert!(buf[..k].starts_with(b"RELOADING=1\nMONOTONIC_USEC="));
        assert!(!Notifier { sock: None }.active());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
