//! SpamAssassin's spamd (Debian package spamd) on a loopback port of its own.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{listening, wait_for, Peer, TempDir};

/// spamd with one child, running as `nobody`, on `addr` (127.0.0.1:`port`). Stopped on drop.
pub struct Spamd {
    pub port: u16,
    pub addr: String,
    _peer: Peer,
    _dir: TempDir,
}

impl Spamd {
    /// Starts spamd and returns once it listens (its first scan may still wait for it to
    /// finish loading its rules).
    pub fn start() -> Spamd {
        let bin = ["/usr/sbin/spamd", "/usr/bin/spamd"].into_iter().find(|p| std::path::Path::new(p).exists());
        let Some(bin) = bin else {
            panic!("spamd is not installed (Debian package spamd): run tests/run.sh, which installs it")
        };
        let dir = TempDir::new("spamd");
        let port = crate::free_port();
        let child = Command::new(bin)
            .args([&format!("--listen=127.0.0.1:{port}"), "--max-children=1", "--syslog=stderr", "-u", "nobody"])
            .arg(format!("--pidfile={}", dir.join("pid").display()))
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start spamd");
        let peer = Peer(child);
        wait_for(Duration::from_secs(60), "spamd to listen", || listening(port), String::new);
        Spamd { port, addr: format!("127.0.0.1:{port}"), _peer: peer, _dir: dir }
    }
}
