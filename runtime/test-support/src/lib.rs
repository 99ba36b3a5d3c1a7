//! What the tests against real peers share (the daemon crate's `tests/` and mailc's
//! end-to-end tests): temporary directories, loopback ports of their own, and peer
//! processes (smtp-sink, Dovecot, unbound, slapd, PostgreSQL, spamd, and `mailc serve`
//! itself) that are stopped when the test lets go of them. No network beyond 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

mod dovecot;
mod postgres;
mod serve;
mod slapd;
mod spamd;
mod unbound;

pub use dovecot::Dovecot;
pub use postgres::Postgres;
pub use serve::{maildir, Serve};
pub use slapd::Slapd;
pub use spamd::Spamd;
pub use unbound::Unbound;

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
        use std::os::unix::fs::PermissionsExt;
        // peers that drop privileges (smtp-sink as nobody, Dovecot, Postfix) must get in
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod a temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
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

/// Polls `ok` until it holds; panics with `what` (and `context()`) after `limit`. The limit
/// only keeps a broken peer from hanging the test; nothing is asserted about the time taken.
pub fn wait_for(limit: Duration, what: &str, mut ok: impl FnMut() -> bool, context: impl Fn() -> String) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out after {limit:?} waiting for {what}\n{}", context());
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub fn listening(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .is_ok()
}

/// Stops a peer that takes its children down on SIGTERM (Dovecot's master, PostgreSQL),
/// then kills it if it is still there after two seconds; always reaps it.
fn terminate(child: &mut Child) {
    // SAFETY: kill(2) on the pid of our own child, which we have not reaped yet.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    for _ in 0..100 {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The name of the account the tests run as: what a test gives `mailc serve --user`, since a
/// daemon started as root refuses to run without an account to drop to (`--user root` runs
/// as root on purpose).
pub fn current_user() -> String {
    let out = std::process::Command::new("id").arg("-un").output().map(|o| o.stdout).unwrap_or_default();
    String::from_utf8_lossy(&out).trim().to_string()
}
