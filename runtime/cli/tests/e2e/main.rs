//! End-to-end tests of `mailc serve`: the real binary, started on loopback with a policy
//! written to a temporary directory, against real peers from Debian that the tests start
//! themselves (swaks, Postfix's smtp-sink and smtp-source, Dovecot LMTP, Postfix). Each
//! test uses ports of its own; every child process is killed by a guard when the test
//! ends, passing or failing. A missing peer fails the test with a message saying to run
//! `tests/run.sh`, which installs them.
//!
//! No timed assertions: every wait is bounded, but only so that a broken daemon fails the
//! test instead of hanging it.

mod bad_input;
mod corpus;
mod crash;
mod faults;
mod hardening;
mod lmtp;
mod local;
mod lookups;
mod observe;
mod outbound;
mod postfix;
mod relay;
mod service;
mod swaks;
mod tls_policies;
mod wire;

use wire::*;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mailpolicy_test_support::{free_port, is_root, listening, need, wait_for, Dovecot, TempDir, Unbound};

const MAILC: &str = env!("CARGO_BIN_EXE_mailc");
const SWAKS: &str = "/usr/bin/swaks";
const SMTP_SINK: &str = "/usr/sbin/smtp-sink";
const SMTP_SOURCE: &str = "/usr/sbin/smtp-source";
const POSTFIX: &str = "/usr/sbin/postfix";
const SENDMAIL: &str = "/usr/sbin/sendmail";

// ------------------------------------------------------------------ helpers

/// A child process killed (SIGKILL) and reaped on drop.
struct Guard(Option<Child>);

impl Guard {
    fn pid(&self) -> u32 {
        self.0.as_ref().map(Child::id).unwrap_or(0)
    }
    fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a command to completion, killing it after `limit`.
fn run_bounded(cmd: &mut Command, limit: Duration) -> (ExitStatus, String, String) {
    let out_file = tempfile_path("out");
    let err_file = tempfile_path("err");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_file).expect("stdout file"))
        .stderr(std::fs::File::create(&err_file).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut g = Guard(Some(child));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = g.0.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            break s;
        }
        if start.elapsed() > limit {
            g.kill();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    g.0 = None;
    let out = std::fs::read_to_string(&out_file).unwrap_or_default();
    let err = std::fs::read_to_string(&err_file).unwrap_or_default();
    let _ = std::fs::remove_file(out_file);
    let _ = std::fs::remove_file(err_file);
    (status, out, err)
}

fn tempfile_path(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!("mailc-e2e-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)))
}

/// swaks against 127.0.0.1:`port`; returns its whole transcript (stdout and stderr).
fn swaks(port: u16, args: &[&str]) -> String {
    need(SWAKS, "swaks");
    let server = format!("127.0.0.1:{port}");
    let (_, out, err) = run_bounded(
        Command::new(SWAKS).args(["--server", &server, "--timeout", "20", "--helo", "client.test"]).args(args),
        Duration::from_secs(60),
    );
    format!("{out}{err}")
}

/// The messages in a Maildir's `new/`.
fn maildir(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir.join("new")) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()).filter_map(|e| std::fs::read_to_string(e.path()).ok()).collect()
}

/// Every file under `dir`, recursively, with its path relative to `dir`.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap_or(&p).display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// Files of a spool that are messages or their state (not the TLS key pair, corrupt/, the
/// control socket in private/, cached MTA-STS policies in sts/ nor TLS-RPT results).
fn spool_messages(spool: &Path) -> Vec<String> {
    files_under(spool)
        .into_iter()
        // tmp/reuse.N: files of removed messages the spool keeps to write the next ones into
        .filter(|f| {
            !f.starts_with("tls/")
                && !f.starts_with("corrupt/")
                && !f.starts_with("private/")
                && !f.starts_with("public/")
                && !f.starts_with("sts/")
                && !f.starts_with("tlsrpt/")
                && !f.starts_with("tmp/reuse.")
        })
        .collect()
}

/// The name of the account the tests run as.
fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn queue_list(spool: &Path) -> String {
    let (_, out, err) =
        run_bounded(Command::new(MAILC).args(["queue", "--spool"]).arg(spool).arg("list"), Duration::from_secs(30));
    format!("{out}{err}")
}

// ------------------------------------------------------------------ the daemon

/// `mailc serve` on a policy file, killed (SIGKILL) on drop. Its standard error (the log)
/// is appended to `dir/daemon.log` across restarts.
struct Daemon {
    child: Guard,
    dir: PathBuf,
    policy: PathBuf,
    ports: Vec<u16>,
    /// Extra environment of the daemon (fault injection).
    env: Vec<(String, String)>,
    /// `--user` given to the daemon: the test's own account (as root, `--user root` runs as
    /// root on purpose, spec/cli.md); `None` leaves the choice to the policy.
    user: Option<String>,
}

impl Daemon {
    /// Writes `policy` to `dir/policy.mailpolicy` and starts the daemon on it; returns
    /// once every port in `ports` accepts connections.
    fn start(dir: &Path, policy: &str, ports: &[u16]) -> Daemon {
        Daemon::start_env(dir, policy, ports, &[])
    }

    /// [`Daemon::start`] with extra environment variables.
    fn start_env(dir: &Path, policy: &str, ports: &[u16], env: &[(&str, &str)]) -> Daemon {
        let path = dir.join("policy.mailpolicy");
        std::fs::write(&path, policy).expect("write policy");
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut d = Daemon {
            child: Guard(None),
            dir: dir.to_path_buf(),
            policy: path,
            ports: ports.to_vec(),
            env,
            user: Some(current_user()),
        };
        d.restart();
        d
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spool(&self) -> PathBuf {
        self.dir.join("spool")
    }

    fn restart(&mut self) {
        self.child.kill();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("daemon log");
        let child = Command::new(MAILC)
            .arg("serve")
            .arg("--policy")
            .arg(&self.policy)
            .args(self.user.iter().flat_map(|u| ["--user", u.as_str()]))
            // Every test its own spool (a policy without `spool` would use /var/spool/mailpolicy).
            .arg("--spool")
            .arg(self.spool())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mailc serve");
        self.child = Guard(Some(child));
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.0.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("mailc serve exited ({st}) before listening:\n{}", self.log());
            }
            if self.ports.iter().all(|p| listening(*p)) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "mailc serve did not listen on {:?} within 30s:\n{}",
                self.ports,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        self.child.kill();
    }

    fn signal(&self, sig: &str) {
        let st =
            Command::new("kill").arg(format!("-{sig}")).arg(self.child.pid().to_string()).status().expect("run kill");
        assert!(st.success(), "kill -{sig} failed");
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.0.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

/// The policy most tests use: local domains d.test and s.test delivered to Maildirs under
/// `mail/`, everything else relayed to `[127.0.0.1]:relay`, a rule that rejects
/// `blocked@...`, fast retries.
fn base_policy(port: u16, relay: u16, tls: &str) -> String {
    format!(
        r#"list local = domains ["d.test", "s.test"];

server {{
  hostname "mx.test";
  spool "spool";
  maildir "mail";
  local_domains local;
  retry_min 1s;
  retry_max 2s;
  queue_run 1s;
}}

listener smtp {{
  address "127.0.0.1:{port}";
  protocol smtp;
  tls {tls};
}}

on rcpt {{
  if recipient.local :is "blocked" {{
    reject 550 5.7.1 "Blocked by rule for ${{recipient}}";
  }}
}}

route {{
  if recipient.domain in local {{
    deliver maildir;
  }}
  deliver smtp "[127.0.0.1]:{relay}";
}}
"#
    )
}

// ------------------------------------------------------------------ smtp-sink

/// smtp-sink writing each transaction to a file under `dir/`.
struct Sink {
    _child: Guard,
    dir: PathBuf,
    port: u16,
}

impl Sink {
    fn start(dir: &Path, port: u16, extra: &[&str]) -> Sink {
        need(SMTP_SINK, "postfix");
        std::fs::create_dir_all(dir).expect("sink dir");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let mut cmd = Command::new(SMTP_SINK);
        if is_root() {
            cmd.args(["-u", "nobody"]);
        }
        let child = cmd
            .arg("-d")
            .arg(format!("{}/%M.", dir.display()))
            .args(extra)
            .arg(format!("127.0.0.1:{port}"))
            .arg("100")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start smtp-sink");
        let sink = Sink { _child: Guard(Some(child)), dir: dir.to_path_buf(), port };
        wait_for(Duration::from_secs(10), "smtp-sink to listen", || listening(port), String::new);
        sink
    }

    /// The transactions it received (one file each).
    fn messages(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok()).filter_map(|e| std::fs::read_to_string(e.path()).ok()).collect()
    }
}
