//! `mailc serve` as the tests of the `mailc` crate start it: the one starter of the daemon
//! under test for `tests/lists.rs`, `tests/cluster.rs` and `tests/milters.rs` (the binary's
//! path is theirs to give: `env!("CARGO_BIN_EXE_mailc")` exists only in that crate).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::listening;

/// A `mailc serve` running `DIR/policy.mailpolicy` in `DIR` (so the policy's relative
/// paths, `spool "spool"` and `maildir "mail"`, are under it) as the test's own account
/// (`--user`, [`crate::current_user`]), its log (stderr) appended to `DIR/daemon.log`.
/// Killed and reaped on drop.
pub struct Serve {
    child: Option<Child>,
    program: PathBuf,
    pub dir: PathBuf,
    /// The first of the ports it was started with (its SMTP listener, in the tests).
    pub port: u16,
    ports: Vec<u16>,
}

impl Serve {
    /// Writes the policy, starts the daemon and returns once every one of `ports` accepts
    /// connections on 127.0.0.1; panics with the daemon's log if it exits first or does not
    /// listen within 30 seconds.
    pub fn start(program: &str, dir: &Path, policy: &str, ports: &[u16]) -> Serve {
        std::fs::create_dir_all(dir).expect("the daemon's dir");
        std::fs::write(dir.join("policy.mailpolicy"), policy).expect("write the policy");
        let mut d = Serve {
            child: None,
            program: program.into(),
            dir: dir.to_path_buf(),
            port: ports.first().copied().unwrap_or(0),
            ports: ports.to_vec(),
        };
        d.restart();
        d
    }

    /// Stops the daemon if it runs, starts it again on the same directory and policy file,
    /// and waits as [`Serve::start`] does.
    pub fn restart(&mut self) {
        self.stop();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("daemon.log")).expect("log");
        let child = Command::new(&self.program)
            .args(["serve", "--policy", "policy.mailpolicy", "--user", &crate::current_user()])
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mailc serve");
        self.child = Some(child);
        let start = Instant::now();
        while !self.ports.iter().all(|p| listening(*p)) {
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("mailc serve exited ({st}) before listening:\n{}", self.log());
            }
            assert!(start.elapsed() < Duration::from_secs(30), "mailc serve did not listen:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the daemon (SIGKILL) and reaps it; nothing if it is not running.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The daemon's log so far (every run's).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// The messages delivered to `DIR/mail/USER/new` (`deliver maildir` with `maildir
    /// "mail"`), in file-name order.
    pub fn mail(&self, user: &str) -> Vec<String> {
        maildir(&self.dir.join("mail").join(user))
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The messages in a Maildir's `new/`, in file-name order (Maildir names start with the
/// delivery time, so that is about the order they came in).
pub fn maildir(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir.join("new")) else { return Vec::new() };
    let mut v: Vec<(PathBuf, String)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path()).ok().map(|s| (e.path(), s)))
        .collect();
    v.sort();
    v.into_iter().map(|(_, s)| s).collect()
}
