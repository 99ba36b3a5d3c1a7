//! What the tests against real peers share (the daemon crate's `tests/` and mailc's
//! end-to-end tests): temporary directories, loopback ports of their own, and peer
//! processes (smtp-sink, Dovecot, unbound, slapd, PostgreSQL, spamd) that are stopped when
//! the test lets go of them. No network beyond 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::Child;

/// A fresh directory under the system's temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "mailpolicy-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create a temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A peer process, killed and reaped on drop.
pub struct Peer(pub Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A peer process running in a directory of its own: stopped, then the directory removed.
pub struct PeerIn(pub Child, pub PathBuf);

impl Drop for PeerIn {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// A TCP port on 127.0.0.1 free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().expect("local addr").port()
}

/// Fail with a clear message when the program a test drives is missing.
pub fn need(program: &str, package: &str) {
    assert!(
        Path::new(program).exists(),
        "{program} not found: it comes with Debian's {package} package; run tests/run.sh, which installs the test peers"
    );
}

/// Whether the tests run as root (peers that refuse root are then run as another user).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}
