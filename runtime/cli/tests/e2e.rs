//! End-to-end tests of `mailc serve`: the real binary, started on loopback with a policy
//! written to a temporary directory, against real peers from Debian that the tests start
//! themselves (swaks, Postfix's smtp-sink and smtp-source, Dovecot LMTP, Postfix). Each
//! test uses ports of its own; every child process is killed by a guard when the test
//! ends, passing or failing. A missing peer fails the test with a message saying to run
//! `tests/run.sh`, which installs them.
//!
//! No timed assertions: every wait is bounded, but only so that a broken daemon fails the
//! test instead of hanging it.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MAILC: &str = env!("CARGO_BIN_EXE_mailc");
const SWAKS: &str = "/usr/bin/swaks";
const SMTP_SINK: &str = "/usr/sbin/smtp-sink";
const SMTP_SOURCE: &str = "/usr/sbin/smtp-source";
const DOVECOT: &str = "/usr/sbin/dovecot";
const POSTFIX: &str = "/usr/sbin/postfix";
const SENDMAIL: &str = "/usr/sbin/sendmail";

// ------------------------------------------------------------------ helpers

/// Panics with the usual advice when a peer program is not installed.
fn need(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} not found (Debian package {package}); run tests/run.sh, which installs the test peers"
    );
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// The name of the account the tests run as.
fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().expect("local addr").port()
}

fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(&std::net::SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_millis(500)).is_ok()
}

/// Polls `ok` until it holds; panics with `what` (and `context()`) after `limit`.
fn wait_for(limit: Duration, what: &str, mut ok: impl FnMut() -> bool, context: impl Fn() -> String) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {limit:?} waiting for {what}\n{}", context());
}

/// A temporary directory, removed with everything in it on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mailc-e2e-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        use std::os::unix::fs::PermissionsExt;
        // peers that drop privileges (smtp-sink as nobody, Dovecot, Postfix) must get in
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        TempDir(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

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

/// Files of a spool that are messages or their state (not the TLS key pair, corrupt/ nor
/// the control socket in private/).
fn spool_messages(spool: &Path) -> Vec<String> {
    files_under(spool)
        .into_iter()
        .filter(|f| !f.starts_with("tls/") && !f.starts_with("corrupt/") && !f.starts_with("private/"))
        .collect()
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

// ================================================================== 1. swaks as client

#[test]
fn swaks_plain_delivery_to_maildir_and_policy_reject() {
    let t = TempDir::new("plain");
    let port = free_port();
    let d = Daemon::start(t.path(), &base_policy(port, free_port(), "none"), &[port]);

    let out = swaks(port, &["--from", "a@s.test", "--to", "u1@d.test", "--header", "Subject: plain-e2e"]);
    assert!(out.contains("250 2.0.0 Queued as"), "{out}");
    wait_for(
        Duration::from_secs(20),
        "the message in mail/u1",
        || maildir(&t.join("mail/u1")).iter().any(|m| m.contains("Subject: plain-e2e")),
        || d.log(),
    );
    let m = maildir(&t.join("mail/u1")).into_iter().find(|m| m.contains("plain-e2e")).unwrap_or_default();
    assert!(m.contains("Return-Path: <a@s.test>") || m.contains("Received: from client.test"), "{m}");

    // the policy's reject reaches the client with the rule's own reply
    let out = swaks(port, &["--from", "a@s.test", "--to", "blocked@d.test"]);
    assert!(out.contains("550 5.7.1 Blocked by rule for blocked@d.test"), "{out}");
    assert!(!out.contains("Queued as"), "{out}");
    assert!(d.log().contains("reject 550 5.7.1 Blocked by rule"), "{}", d.log());
    wait_for(Duration::from_secs(20), "an empty queue", || spool_messages(&d.spool()).is_empty(), || d.log());
}

#[test]
fn swaks_starttls() {
    let t = TempDir::new("starttls");
    let port = free_port();
    let d = Daemon::start(t.path(), &base_policy(port, free_port(), "starttls"), &[port]);
    let out = swaks(port, &["-tls", "--from", "a@s.test", "--to", "u1@d.test", "--header", "Subject: tls-e2e"]);
    assert!(out.contains("STARTTLS"), "{out}");
    assert!(out.contains("220 2.0.0") || out.contains("<-  220"), "{out}");
    assert!(out.contains("TLS started"), "{out}");
    assert!(out.contains("250 2.0.0 Queued as"), "{out}");
    wait_for(
        Duration::from_secs(20),
        "the message in mail/u1",
        || maildir(&t.join("mail/u1")).iter().any(|m| m.contains("Subject: tls-e2e")),
        || d.log(),
    );
    assert!(d.log().contains("starttls session="), "{}", d.log());
    let m = maildir(&t.join("mail/u1")).into_iter().find(|m| m.contains("tls-e2e")).unwrap_or_default();
    assert!(m.contains("ESMTPS"), "Received: says the session was encrypted: {m}");
}

#[test]
fn swaks_auth_plain_and_login_on_submission() {
    let t = TempDir::new("auth");
    let (sub, loop_, smtps) = (free_port(), free_port(), free_port());
    let hash = |pw: &str| {
        let mut c = Command::new(MAILC)
            .arg("hash-password")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("mailc hash-password");
        c.stdin.take().expect("stdin").write_all(format!("{pw}\n").as_bytes()).expect("write");
        let out = c.wait_with_output().expect("hash-password");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    std::fs::write(t.join("logins"), format!("alice {}\nbob {}\n", hash("alice-secret"), hash("bob secret")))
        .expect("logins");
    let policy = format!(
        r#"list local = domains ["d.test"];
table logins = map "logins";

server {{
  hostname "mx.test";
  spool "spool";
  maildir "mail";
  local_domains local;
}}

listener submission {{
  address "127.0.0.1:{sub}";
  protocol submission;
  tls starttls;
  auth required;
  auth_mechanisms ["PLAIN", "LOGIN"];
  credentials logins;
}}

listener smtps {{
  address "127.0.0.1:{smtps}";
  protocol submissions;
  auth required;
  credentials logins;
}}

listener loopauth {{
  address "127.0.0.1:{loop_}";
  protocol submission;
  tls starttls;
  auth required;
  auth_without_tls true;
  credentials logins;
}}

route {{
  deliver maildir;
}}
"#
    );
    let d = Daemon::start(t.path(), &policy, &[sub, loop_, smtps]);

    // no AUTH before STARTTLS on the submission listener
    let out = swaks(sub, &["--quit-after", "EHLO"]);
    assert!(!out.contains("AUTH"), "AUTH offered before TLS: {out}");
    let out = swaks(sub, &["--from", "alice@d.test", "--to", "u1@d.test", "--quit-after", "RCPT"]);
    assert!(out.contains("<** 530"), "MAIL without AUTH: {out}");
    // after STARTTLS it is offered
    let out = swaks(sub, &["-tls", "--quit-after", "EHLO"]);
    assert!(out.contains("AUTH PLAIN LOGIN"), "{out}");

    for (mech, user, pw) in [("PLAIN", "alice", "alice-secret"), ("LOGIN", "bob", "bob secret")] {
        let out = swaks(
            sub,
            &[
                "-tls",
                "--auth",
                mech,
                "--auth-user",
                user,
                "--auth-password",
                pw,
                "--from",
                "alice@d.test",
                "--to",
                "u1@d.test",
                "--header",
                &format!("Subject: auth-{mech}"),
            ],
        );
        assert!(out.contains("235 2.7.0"), "{mech}: {out}");
        assert!(out.contains("250 2.0.0 Queued as"), "{mech}: {out}");
    }
    // a wrong password is 535 and nothing is queued
    let out = swaks(
        sub,
        &[
            "-tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice",
            "--auth-password",
            "wrong",
            "--from",
            "alice@d.test",
            "--to",
            "u1@d.test",
        ],
    );
    assert!(out.contains("535 5.7.8"), "{out}");
    assert!(!out.contains("Queued as"), "{out}");
    let out = swaks(
        sub,
        &[
            "-tls",
            "--auth",
            "LOGIN",
            "--auth-user",
            "nobody",
            "--auth-password",
            "x",
            "--from",
            "alice@d.test",
            "--to",
            "u1@d.test",
        ],
    );
    assert!(out.contains("535 5.7.8"), "{out}");

    // auth_without_tls on a loopback listener: offered and usable in plaintext
    let out = swaks(loop_, &["--quit-after", "EHLO"]);
    assert!(out.contains("AUTH") && out.contains("PLAIN"), "{out}");
    let out = swaks(
        loop_,
        &[
            "--auth",
            "LOGIN",
            "--auth-user",
            "alice",
            "--auth-password",
            "alice-secret",
            "--from",
            "alice@d.test",
            "--to",
            "u1@d.test",
            "--header",
            "Subject: auth-plaintext",
        ],
    );
    assert!(out.contains("235 2.7.0") && out.contains("Queued as"), "{out}");

    // submissions: implicit TLS from the first byte, then AUTH
    let out = swaks(
        smtps,
        &[
            "--tlsc",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice",
            "--auth-password",
            "alice-secret",
            "--from",
            "alice@d.test",
            "--to",
            "u1@d.test",
            "--header",
            "Subject: auth-implicit-tls",
        ],
    );
    assert!(out.contains("TLS started") && out.contains("235 2.7.0") && out.contains("Queued as"), "{out}");

    wait_for(
        Duration::from_secs(20),
        "four messages in mail/u1",
        || maildir(&t.join("mail/u1")).len() == 4,
        || d.log(),
    );
    let all = maildir(&t.join("mail/u1")).join("\n");
    for s in ["auth-PLAIN", "auth-LOGIN", "auth-plaintext", "auth-implicit-tls"] {
        assert!(all.contains(&format!("Subject: {s}")), "{all}");
    }
    assert!(d.log().contains("auth"), "{}", d.log());
}

/// Issue 9: a login the policy refuses in `on auth` leaves the session as unauthenticated
/// as a wrong password does (no relaying, and `auth required` still refuses MAIL), and the
/// auth stage runs after failed AUTHs too.
#[test]
fn refused_login_does_not_relay() {
    let t = TempDir::new("refused-login");
    let (opt, req) = (free_port(), free_port());
    let hash = |pw: &str| {
        let mut c = Command::new(MAILC)
            .arg("hash-password")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("mailc hash-password");
        c.stdin.take().expect("stdin").write_all(format!("{pw}\n").as_bytes()).expect("write");
        let out = c.wait_with_output().expect("hash-password");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    std::fs::write(t.join("logins"), format!("alice {}\nmallory {}\n", hash("alice-secret"), hash("mallory-secret")))
        .expect("logins");
    let policy = format!(
        r#"list local = domains ["d.test"];
list disabled = strings ["mallory"];
list nobody = cidr ["192.0.2.0/24"];
table logins = map "logins";

server {{
  hostname "mx.test";
  spool "spool";
  maildir "mail";
  local_domains local;
  networks nobody;
}}

listener optional {{
  address "127.0.0.1:{opt}";
  protocol submission;
  auth optional;
  auth_without_tls true;
  auth_mechanisms ["PLAIN", "LOGIN"];
  credentials logins;
}}

listener required {{
  address "127.0.0.1:{req}";
  protocol submission;
  auth required;
  auth_without_tls true;
  auth_mechanisms ["PLAIN", "LOGIN"];
  credentials logins;
}}

on auth {{
  if not authenticated {{
    log "failed login with ${{auth.mechanism}}";
  }}
  if authenticated and auth.user in disabled {{
    reject 535 5.7.8 "Account disabled";
  }}
}}

route {{
  deliver maildir;
}}
"#
    );
    let d = Daemon::start(t.path(), &policy, &[opt, req]);
    let login = |port: u16, user: &str, pw: &str, to: &str| {
        swaks(port, &["--auth", "PLAIN", "--auth-user", user, "--auth-password", pw, "--from", "a@d.test", "--to", to])
    };
    // The refused login: 535 with the policy's text, then no relaying and nothing queued.
    let out = login(opt, "mallory", "mallory-secret", "victim@relay-target.test");
    assert!(out.contains("535 5.7.8 Account disabled"), "{out}");
    let out = swaks(
        opt,
        &[
            "--auth",
            "PLAIN",
            "--auth-user",
            "mallory",
            "--auth-password",
            "mallory-secret",
            "--auth-optional",
            "--from",
            "a@d.test",
            "--to",
            "victim@relay-target.test",
        ],
    );
    assert!(out.contains("554 5.7.1 Relay access denied"), "a refused login relayed: {out}");
    assert!(!out.contains("Queued as"), "{out}");
    // With `auth required`, a refused login is no login: MAIL is refused.
    let out = swaks(
        req,
        &[
            "--auth",
            "PLAIN",
            "--auth-user",
            "mallory",
            "--auth-password",
            "mallory-secret",
            "--auth-optional",
            "--from",
            "a@d.test",
            "--to",
            "u1@d.test",
        ],
    );
    assert!(out.contains("530 5.7.0 Authentication required"), "{out}");
    assert!(!out.contains("Queued as"), "{out}");
    // A wrong password: the auth stage ran for it (its log line).
    let out = login(opt, "alice", "wrong", "u1@d.test");
    assert!(out.contains("535 5.7.8"), "{out}");
    wait_for(
        Duration::from_secs(10),
        "the failed login's log line",
        || d.log().contains("failed login with PLAIN"),
        || d.log(),
    );
    // The accepted login still relays.
    let out = login(opt, "alice", "alice-secret", "friend@relay-target.test");
    assert!(out.contains("235 2.7.0") && out.contains("Queued as"), "{out}");
}

#[test]
fn swaks_pipelining() {
    let t = TempDir::new("pipeline");
    let port = free_port();
    let d = Daemon::start(t.path(), &base_policy(port, free_port(), "none"), &[port]);
    let out = swaks(
        port,
        &[
            "--pipeline",
            "--from",
            "a@s.test",
            "--to",
            "u1@d.test,blocked@d.test,u2@d.test",
            "--header",
            "Subject: pipelined",
        ],
    );
    assert!(out.contains("PIPELINING"), "{out}");
    // the whole group went out before the first reply came back
    let pos = |s: &str| out.find(s).unwrap_or_else(|| panic!("{s:?} not in {out}"));
    assert!(pos("> DATA") < pos("250 2.1.0 Sender OK"), "not pipelined: {out}");
    assert!(out.contains("550 5.7.1 Blocked by rule for blocked@d.test"), "{out}");
    assert!(out.contains("250 2.0.0 Queued as"), "{out}");
    wait_for(
        Duration::from_secs(20),
        "the message for u1 and u2",
        || maildir(&t.join("mail/u1")).len() == 1 && maildir(&t.join("mail/u2")).len() == 1,
        || d.log(),
    );
    assert!(maildir(&t.join("mail/blocked")).is_empty());
}

// ================================================================== 2. smtp-sink as next hop

#[test]
fn relay_to_smtp_sink() {
    let t = TempDir::new("relay");
    let (port, sport) = (free_port(), free_port());
    let sink = Sink::start(&t.join("sink"), sport, &[]);
    let d = Daemon::start(t.path(), &base_policy(port, sink.port, "none"), &[port]);
    let out = swaks(port, &["--from", "a@s.test", "--to", "x@far.test,y@far.test", "--header", "Subject: relayed-e2e"]);
    assert!(out.contains("Queued as"), "{out}");
    wait_for(
        Duration::from_secs(30),
        "the message at smtp-sink",
        || sink.messages().iter().any(|m| m.contains("Subject: relayed-e2e")),
        || d.log(),
    );
    let m = sink.messages().into_iter().find(|m| m.contains("relayed-e2e")).unwrap_or_default();
    assert!(m.contains("X-Mail-Args: <a@s.test>"), "{m}");
    assert!(m.contains("<x@far.test>") && m.contains("<y@far.test>"), "{m}");
    assert!(m.contains("by mx.test (mailpolicy)"), "our Received: header: {m}");
    wait_for(Duration::from_secs(20), "an empty queue", || spool_messages(&d.spool()).is_empty(), || d.log());
    assert!(d.log().contains("status=sent"), "{}", d.log());
}

#[test]
fn sink_4xx_defers_then_delivers_after_retry() {
    let t = TempDir::new("defer");
    let (port, sport) = (free_port(), free_port());
    let sink = Sink::start(&t.join("sink-4xx"), sport, &["-r", "RCPT"]);
    let mut d = Daemon::start(t.path(), &base_policy(port, sport, "none"), &[port]);
    let out = swaks(port, &["--from", "a@s.test", "--to", "x@far.test", "--header", "Subject: deferred-e2e"]);
    assert!(out.contains("Queued as"), "{out}");
    let id = out.lines().find_map(|l| l.split("Queued as ").nth(1)).map(|s| s.trim().to_string()).expect("queue id");
    // deferred: still in the spool, listed with the sink's 4xx reply
    wait_for(
        Duration::from_secs(30),
        "the message listed as deferred with a 4xx reply",
        || {
            let listing = queue_list(&d.spool());
            listing.contains(&id) && listing.contains("(4") && listing.contains("x@far.test")
        },
        || format!("{}\n{}", queue_list(&d.spool()), d.log()),
    );
    assert!(d.log().contains("status=deferred"), "{}", d.log());
    assert!(sink.messages().is_empty());
    assert!(maildir(&t.join("mail/a")).is_empty(), "no DSN for a deferral this early");
    // a deferred message survives kill -9: recovered at start, still listed, retried
    d.kill9();
    d.restart();
    assert!(d.log().contains("recovered=1"), "{}", d.log());
    let listing = queue_list(&d.spool());
    assert!(listing.contains(&id) && listing.contains("x@far.test"), "{listing}");
    // the next hop gets well: the retry (retry_max 2s) delivers it
    drop(sink);
    let good = Sink::start(&t.join("sink-ok"), sport, &[]);
    wait_for(
        Duration::from_secs(30),
        "the deferred message at the healthy sink",
        || good.messages().iter().any(|m| m.contains("Subject: deferred-e2e")),
        || format!("{}\n{}", queue_list(&d.spool()), d.log()),
    );
    wait_for(Duration::from_secs(20), "an empty queue", || spool_messages(&d.spool()).is_empty(), || d.log());
}

#[test]
fn sink_5xx_at_rcpt_and_at_dot_bounce_to_the_sender() {
    let t = TempDir::new("bounce");
    let (port, s_rcpt, s_dot) = (free_port(), free_port(), free_port());
    let sink_rcpt = Sink::start(&t.join("sink-rcpt"), s_rcpt, &["-f", "RCPT"]);
    let sink_dot = Sink::start(&t.join("sink-dot"), s_dot, &["-f", "."]);
    let policy = base_policy(port, s_rcpt, "none").replace(
        "  deliver smtp",
        &format!("  if recipient.domain :is \"dot.test\" {{\n    deliver smtp \"[127.0.0.1]:{s_dot}\";\n  }}\n  deliver smtp"),
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    for (to, subject) in [("x@rcpt.test", "bounce-at-rcpt"), ("y@dot.test", "bounce-at-dot")] {
        let out = swaks(port, &["--from", "a@s.test", "--to", to, "--header", &format!("Subject: {subject}")]);
        assert!(out.contains("Queued as"), "{out}");
    }
    // both DSNs arrive in the sender's Maildir (s.test is local)
    wait_for(
        Duration::from_secs(30),
        "two failure DSNs in mail/a",
        || maildir(&t.join("mail/a")).len() == 2,
        || d.log(),
    );
    for (rcpt, subject) in [("x@rcpt.test", "bounce-at-rcpt"), ("y@dot.test", "bounce-at-dot")] {
        let all = maildir(&t.join("mail/a"));
        let dsn = all.iter().find(|m| m.contains(rcpt)).unwrap_or_else(|| panic!("no DSN naming {rcpt}: {all:?}"));
        assert!(dsn.contains("multipart/report"), "{dsn}");
        assert!(dsn.contains("report-type=delivery-status"), "{dsn}");
        assert!(dsn.contains("Action: failed"), "{dsn}");
        assert!(dsn.contains("Status: 5."), "{dsn}");
        assert!(dsn.contains(&format!("rfc822;{rcpt}")) || dsn.contains(&format!("rfc822; {rcpt}")), "{dsn}");
        assert!(dsn.contains(&format!("Subject: {subject}")), "the original's headers come back: {dsn}");
        assert!(dsn.contains("Return-Path: <>"), "a DSN has the null sender: {dsn}");
        assert!(dsn.contains("Diagnostic-Code: smtp; 5"), "the sink's reply: {dsn}");
    }
    assert!(d.log().contains("status=bounced") || d.log().contains("kind=failure"), "{}", d.log());
    assert!(sink_rcpt.messages().is_empty());
    // A DSN that was delivered owes nobody a notice: no misleading `dsn-dropped` line.
    wait_for(Duration::from_secs(20), "the DSNs delivered", || d.log().matches("status=sent").count() >= 2, || d.log());
    assert!(!d.log().contains("dsn-dropped"), "{}", d.log());
    // (a `-f .` sink dumps the data before it answers 5xx, so its files say nothing)
    drop(sink_dot);
    wait_for(
        Duration::from_secs(20),
        "an empty queue",
        || spool_messages(&d.spool()).is_empty(),
        || format!("{}\n{}", queue_list(&d.spool()), d.log()),
    );
}

/// R1, RFC 3461 section 4: a NOTIFY=SUCCESS recipient relayed to a server without DSN gets
/// one "relayed" notice; relayed to a server with DSN, NOTIFY goes on and we send nothing.
#[test]
fn dsn_success_on_relay_is_one_relayed_notice_or_none() {
    let t = TempDir::new("dsnrelay");
    let (port, s_plain, s_dsn) = (free_port(), free_port(), free_port());
    let plain = Sink::start(&t.join("sink-nodsn"), s_plain, &["-N"]);
    let with_dsn = Sink::start(&t.join("sink-dsn"), s_dsn, &[]);
    let policy = base_policy(port, s_plain, "none").replace(
        "  deliver smtp",
        &format!("  if recipient.domain :is \"dsn.test\" {{\n    deliver smtp \"[127.0.0.1]:{s_dsn}\";\n  }}\n  deliver smtp"),
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    let mut c = Client::connect(port).expect("connect");
    for (to, subject) in [("x@plain.test", "relayed-no-dsn"), ("y@dsn.test", "relayed-with-dsn")] {
        c.cmd("MAIL FROM:<a@s.test>", 250).expect("MAIL");
        c.cmd(&format!("RCPT TO:<{to}> NOTIFY=SUCCESS,FAILURE"), 250).expect("RCPT");
        c.cmd("DATA", 354).expect("DATA");
        c.w.write_all(format!("Subject: {subject}\r\n\r\nhello\r\n.\r\n").as_bytes()).expect("data");
        c.expect(250).expect("queued");
    }
    let _ = c.cmd("QUIT", 221);
    wait_for(
        Duration::from_secs(30),
        "both messages at their sinks",
        || {
            plain.messages().iter().any(|m| m.contains("relayed-no-dsn"))
                && with_dsn.messages().iter().any(|m| m.contains("relayed-with-dsn"))
        },
        || d.log(),
    );
    // The DSN-capable hop got NOTIFY passed on.
    let m = with_dsn.messages().into_iter().find(|m| m.contains("relayed-with-dsn")).unwrap_or_default();
    assert!(m.to_ascii_uppercase().contains("NOTIFY=SUCCESS"), "NOTIFY passed on: {m}");
    wait_for(Duration::from_secs(30), "a notice in mail/a", || !maildir(&t.join("mail/a")).is_empty(), || d.log());
    wait_for(Duration::from_secs(20), "an empty queue", || spool_messages(&d.spool()).is_empty(), || d.log());
    let notices = maildir(&t.join("mail/a"));
    assert_eq!(notices.len(), 1, "exactly one success notice: {notices:#?}\n{}", d.log());
    let n = &notices[0];
    assert!(n.contains("Action: relayed"), "{n}");
    assert!(n.contains("x@plain.test"), "{n}");
    assert!(!n.contains("y@dsn.test"), "{n}");
    assert!(!n.contains("Action: delivered"), "{n}");
}

/// R40 soft_bounce: a remote 5xx defers the recipient (4xx) instead of bouncing it.
#[test]
fn soft_bounce_defers_a_remote_5xx() {
    let t = TempDir::new("softbounce");
    let (port, s_rcpt) = (free_port(), free_port());
    let _sink = Sink::start(&t.join("sink-rcpt"), s_rcpt, &["-f", "RCPT"]);
    let policy = base_policy(port, s_rcpt, "none").replace("  queue_run 1s;", "  queue_run 1s;\n  soft_bounce true;");
    let d = Daemon::start(t.path(), &policy, &[port]);
    let out = swaks(port, &["--from", "a@s.test", "--to", "x@rcpt.test", "--header", "Subject: soft-bounced"]);
    assert!(out.contains("Queued as"), "{out}");
    wait_for(
        Duration::from_secs(30),
        "the recipient deferred with a 4xx",
        || d.log().matches("status=deferred").count() >= 2,
        || format!("{}\n{}", queue_list(&d.spool()), d.log()),
    );
    let listing = queue_list(&d.spool());
    assert!(listing.contains("x@rcpt.test") && listing.contains("(4"), "{listing}");
    assert!(!d.log().contains("status=bounced"), "{}", d.log());
    assert!(maildir(&t.join("mail/a")).is_empty(), "no bounce under soft_bounce");
}

/// A bounce that cannot be delivered (a null-sender message refused by the next hop) is a
/// double bounce: it goes to the server's `postmaster`, and only once.
#[test]
fn double_bounce_goes_to_postmaster() {
    let t = TempDir::new("double");
    let (port, s_rcpt) = (free_port(), free_port());
    let _sink = Sink::start(&t.join("sink-rcpt"), s_rcpt, &["-f", "RCPT"]);
    let policy =
        base_policy(port, s_rcpt, "none").replace("  queue_run 1s;", "  queue_run 1s;\n  postmaster \"pm@d.test\";");
    let d = Daemon::start(t.path(), &policy, &[port]);
    let out = swaks(port, &["--from", "<>", "--to", "x@remote.test", "--header", "Subject: a bounce nobody wants"]);
    assert!(out.contains("Queued as"), "{out}");
    wait_for(
        Duration::from_secs(30),
        "a double-bounce notice in mail/pm",
        || maildir(&t.join("mail/pm")).len() == 1,
        || d.log(),
    );
    let notice = &maildir(&t.join("mail/pm"))[0];
    assert!(notice.contains("multipart/report"), "{notice}");
    assert!(notice.contains("X-Mailpolicy-Double-Bounce: yes"), "{notice}");
    assert!(notice.contains("x@remote.test"), "{notice}");
    assert!(notice.contains("Subject: a bounce nobody wants"), "{notice}");
    assert!(d.log().contains("kind=double-bounce"), "{}", d.log());
    wait_for(
        Duration::from_secs(20),
        "an empty queue",
        || spool_messages(&d.spool()).is_empty(),
        || format!("{}\n{}", queue_list(&d.spool()), d.log()),
    );
    // Nothing went back to the null sender, and there was exactly one notice.
    assert_eq!(maildir(&t.join("mail/pm")).len(), 1);
}

// ================================================================== 3. Dovecot LMTP

/// A throwaway Dovecot LMTP server on loopback with one user, `u1@d.test`.
struct Dovecot {
    child: Guard,
    port: u16,
    mail: PathBuf,
    log: PathBuf,
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        // SIGTERM lets the master take its children down with it
        let pid = self.child.pid();
        if pid != 0 {
            let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
            for _ in 0..100 {
                if matches!(self.child.0.as_mut().map(|c| c.try_wait()), Some(Ok(Some(_)))) {
                    self.child.0 = None;
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.child.kill();
    }
}

fn dovecot(dir: &Path) -> Dovecot {
    need(DOVECOT, "dovecot-core");
    need("/usr/lib/dovecot/lmtp", "dovecot-lmtpd");
    let d = dir.display().to_string();
    let uid_gid = |flag: &str| -> u32 {
        let out = Command::new("id").arg(flag).output().expect("id");
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("id output")
    };
    // Dovecot refuses to run its internal processes as root
    let (user, uid, gid) = if is_root() {
        ("nobody".to_string(), 65534, 65534)
    } else {
        let out = Command::new("id").arg("-un").output().expect("id");
        (String::from_utf8_lossy(&out.stdout).trim().to_string(), uid_gid("-u"), uid_gid("-g"))
    };
    for sub in ["run", "state", "mail"] {
        std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
    }
    std::os::unix::fs::chown(dir.join("mail"), Some(uid), Some(gid)).expect("chown mail");
    std::fs::write(dir.join("users"), format!("u1@d.test::{uid}:{gid}::{d}/mail/u1::\n")).expect("users");
    let port = free_port();
    let conf = format!(
        r#"base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = lmtp
ssl = no
listen = 127.0.0.1
default_login_user = {user}
default_internal_user = {user}
mail_location = maildir:~/Maildir
passdb {{
  driver = passwd-file
  args = {d}/users
}}
userdb {{
  driver = passwd-file
  args = {d}/users
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
}}
service anvil {{
  chroot =
}}
service stats {{
  chroot =
}}
"#
    );
    std::fs::write(dir.join("dovecot.conf"), conf).expect("dovecot.conf");
    let child = Command::new(DOVECOT)
        .arg("-F")
        .arg("-c")
        .arg(dir.join("dovecot.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start dovecot");
    let dv =
        Dovecot { child: Guard(Some(child)), port, mail: dir.join("mail/u1/Maildir"), log: dir.join("dovecot.log") };
    wait_for(
        Duration::from_secs(15),
        "dovecot to listen",
        || listening(port),
        || std::fs::read_to_string(&dv.log).unwrap_or_default(),
    );
    dv
}

#[test]
fn lmtp_to_dovecot() {
    let t = TempDir::new("lmtp");
    std::fs::create_dir_all(t.join("dovecot")).expect("mkdir");
    let dv = dovecot(&t.join("dovecot"));
    let port = free_port();
    let policy = base_policy(port, free_port(), "none").replace(
        "  if recipient.domain in local {",
        &format!("  if recipient.domain :is \"d.test\" {{\n    deliver lmtp \"[127.0.0.1]:{}\";\n  }}\n  if recipient.domain in local {{", dv.port),
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    let out = swaks(
        port,
        &[
            "--from",
            "a@s.test",
            "--to",
            "u1@d.test,nosuchuser@d.test",
            "--header",
            "Subject: lmtp-e2e",
            "--body",
            "line one\n.dot line\n",
        ],
    );
    assert!(out.contains("Queued as"), "{out}");
    wait_for(
        Duration::from_secs(30),
        "the message in Dovecot's Maildir",
        || maildir(&dv.mail).iter().any(|m| m.contains("Subject: lmtp-e2e")),
        || format!("{}\n{}", d.log(), std::fs::read_to_string(&dv.log).unwrap_or_default()),
    );
    let m = maildir(&dv.mail).into_iter().find(|m| m.contains("lmtp-e2e")).unwrap_or_default();
    assert!(m.contains("Return-Path: <a@s.test>"), "{m}");
    assert!(m.contains("\n.dot line"), "dot-stuffing undone end to end: {m}");
    assert!(m.contains("by mx.test (mailpolicy)"), "{m}");
    // the unknown user is refused by Dovecot per recipient: a DSN to the sender
    wait_for(
        Duration::from_secs(30),
        "a DSN for nosuchuser@d.test",
        || maildir(&t.join("mail/a")).iter().any(|m| m.contains("nosuchuser@d.test") && m.contains("multipart/report")),
        || d.log(),
    );
    assert_eq!(maildir(&dv.mail).len(), 1, "delivered once");
}

// ================================================================== 4. Postfix relaying to us

/// A throwaway Postfix on loopback with its own configuration directory, queue and log;
/// `postfix stop` (then `abort`, then SIGKILL of the master) on drop.
struct Postfix {
    dir: PathBuf,
    port: u16,
}

impl Postfix {
    fn conf(&self) -> PathBuf {
        self.dir.join("etc")
    }
    fn master_pid(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("spool/pid/master.pid")).ok().map(|s| s.trim().to_string())
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("maillog")).unwrap_or_default()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let pid = self.master_pid();
        let _ = run_bounded_quiet(Command::new(POSTFIX).arg("-c").arg(self.conf()).arg("stop"));
        let alive = |p: &str| Path::new(&format!("/proc/{p}")).exists();
        if let Some(p) = pid {
            for _ in 0..100 {
                if !alive(&p) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = run_bounded_quiet(Command::new(POSTFIX).arg("-c").arg(self.conf()).arg("abort"));
            if alive(&p) {
                let _ = Command::new("kill").arg("-KILL").arg(&p).status();
            }
        }
    }
}

fn run_bounded_quiet(cmd: &mut Command) -> Option<ExitStatus> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().ok()?;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

fn postfix(dir: &Path, relay_port: u16) -> Postfix {
    need(POSTFIX, "postfix");
    assert!(is_root(), "a throwaway Postfix needs root (its master runs as root and drops to `postfix`)");
    let d = dir.display().to_string();
    for sub in ["etc", "spool", "data"] {
        std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
    }
    let _ = Command::new("chown").arg("postfix").arg(dir.join("data")).status();
    let port = free_port();
    std::fs::write(
        dir.join("etc/main.cf"),
        format!(
            "compatibility_level = 3.6
queue_directory = {d}/spool
data_directory = {d}/data
mail_owner = postfix
myhostname = pf.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{relay_port}
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
smtp_tls_security_level = may
maillog_file = {d}/maillog
maillog_file_prefixes = {tmp}
",
            tmp = std::env::temp_dir().display()
        ),
    )
    .expect("main.cf");
    let services = [
        ("pickup", "unix  n - n 60 1 pickup"),
        ("cleanup", "unix  n - n - 0 cleanup"),
        ("qmgr", "unix  n - n 300 1 qmgr"),
        ("tlsmgr", "unix  - - n 1000? 1 tlsmgr"),
        ("rewrite", "unix  - - n - - trivial-rewrite"),
        ("bounce", "unix  - - n - 0 bounce"),
        ("defer", "unix  - - n - 0 bounce"),
        ("trace", "unix  - - n - 0 bounce"),
        ("verify", "unix  - - n - 1 verify"),
        ("flush", "unix  n - n 1000? 0 flush"),
        ("proxymap", "unix  - - n - - proxymap"),
        ("smtp", "unix  - - n - - smtp"),
        ("relay", "unix  - - n - - smtp"),
        ("showq", "unix  n - n - - showq"),
        ("error", "unix  - - n - - error"),
        ("retry", "unix  - - n - - error"),
        ("discard", "unix  - - n - - discard"),
        ("local", "unix  - n n - - local"),
        ("anvil", "unix  - - n - 1 anvil"),
        ("scache", "unix  - - n - 1 scache"),
        ("postlog", "unix-dgram n - n - 1 postlogd"),
    ];
    let mut master = format!("127.0.0.1:{port} inet n - n - - smtpd\n");
    for (name, rest) in services {
        master.push_str(&format!("{name} {rest}\n"));
    }
    std::fs::write(dir.join("etc/master.cf"), master).expect("master.cf");
    let pf = Postfix { dir: dir.to_path_buf(), port };
    let (st, out, err) =
        run_bounded(Command::new(POSTFIX).arg("-c").arg(pf.conf()).arg("start"), Duration::from_secs(60));
    assert!(st.success(), "postfix start failed: {out}{err}\n{}", pf.log());
    wait_for(Duration::from_secs(20), "Postfix's smtpd to listen", || listening(port), || pf.log());
    pf
}

#[test]
fn postfix_relays_to_us() {
    need(SENDMAIL, "postfix");
    let t = TempDir::new("postfix");
    let port = free_port();
    let d = Daemon::start(t.path(), &base_policy(port, free_port(), "starttls"), &[port]);
    let pf = postfix(&t.join("pf"), port);
    // injected through Postfix's sendmail (pickup) ...
    let mut sm = Command::new(SENDMAIL)
        .arg("-C")
        .arg(pf.conf())
        .args(["-f", "a@s.test", "u1@d.test"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sendmail");
    sm.stdin.take().expect("stdin").write_all(b"Subject: via-postfix-sendmail\n\nhello from postfix\n").expect("write");
    let st = sm.wait().expect("sendmail");
    assert!(st.success(), "sendmail failed\n{}", pf.log());
    // ... and through its smtpd
    let out = swaks(pf.port, &["--from", "a@s.test", "--to", "u2@d.test", "--header", "Subject: via-postfix-smtpd"]);
    assert!(out.contains("250 2.0.0 Ok: queued"), "{out}");
    wait_for(
        Duration::from_secs(60),
        "both messages relayed by Postfix into our Maildirs",
        || {
            maildir(&t.join("mail/u1")).iter().any(|m| m.contains("Subject: via-postfix-sendmail"))
                && maildir(&t.join("mail/u2")).iter().any(|m| m.contains("Subject: via-postfix-smtpd"))
        },
        || format!("{}\n{}", pf.log(), d.log()),
    );
    let m = maildir(&t.join("mail/u1")).join("");
    assert!(m.contains("by pf.test (Postfix"), "{m}");
    assert!(m.contains("with ESMTPS"), "Postfix used STARTTLS to us: {m}");
    assert!(m.contains("from pf.test"), "Postfix's EHLO in our Received: {m}");
    assert!(pf.log().contains(&format!("relay=127.0.0.1[127.0.0.1]:{port}")), "{}", pf.log());
    assert!(pf.log().contains("status=sent (250 2.0.0 Queued as"), "{}", pf.log());
}

// ================================================================== 5. crash test

/// A minimal SMTP client: one connection, many messages; returns the markers of the
/// messages the server acknowledged with 250 after DATA.
struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Client {
    fn connect(port: u16) -> std::io::Result<Client> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.set_write_timeout(Some(Duration::from_secs(20)))?;
        let mut c = Client { r: BufReader::new(s.try_clone()?), w: s };
        c.expect(220)?;
        c.cmd("EHLO load.test", 250)?;
        Ok(c)
    }

    fn reply(&mut self) -> std::io::Result<(u16, String)> {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line)? == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
            }
            text.push_str(&line);
            let code = line
                .get(..3)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad reply {line:?}")))?;
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok((code, text));
            }
        }
    }

    fn expect(&mut self, code: u16) -> std::io::Result<String> {
        let (c, t) = self.reply()?;
        if c != code {
            return Err(std::io::Error::other(format!("expected {code}, got {t}")));
        }
        Ok(t)
    }

    fn cmd(&mut self, line: &str, code: u16) -> std::io::Result<String> {
        self.w.write_all(format!("{line}\r\n").as_bytes())?;
        self.expect(code)
    }

    /// Sends one message; Ok(true) when the server said 250 to its data.
    fn send(&mut self, marker: &str) -> std::io::Result<bool> {
        self.cmd("MAIL FROM:<load@s.test>", 250)?;
        self.cmd("RCPT TO:<sink@far.test>", 250)?;
        self.cmd("DATA", 354)?;
        let body = format!(
            "From: load@s.test\r\nTo: sink@far.test\r\nSubject: {marker}\r\nMessage-ID: <{marker}@load.test>\r\n\r\n{}.\r\n",
            format!("{}\r\n", "0123456789abcdef".repeat(4)).repeat(16)
        );
        self.w.write_all(body.as_bytes())?;
        let (code, _) = self.reply()?;
        Ok(code == 250)
    }
}

#[test]
fn kill9_under_load_loses_no_acknowledged_message() {
    need(SMTP_SOURCE, "postfix");
    let t = TempDir::new("crash");
    let (port, sport) = (free_port(), free_port());
    let sink = Sink::start(&t.join("sink"), sport, &[]);
    let policy = format!(
        r#"server {{
  hostname "mx.test";
  spool "spool";
  retry_min 1s;
  retry_max 2s;
  queue_run 1s;
}}

listener smtp {{
  address "127.0.0.1:{port}";
  protocol smtp;
  tls none;
}}

route {{
  deliver smtp "[127.0.0.1]:{sport}";
}}
"#
    );
    let mut d = Daemon::start(t.path(), &policy, &[port]);

    // our own clients: every message acknowledged with 250 is recorded
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut clients = Vec::new();
    for n in 0..8 {
        let (stop, acked) = (stop.clone(), acked.clone());
        clients.push(std::thread::spawn(move || {
            let mut seq = 0u64;
            let mut conn: Option<Client> = None;
            while !stop.load(Ordering::Relaxed) {
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => match Client::connect(port) {
                        Ok(c) => conn.insert(c),
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(30));
                            continue;
                        }
                    },
                };
                seq += 1;
                let marker = format!("crash-{n}-{seq}");
                match c.send(&marker) {
                    Ok(true) => acked.lock().expect("lock").push(marker),
                    Ok(false) | Err(_) => conn = None,
                }
            }
        }));
    }

    // smtp-source as extra load, killed with the daemon; three kill -9 and restarts
    let mut cycles = 0;
    let mut in_spool_at_kill = Vec::new();
    for _ in 0..3 {
        let before = acked.lock().expect("lock").len();
        let mut cmd = Command::new(SMTP_SOURCE);
        cmd.args(["-c", "-l", "2000", "-m", "400", "-s", "10", "-f", "s@src.test", "-t", "r@far.test"])
            .arg(format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut source = Guard(Some(cmd.spawn().expect("smtp-source")));
        // let some messages through first (bounded: a wedged daemon fails here)
        wait_for(
            Duration::from_secs(30),
            "messages accepted under load",
            || acked.lock().map(|a| a.len() >= before + 100).unwrap_or(false),
            || d.log(),
        );
        std::thread::sleep(Duration::from_millis(500));
        d.kill9();
        in_spool_at_kill.push(spool_messages(&d.spool()).len());
        source.kill();
        cycles += 1;
        std::thread::sleep(Duration::from_millis(100));
        d.restart();
    }
    // a little more load on the last incarnation, then stop the clients
    let before = acked.lock().expect("lock").len();
    wait_for(
        Duration::from_secs(30),
        "messages accepted after the last restart",
        || acked.lock().map(|a| a.len() >= before + 20).unwrap_or(false),
        || d.log(),
    );
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client thread");
    }
    assert_eq!(cycles, 3);

    // the queue drains; nothing is left but (an empty) corrupt/
    wait_for(
        Duration::from_secs(120),
        "the spool to drain",
        || spool_messages(&d.spool()).is_empty(),
        || format!("left: {:?}\n{}", spool_messages(&d.spool()), queue_list(&d.spool())),
    );
    assert!(d.alive(), "the daemon is still running:\n{}", d.log());
    let corrupt = files_under(&d.spool().join("corrupt"));
    assert!(corrupt.is_empty(), "corrupt files after kill -9: {corrupt:?}");

    // every acknowledged message reached the sink (duplicates allowed, no loss)
    let received: HashSet<String> = sink
        .messages()
        .iter()
        .flat_map(|m| {
            m.lines()
                .filter_map(|l| l.strip_prefix("Subject: "))
                .filter(|s| s.starts_with("crash-"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    let acked = acked.lock().expect("lock").clone();
    let lost: Vec<&String> = acked.iter().filter(|m| !received.contains(*m)).collect();
    // Delivery is at least once: copies a restart delivered again (issue 10.7 measures them).
    let copies: usize = sink
        .messages()
        .iter()
        .map(|m| m.lines().filter(|l| l.strip_prefix("Subject: ").is_some_and(|s| s.starts_with("crash-"))).count())
        .sum();
    eprintln!(
        "crash test: {} messages acknowledged, {} distinct received by the sink, {} duplicates, {} transactions at the sink, spool files at each kill: {in_spool_at_kill:?}",
        acked.len(),
        received.len(),
        copies.saturating_sub(received.len()),
        sink.messages().len()
    );
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged messages never reached the sink: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(20)]
    );
    assert!(d.log().matches("started spool=").count() == 4, "{}", d.log());
}

// ================================================================== 6. bad input

#[test]
fn sighup_with_a_broken_policy_keeps_the_old_one() {
    let t = TempDir::new("sighup");
    let port = free_port();
    let d = Daemon::start(t.path(), &base_policy(port, free_port(), "none"), &[port]);
    let out = swaks(port, &["--from", "a@s.test", "--to", "blocked@d.test"]);
    assert!(out.contains("550 5.7.1 Blocked by rule for blocked@d.test"), "{out}");
    // the policy file is replaced by one with errors, then SIGHUP
    std::fs::write(
        &d.policy,
        "listener smtp { address \"127.0.0.1:1\"; }\non rcpt { accept_everything; }\nroute { deliver maildir }\n",
    )
    .expect("write");
    d.signal("HUP");
    wait_for(Duration::from_secs(20), "reload-refused in the log", || d.log().contains("reload-refused"), || d.log());
    // still answering per the old policy
    let out = swaks(port, &["--from", "a@s.test", "--to", "blocked@d.test"]);
    assert!(out.contains("550 5.7.1 Blocked by rule for blocked@d.test"), "{out}");
    let out = swaks(port, &["--from", "a@s.test", "--to", "u1@d.test", "--header", "Subject: after-hup"]);
    assert!(out.contains("Queued as"), "{out}");
    wait_for(
        Duration::from_secs(20),
        "delivery after the refused reload",
        || maildir(&t.join("mail/u1")).iter().any(|m| m.contains("Subject: after-hup")),
        || d.log(),
    );
    // a good policy is taken on the next SIGHUP: the reject rule is gone
    std::fs::write(&d.policy, base_policy(port, free_port(), "none").replace("\"blocked\"", "\"refused\""))
        .expect("write");
    d.signal("HUP");
    wait_for(Duration::from_secs(20), "reloaded in the log", || d.log().contains("reloaded"), || d.log());
    let out = swaks(port, &["--from", "a@s.test", "--to", "blocked@d.test"]);
    assert!(out.contains("Queued as"), "{out}");
    let out = swaks(port, &["--from", "a@s.test", "--to", "refused@d.test"]);
    assert!(out.contains("550 5.7.1 Blocked by rule for refused@d.test"), "{out}");
    // SIGTERM: a clean stop
    d.signal("TERM");
    let mut d = d;
    let start = Instant::now();
    let code = loop {
        if let Some(Ok(Some(st))) = d.child.0.as_mut().map(|c| c.try_wait()) {
            break st.code();
        }
        assert!(start.elapsed() < Duration::from_secs(40), "no exit on SIGTERM:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, Some(0), "{}", d.log());
    assert!(d.log().contains("stopped"), "{}", d.log());
}

#[test]
fn sighup_with_a_good_policy_keeps_the_queue_going() {
    // The scheduler's queue runs are an hour apart: only its own retries (1s to 2s) can
    // deliver the deferred message, so a reload must not make it forget the queue.
    let t = TempDir::new("sighup-queue");
    let (port, sport) = (free_port(), free_port());
    let sink = Sink::start(&t.join("sink-4xx"), sport, &["-r", "RCPT"]);
    let policy = base_policy(port, sport, "none").replace("queue_run 1s;", "queue_run 1h;");
    let d = Daemon::start(t.path(), &policy, &[port]);
    let out = swaks(port, &["--from", "a@s.test", "--to", "x@far.test", "--header", "Subject: deferred-over-reload"]);
    assert!(out.contains("Queued as"), "{out}");
    wait_for(Duration::from_secs(30), "a deferral", || d.log().contains("status=deferred"), || d.log());
    // a valid policy (the same text) is reloaded while the message waits for its retry
    d.signal("HUP");
    wait_for(Duration::from_secs(20), "reloaded in the log", || d.log().contains("reloaded"), || d.log());
    drop(sink);
    let good = Sink::start(&t.join("sink-ok"), sport, &[]);
    wait_for(
        Duration::from_secs(30),
        "the deferred message delivered after the reload",
        || good.messages().iter().any(|m| m.contains("Subject: deferred-over-reload")),
        || format!("{}\n{}", queue_list(&d.spool()), d.log()),
    );
}

/// B1 + B6: the open-relay proof is part of the check the daemon runs, so an open relay
/// never starts either.
#[test]
fn an_open_relay_policy_does_not_start() {
    let t = TempDir::new("openrelay");
    let port = free_port();
    let policy = t.join("open.mailpolicy");
    // Reachable from outside (a loopback-only listener has no stranger, spec 16.1).
    std::fs::write(&policy, format!("listener smtp {{ address \"0.0.0.0:{port}\"; }}\non rcpt {{ accept; }}\n"))
        .expect("write");
    let (st, out, err) = run_bounded(
        Command::new(MAILC).arg("serve").arg("--policy").arg(&policy).current_dir(t.path()),
        Duration::from_secs(30),
    );
    assert_eq!(st.code(), Some(1), "{out}{err}");
    assert!(err.contains("mailc::open-relay"), "the proof's error is reported: {err}");
    assert!(!listening(port), "nothing listens on {port}");
}

#[test]
fn a_policy_with_errors_does_not_start() {
    let t = TempDir::new("badpolicy");
    let port = free_port();
    let policy = t.join("bad.mailpolicy");
    std::fs::write(
        &policy,
        format!("listener smtp {{ address \"127.0.0.1:{port}\"; }}\non rcpt {{ frobnicate; }}\nroute {{ deliver maildir; }}\n"),
    )
    .expect("write");
    let (st, out, err) = run_bounded(
        Command::new(MAILC).arg("serve").arg("--policy").arg(&policy).current_dir(t.path()),
        Duration::from_secs(30),
    );
    assert_eq!(st.code(), Some(1), "{out}{err}");
    assert!(err.contains("frobnicate"), "the error is reported: {err}");
    assert!(err.contains("not starting"), "{err}");
    assert!(!listening(port), "nothing listens on {port}");
    assert!(!t.join("spool").exists() && !t.join("var").exists(), "no spool made");
}

#[test]
fn a_corrupt_queue_file_moves_to_corrupt_at_start() {
    let t = TempDir::new("corrupt");
    let port = free_port();
    let incoming = t.join("spool/incoming");
    std::fs::create_dir_all(&incoming).expect("mkdir");
    // a header that does not parse, and a message file cut short
    std::fs::write(incoming.join("01A2000000000000000001"), b"MAILPOLICY-SPOOL 1\n{not json\n").expect("write");
    std::fs::write(
        incoming.join("01A2000000000000000002"),
        b"MAILPOLICY-SPOOL 1\n{\"id\":\"01A2000000000000000002\",\"class\":\"normal\",\"arrived_ms\":1,\"data_len\":100",
    )
    .expect("write");
    std::fs::write(incoming.join("garbage"), b"\x00\x01\x02 not a queue file").expect("write");
    let d = Daemon::start(t.path(), &base_policy(port, free_port(), "none"), &[port]);
    let corrupt = files_under(&t.join("spool/corrupt"));
    assert!(corrupt.iter().any(|f| f.contains("01A2000000000000000001")), "{corrupt:?}\n{}", d.log());
    assert!(corrupt.iter().any(|f| f.contains("01A2000000000000000002")), "{corrupt:?}\n{}", d.log());
    assert!(d.log().contains("corrupt file="), "reported: {}", d.log());
    // and the daemon runs
    let out = swaks(port, &["--from", "a@s.test", "--to", "u1@d.test", "--header", "Subject: after-corrupt"]);
    assert!(out.contains("Queued as"), "{out}");
    wait_for(
        Duration::from_secs(20),
        "delivery next to a corrupt file",
        || maildir(&t.join("mail/u1")).iter().any(|m| m.contains("Subject: after-corrupt")),
        || d.log(),
    );
    assert!(queue_list(&d.spool()).contains("corrupt"), "{}", queue_list(&d.spool()));
}

// ================================================================== 7. Look-ups for real

/// unbound (Debian package) serving `local-data` lines on a loopback port of its own.
struct Unbound {
    guard: Guard,
    port: u16,
}

fn unbound(dir: &Path, records: &[&str]) -> Unbound {
    const UNBOUND: &str = "/usr/sbin/unbound";
    need(UNBOUND, "unbound");
    let port = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp").local_addr().expect("addr").port();
    std::fs::create_dir_all(dir).expect("dir");
    let mut conf = format!(
        "server:\n  interface: 127.0.0.1@{port}\n  port: {port}\n  do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"\"\n  do-ip6: no\n  access-control: 127.0.0.0/8 allow\n  local-zone: \"test.\" static\n  local-zone: \"127.in-addr.arpa.\" static\n",
        d = dir.display()
    );
    for r in records {
        conf.push_str(&format!("  local-data: '{r}'\n"));
    }
    conf.push_str("remote-control:\n  control-enable: no\n");
    std::fs::write(dir.join("unbound.conf"), conf).expect("write unbound.conf");
    let child = Command::new(UNBOUND)
        .arg("-d")
        .arg("-c")
        .arg(dir.join("unbound.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start unbound");
    let u = Unbound { guard: Guard(Some(child)), port };
    // Wait until it answers a query (a UDP probe of our own would need a DNS encoder; the
    // daemon's first look-up retries through hickory's own time-out instead, so give the
    // server a moment to bind).
    std::thread::sleep(Duration::from_millis(300));
    u
}

/// R19 and R25 through the daemon against a real DNS server: a DNSBL listing refuses the
/// client at connect with the list's TXT text; SPF fail refuses the sender; SPF pass is
/// recorded in an Authentication-Results header of the delivered message.
#[test]
fn dnsbl_and_spf_through_a_real_dns_server() {
    let t = TempDir::new("dns");
    let ub = unbound(
        &t.join("unbound"),
        &[
            "1.0.0.127.dnsbl.test. A 127.0.0.2",
            "1.0.0.127.dnsbl.test. TXT \"listed for testing\"",
            "good.test. TXT \"v=spf1 ip4:127.0.0.1 -all\"",
            "bad.test. TXT \"v=spf1 ip4:192.0.2.1 -all\"",
        ],
    );
    // 1. The DNSBL lists 127.0.0.1: refused at connect.
    let p1 = free_port();
    let listed = format!(
        "require [\"dnsbl\"];\nserver {{ hostname \"mx.test\"; spool \"spool1\"; maildir \"mail\"; dns_server \"127.0.0.1:{dns}\"; }}\n\
         listener smtp {{ address \"127.0.0.1:{p1}\"; tls none; }}\n\
         on connect {{ if dnsbl \"dnsbl.test\" {{ reject 554 5.7.1 \"${{client.ip}} is listed by ${{dnsbl.zone}}: ${{dnsbl.text}}\"; }} }}\n",
        dns = ub.port
    );
    std::fs::create_dir_all(t.join("one")).expect("dir");
    let d1 = Daemon::start(&t.join("one"), &listed, &[p1]);
    let out = swaks(p1, &["--from", "a@good.test", "--to", "x@d.test"]);
    assert!(out.contains("554 5.7.1 127.0.0.1 is listed by dnsbl.test: listed for testing"), "{out}\n{}", d1.log());
    drop(d1);

    // 2. SPF: fail is refused at MAIL, pass is delivered with Authentication-Results.
    let p2 = free_port();
    let spf = format!(
        "require [\"spf\"];\nlist local = domains [\"d.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool2\"; maildir \"mail\"; local_domains local; dns_server \"127.0.0.1:{dns}\"; }}\n\
         listener smtp {{ address \"127.0.0.1:{p2}\"; tls none; }}\n\
         on mail {{ if spf :is \"fail\" {{ reject 550 5.7.23 \"SPF fail for ${{sender.domain}}\"; }} }}\n\
         route {{ if recipient.is_local {{ deliver maildir; }} }}\n",
        dns = ub.port
    );
    std::fs::create_dir_all(t.join("two")).expect("dir");
    let d2 = Daemon::start(&t.join("two"), &spf, &[p2]);
    let out = swaks(p2, &["--from", "eve@bad.test", "--to", "x@d.test"]);
    assert!(out.contains("550 5.7.23 SPF fail for bad.test"), "{out}\n{}", d2.log());
    let out = swaks(p2, &["--from", "alice@good.test", "--to", "x@d.test", "--header", "Subject: spf pass"]);
    assert!(out.contains("Queued as"), "{out}\n{}", d2.log());
    wait_for(
        Duration::from_secs(20),
        "the message in mail/x",
        || !maildir(&t.join("two/mail/x")).is_empty(),
        || d2.log(),
    );
    let m = &maildir(&t.join("two/mail/x"))[0];
    assert!(m.contains("Authentication-Results: mx.test;"), "{m}");
    assert!(m.contains("spf=pass"), "{m}");
    drop(ub.guard);
}

/// R27: call-ahead asks the next hop the route stage picks and answers with its reply.
#[test]
fn callahead_mirrors_the_next_hop() {
    let t = TempDir::new("callahead");
    let (port, ok, bad) = (free_port(), free_port(), free_port());
    let sink_ok = Sink::start(&t.join("sink-ok"), ok, &[]);
    let _sink_bad = Sink::start(&t.join("sink-bad"), bad, &["-f", "RCPT"]);
    let policy = format!(
        "require [\"callahead\"];\nlist local = domains [\"ok.test\", \"bad.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         on rcpt {{ if not callahead {{ reject callahead; }} }}\n\
         route {{\n  if recipient.domain :is \"bad.test\" {{ deliver smtp \"[127.0.0.1]:{bad}\"; }}\n  deliver smtp \"[127.0.0.1]:{ok}\";\n}}\n"
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    let out = swaks(port, &["--from", "a@s.test", "--to", "nobody@bad.test"]);
    assert!(out.contains("<** 5"), "the next hop's 5xx is mirrored at RCPT: {out}\n{}", d.log());
    let out = swaks(port, &["--from", "a@s.test", "--to", "somebody@ok.test", "--header", "Subject: called ahead"]);
    assert!(out.contains("Queued as"), "{out}\n{}", d.log());
    wait_for(
        Duration::from_secs(20),
        "the message at the accepting sink",
        || sink_ok.messages().iter().any(|m| m.contains("Subject: called ahead")),
        || d.log(),
    );
}

/// R7: `alert` mails the administrator once per window, however often the rule fires.
#[test]
fn alert_mails_the_administrator_once_per_window() {
    let t = TempDir::new("alert");
    let port = free_port();
    let policy = format!(
        "list local = domains [\"d.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; alert_from \"alerts@d.test\"; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         on mail {{ if sender.domain :is \"noisy.test\" {{ alert \"admin@d.test\" \"noisy sender ${{sender}}\" :every 1h; }} }}\n\
         route {{ if recipient.is_local {{ deliver maildir; }} }}\n"
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    for _ in 0..3 {
        let out = swaks(port, &["--from", "x@noisy.test", "--to", "u@d.test"]);
        assert!(out.contains("Queued as"), "{out}");
    }
    wait_for(
        Duration::from_secs(20),
        "an alert in mail/admin",
        || !maildir(&t.join("mail/admin")).is_empty(),
        || d.log(),
    );
    wait_for(Duration::from_secs(20), "three messages in mail/u", || maildir(&t.join("mail/u")).len() == 3, || d.log());
    let alerts = maildir(&t.join("mail/admin"));
    assert_eq!(alerts.len(), 1, "one alert per window: {alerts:?}");
    assert!(alerts[0].contains("Subject: mailpolicy alert: noisy sender x@noisy.test"), "{}", alerts[0]);
    assert!(alerts[0].contains("From: <alerts@d.test>"), "{}", alerts[0]);
}

/// B7: the daemon signs mail from its own users with DKIM (key made by openssl here).
#[test]
fn dkim_signs_mail_from_our_users() {
    let t = TempDir::new("dkim");
    let port = free_port();
    let (st, out, err) = run_bounded(
        Command::new("openssl").args(["genpkey", "-algorithm", "ed25519", "-out"]).arg(t.join("dkim.pem")),
        Duration::from_secs(30),
    );
    assert!(st.success(), "openssl: {out}{err}");
    let policy = format!(
        "list local = domains [\"d.test\"];\nsecret dkim = file \"dkim.pem\";\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; dkim_key dkim; dkim_selector \"mail\"; dkim_domain \"d.test\"; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         route {{ if recipient.is_local {{ deliver maildir; }} }}\n"
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    // From a local user on a trusted (loopback) client: signed.
    let out = swaks(port, &["--from", "alice@d.test", "--to", "u@d.test", "--header", "Subject: signed"]);
    assert!(out.contains("Queued as"), "{out}");
    // From a foreign domain: not ours to sign.
    let out = swaks(port, &["--from", "eve@other.test", "--to", "u@d.test", "--header", "Subject: unsigned"]);
    assert!(out.contains("Queued as"), "{out}");
    wait_for(Duration::from_secs(20), "two messages in mail/u", || maildir(&t.join("mail/u")).len() == 2, || d.log());
    let msgs = maildir(&t.join("mail/u"));
    let signed = msgs.iter().find(|m| m.contains("Subject: signed")).expect("the signed message");
    assert!(
        signed.contains("DKIM-Signature:")
            && signed.contains("d=d.test")
            && signed.contains("s=mail")
            && signed.contains("a=ed25519-sha256"),
        "{signed}"
    );
    let unsigned = msgs.iter().find(|m| m.contains("Subject: unsigned")).expect("the other message");
    assert!(!unsigned.contains("DKIM-Signature:"), "{unsigned}");
}

/// R46: idle time-outs per phase: `command_timeout` between commands, `data_timeout`
/// inside DATA. (Generous margins: the test checks which time-out applies, not speed.)
#[test]
fn idle_timeouts_per_phase() {
    let t = TempDir::new("timeouts");
    let port = free_port();
    let policy = format!(
        "list local = domains [\"d.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; command_timeout 1s; data_timeout 6s; }}\n\
         route {{ if recipient.is_local {{ deliver maildir; }} }}\n"
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    let connect = || {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
        let r = BufReader::new(s.try_clone().expect("clone"));
        (s, r)
    };
    let reply = |r: &mut BufReader<TcpStream>| -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return all;
            }
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] == b' ' {
                return all;
            }
        }
    };
    // An idle client between commands is dropped after command_timeout.
    let (_s, mut r) = connect();
    assert!(reply(&mut r).starts_with("220"));
    let bye = reply(&mut r);
    assert!(bye.starts_with("421 4.4.2"), "{bye}\n{}", d.log());
    // Inside DATA a pause longer than command_timeout is fine (data_timeout applies).
    let (mut s, mut r) = connect();
    assert!(reply(&mut r).starts_with("220"));
    for (cmd, want) in
        [("EHLO c.test", "250"), ("MAIL FROM:<a@c.test>", "250"), ("RCPT TO:<u@d.test>", "250"), ("DATA", "354")]
    {
        s.write_all(format!("{cmd}\r\n").as_bytes()).expect("write");
        let got = reply(&mut r);
        assert!(got.starts_with(want), "{cmd}: {got}");
    }
    s.write_all(b"Subject: slow\r\n").expect("write");
    std::thread::sleep(Duration::from_secs(3));
    s.write_all(b"\r\nbody\r\n.\r\n").expect("write");
    let got = reply(&mut r);
    assert!(got.starts_with("250"), "a 3 s pause inside DATA is within data_timeout: {got}\n{}", d.log());
}

/// R12: route-stage `bcc` and `archive` make one copy per message, and a copy makes no
/// further copies (a `bcc` every message meets would otherwise copy itself forever).
#[test]
fn route_stage_bcc_and_archive() {
    let t = TempDir::new("copies");
    let port = free_port();
    let policy = format!(
        "list local = domains [\"d.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         route {{\n  bcc \"audit@d.test\";\n  if recipient.local :is \"u\" {{ archive \"copies\"; }}\n  if recipient.is_local {{ deliver maildir; }}\n}}\n"
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    let out = swaks(port, &["--from", "a@c.test", "--to", "u@d.test,v@d.test", "--header", "Subject: copied"]);
    assert!(out.contains("Queued as"), "{out}");
    wait_for(
        Duration::from_secs(20),
        "u, v, audit and the archive",
        || {
            maildir(&t.join("mail/u")).len() == 1
                && maildir(&t.join("mail/v")).len() == 1
                && !maildir(&t.join("mail/audit")).is_empty()
                && !maildir(&t.join("mail/copies")).is_empty()
        },
        || d.log(),
    );
    wait_for(Duration::from_secs(20), "an empty queue", || spool_messages(&d.spool()).is_empty(), || d.log());
    assert_eq!(maildir(&t.join("mail/audit")).len(), 1, "one bcc copy per message, and no copy of the copy");
    assert_eq!(maildir(&t.join("mail/copies")).len(), 1, "one archive copy");
    assert!(maildir(&t.join("mail/audit"))[0].contains("Subject: copied"));
}

/// R10/R43: a smarthost whose certificate a private CA signed is trusted with `:ca`; without
/// it, `:tls required` defers (the system's trust store does not know the CA).
#[test]
fn smarthost_tls_required_trusts_a_private_ca() {
    let t = TempDir::new("privca");
    let openssl = |args: &[&str]| {
        let (st, out, err) =
            run_bounded(Command::new("openssl").args(args).current_dir(t.path()), Duration::from_secs(60));
        assert!(st.success(), "openssl {args:?}: {out}{err}");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=mailpolicy test CA",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "hop.key",
        "-out",
        "hop.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(t.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("ext file");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "hop.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "hop.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    // The next hop: a second daemon with the CA-signed certificate, STARTTLS.
    let (port, hop_port) = (free_port(), free_port());
    let hop_dir = t.join("hop");
    std::fs::create_dir_all(&hop_dir).expect("hop dir");
    let hop_policy = format!(
        "list local = domains [\"far.test\"];\n\
         server {{ hostname \"hop.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; }}\n\
         listener smtp {{ address \"127.0.0.1:{hop_port}\"; tls starttls; cert \"{}\"; key \"{}\"; }}\n\
         route {{ deliver maildir; }}\n",
        t.join("hop.pem").display(),
        t.join("hop.key").display()
    );
    let hop = Daemon::start(&hop_dir, &hop_policy, &[hop_port]);
    let policy = format!(
        "list local = domains [\"d.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; retry_min 1s; retry_max 2s; queue_run 1s; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         route {{\n  if recipient.local :is \"pinned\" {{ deliver smtp \"[127.0.0.1]:{hop_port}\" :tls required :ca \"{}\"; }}\n  \
         deliver smtp \"[127.0.0.1]:{hop_port}\" :tls required;\n}}\n",
        t.join("ca.pem").display()
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    let out = swaks(port, &["--from", "a@d.test", "--to", "pinned@far.test", "--header", "Subject: via-private-ca"]);
    assert!(out.contains("Queued as"), "{out}");
    let out = swaks(port, &["--from", "a@d.test", "--to", "other@far.test", "--header", "Subject: no-ca-given"]);
    assert!(out.contains("Queued as"), "{out}");
    wait_for(
        Duration::from_secs(30),
        "the pinned message at the next hop",
        || maildir(&hop_dir.join("mail/pinned")).iter().any(|m| m.contains("via-private-ca")),
        || format!("{}\n--- hop ---\n{}", d.log(), hop.log()),
    );
    assert!(d.log().contains("tls=yes"), "{}", d.log());
    // Without :ca the certificate does not verify: deferred, never sent in clear.
    wait_for(
        Duration::from_secs(30),
        "the other message deferred",
        || d.log().contains("to=other@far.test") && d.log().contains("status=deferred"),
        || d.log(),
    );
    assert!(maildir(&hop_dir.join("mail/other")).is_empty());
}

// ================================================================== issue 20: every real message survives

/// `../shared` beside the project (CI lays the corpus and the poison messages there).
fn shared_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let shared = root.join("../shared");
    assert!(
        shared.join("corpus/messages").is_dir(),
        "{} has no corpus/messages: the real-message tests read ../shared/corpus beside the project",
        shared.display()
    );
    shared
}

/// One corpus or poison message through one daemon in the three ways (the regression test of
/// each defect the poison messages showed).
fn run_corpus_files(rels: &[&str]) {
    let shared = shared_dir();
    run_corpus(&rels.iter().map(|r| shared.join(r)).collect::<Vec<_>>());
}

/// How a message is sent to the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    /// DATA with every line end made CRLF, as a well-behaved client sends it.
    Data,
    /// DATA with the file's bytes as they are (bare LF and CR included), dot-stuffed.
    Raw,
    /// BDAT `BODY=BINARYMIME` with the file's bytes as they are, in 64 KiB chunks.
    Bdat,
}

/// Every line end CRLF (bare LF and bare CR alike), ending with one.
fn crlf(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 20 + 2);
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b'\r' if data.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 2;
                continue;
            }
            b'\r' | b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// What the daemon receives as the message for each way of sending `data`.
fn as_received(data: &[u8], way: Way) -> Vec<u8> {
    match way {
        Way::Data => crlf(data),
        Way::Raw => {
            let mut v = data.to_vec();
            if !v.ends_with(b"\r\n") {
                v.extend_from_slice(b"\r\n");
            }
            v
        }
        Way::Bdat => data.to_vec(),
    }
}

/// A plain SMTP client for raw bytes.
struct Smtp {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Smtp {
    fn connect(port: u16) -> std::io::Result<Smtp> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        s.set_write_timeout(Some(Duration::from_secs(60)))?;
        let mut c = Smtp { r: BufReader::new(s.try_clone()?), w: s };
        let (code, text) = c.reply()?;
        if code != 220 {
            return Err(std::io::Error::other(format!("banner {text}")));
        }
        c.cmd("EHLO corpus.test")?;
        Ok(c)
    }

    fn reply(&mut self) -> std::io::Result<(u16, String)> {
        let mut text = String::new();
        loop {
            let mut line = Vec::new();
            if self.r.read_until(b'\n', &mut line)? == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("closed after {text:?}")));
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            text.push_str(&line);
            let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok((code, text));
            }
        }
    }

    fn cmd(&mut self, line: &str) -> std::io::Result<(u16, String)> {
        self.w.write_all(format!("{line}\r\n").as_bytes())?;
        self.reply()
    }

    /// One transaction; the reply to the message (or to the first refused command).
    fn send(&mut self, from: &str, to: &[&str], data: &[u8], way: Way) -> std::io::Result<(u16, String)> {
        let eight_bit = data.iter().any(|b| *b >= 0x80);
        let body = match way {
            Way::Bdat => " BODY=BINARYMIME",
            _ if eight_bit => " BODY=8BITMIME",
            _ => "",
        };
        let (c, t) = self.cmd(&format!("MAIL FROM:<{from}>{body}"))?;
        if c != 250 {
            return Ok((c, t));
        }
        let mut any = false;
        for r in to {
            let (c, _) = self.cmd(&format!("RCPT TO:<{r}>"))?;
            any |= c == 250;
        }
        if !any {
            let (c, t) = self.cmd("RSET")?;
            return Ok((if c == 250 { 554 } else { c }, t));
        }
        match way {
            Way::Bdat => {
                let chunks: Vec<&[u8]> = data.chunks(64 * 1024).collect();
                if chunks.is_empty() {
                    return self.cmd("BDAT 0 LAST");
                }
                for (i, ch) in chunks.iter().enumerate() {
                    let last = i + 1 == chunks.len();
                    self.w.write_all(format!("BDAT {}{}\r\n", ch.len(), if last { " LAST" } else { "" }).as_bytes())?;
                    self.w.write_all(ch)?;
                    let (c, t) = self.reply()?;
                    if last || c != 250 {
                        return Ok((c, t));
                    }
                }
                unreachable!("the last chunk returned")
            }
            Way::Data | Way::Raw => {
                let (c, t) = self.cmd("DATA")?;
                if c != 354 {
                    return Ok((c, t));
                }
                let content = as_received(data, way);
                // Dot-stuffing at the line starts the server recognises (after CRLF).
                let mut out = Vec::with_capacity(content.len() + 64);
                let mut at_start = true;
                let mut prev = 0u8;
                for &b in &content {
                    if at_start && b == b'.' {
                        out.push(b'.');
                    }
                    out.push(b);
                    at_start = prev == b'\r' && b == b'\n';
                    prev = b;
                }
                out.extend_from_slice(b".\r\n");
                self.w.write_all(&out)?;
                self.reply()
            }
        }
    }
}

/// Line ends as Maildir delivery writes them (CRLF to LF).
fn to_lf(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i] == b'\r' && data.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(data[i]);
        i += 1;
    }
    out
}

/// The test's own reading of a message: its header fields (each with its continuation
/// lines) and its body (from the empty line on), for any line-ending style.
fn split_message(data: &[u8]) -> (Vec<Vec<u8>>, Vec<u8>) {
    let mut fields: Vec<Vec<u8>> = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let end = data[pos..].iter().position(|b| *b == b'\n').map(|i| pos + i + 1).unwrap_or(data.len());
        let line = &data[pos..end];
        let content = line.strip_suffix(b"\n").unwrap_or(line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        if content.is_empty() && line.ends_with(b"\n") {
            return (fields, data[pos..].to_vec());
        }
        match (line.first(), fields.last_mut()) {
            (Some(b' ' | b'\t'), Some(last)) => last.extend_from_slice(line),
            _ => fields.push(line.to_vec()),
        }
        pos = end;
    }
    (fields, Vec::new())
}

fn field_is(field: &[u8], name: &str) -> bool {
    let colon = field.iter().position(|b| *b == b':').unwrap_or(0);
    field.get(..colon).is_some_and(|n| n.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
}

/// `delivered` (a Maildir file) is `received` with the fields named in `removed` taken out of
/// its header section, below header fields whose names are all in `added`.
fn check_delivered(delivered: &[u8], received: &[u8], added: &[&str], removed: &[&str]) -> Result<(), String> {
    let (fields, body) = split_message(received);
    let mut expected = Vec::new();
    for f in fields.iter().filter(|f| !removed.iter().any(|r| field_is(f, r))) {
        expected.extend_from_slice(f);
    }
    expected.extend_from_slice(&body);
    let mut expected = to_lf(&expected);
    if !expected.ends_with(b"\n") {
        expected.push(b'\n');
    }
    let Some(prefix_len) = delivered.len().checked_sub(expected.len()) else {
        return Err(format!("delivered {} bytes, fewer than the {} expected", delivered.len(), expected.len()));
    };
    if delivered[prefix_len..] != expected[..] {
        let at = delivered[prefix_len..].iter().zip(&expected).position(|(a, b)| a != b).unwrap_or(0);
        return Err(format!(
            "the delivered message differs from what was sent at byte {at} of {}: got {:?}, expected {:?}",
            expected.len(),
            String::from_utf8_lossy(&delivered[prefix_len + at..(prefix_len + at + 80).min(delivered.len())]),
            String::from_utf8_lossy(&expected[at..(at + 80).min(expected.len())]),
        ));
    }
    let (ours, rest) = split_message(&delivered[..prefix_len]);
    if !rest.is_empty() {
        return Err(format!(
            "an empty line in the fields added on top: {:?}",
            String::from_utf8_lossy(&delivered[..prefix_len])
        ));
    }
    for f in &ours {
        if !added.iter().any(|a| field_is(f, a)) {
            return Err(format!("a field nobody added: {:?}", String::from_utf8_lossy(f)));
        }
    }
    for r in removed {
        let (fields, _) = split_message(delivered);
        if let Some(f) = fields.iter().find(|f| field_is(f, r)) {
            return Err(format!("{r} was to be removed: {:?}", String::from_utf8_lossy(f)));
        }
    }
    Ok(())
}

/// The Maildir files of `dir/new`, as bytes.
fn maildir_bytes(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(rd) = std::fs::read_dir(dir.join("new")) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()).filter_map(|e| std::fs::read(e.path()).ok()).collect()
}

/// unbound with the corpus's DKIM/ARC key records; every other name is NXDOMAIN at once.
fn corpus_dns(dir: &Path) -> Unbound {
    let shared = shared_dir();
    let mut records: Vec<(String, String)> = Vec::new();
    for e in std::fs::read_dir(shared.join("corpus/dns")).expect("corpus/dns").flatten() {
        let p = e.path();
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        if p.extension().is_some_and(|x| x == "json") {
            let v: serde_json::Value = serde_json::from_str(&text).expect("dns json");
            for (domain, subs) in v.as_object().into_iter().flatten() {
                for (sub, recs) in subs.as_object().into_iter().flatten() {
                    for r in recs.as_array().into_iter().flatten() {
                        if let (Some("txt"), Some(val)) =
                            (r.get(0).and_then(|x| x.as_str()), r.get(1).and_then(|x| x.as_str()))
                        {
                            records.push((format!("{sub}.{domain}"), val.to_string()));
                        }
                    }
                }
            }
        } else {
            for l in text.lines() {
                if let Some((name, val)) = l.trim().split_once(' ') {
                    records.push((name.to_string(), val.trim().to_string()));
                }
            }
        }
    }
    let lines: Vec<String> = records
        .iter()
        .filter(|(n, v)| !n.contains('\'') && !v.contains('\'') && !v.contains('"'))
        .map(|(n, v)| {
            let strings: Vec<String> =
                v.as_bytes().chunks(200).map(|c| format!("\"{}\"", String::from_utf8_lossy(c))).collect();
            format!("{}. TXT {}", n.trim_end_matches('.'), strings.join(" "))
        })
        .collect();
    let mut refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    refs.push("mx.test. A 127.0.0.1");
    unbound_zones(dir, &refs, &["."])
}

/// [`unbound`] answering only from `records`, with `zones` static.
fn unbound_zones(dir: &Path, records: &[&str], zones: &[&str]) -> Unbound {
    const UNBOUND: &str = "/usr/sbin/unbound";
    need(UNBOUND, "unbound");
    let port = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp").local_addr().expect("addr").port();
    std::fs::create_dir_all(dir).expect("dir");
    let mut conf = format!(
        "server:\n  interface: 127.0.0.1@{port}\n  port: {port}\n  do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"\"\n  do-ip6: no\n  access-control: 127.0.0.0/8 allow\n",
        d = dir.display()
    );
    for z in zones {
        conf.push_str(&format!("  local-zone: \"{z}\" static\n"));
    }
    for r in records {
        conf.push_str(&format!("  local-data: '{r}'\n"));
    }
    conf.push_str("remote-control:\n  control-enable: no\n");
    std::fs::write(dir.join("unbound.conf"), conf).expect("write unbound.conf");
    let child = Command::new(UNBOUND)
        .arg("-d")
        .arg("-c")
        .arg(dir.join("unbound.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start unbound");
    std::thread::sleep(Duration::from_millis(300));
    Unbound { guard: Guard(Some(child)), port }
}

/// The policy of the corpus runs: header and body tests, attachments, SPF/DKIM/DMARC,
/// header edits, archive, bcc, list expansion and bounces.
fn corpus_policy(port: u16, dns: u16) -> String {
    format!(
        r#"require ["spf", "dkim", "dmarc"];
list local = domains ["d.test"];
table aliases = map "aliases";

server {{
  hostname "mx.test";
  spool "spool";
  maildir "mail";
  local_domains local;
  dns_server "127.0.0.1:{dns}";
  dns_timeout 2s;
  lookup_timeout 4s;
  retry_min 1s;
  retry_max 2s;
  queue_run 1s;
  max_message_size 50M;
  max_header_size 1M;
}}

listener smtp {{
  address "127.0.0.1:{port}";
  tls none;
}}

on data {{
  if header "subject" :contains "corpus-never-matches-0" {{ reject 550 5.7.1 "subject"; }}
  if body :contains "corpus-never-matches-1" {{ reject 550 5.7.1 "body"; }}
  if attachment.names :matches ["*.corpus-never-matches-2"] {{ reject 550 5.7.1 "attachment"; }}
  if anyof(spf :is "pass", dkim :is "pass", dmarc :is "pass") {{ header add "X-Corpus-Auth" "pass"; }}
  header remove "X-Spam-Flag";
  header add "X-Corpus" "checked";
  archive "archive";
  bcc "audit@d.test";
}}

route {{
  expand aliases;
  if recipient.local :matches "nobody*" {{ reject 550 5.1.1 "No such user"; }}
  deliver maildir;
}}
"#
    )
}

/// Fields the corpus policy and the daemon add on top of a message.
const CORPUS_ADDED: &[&str] =
    &["Return-Path", "Delivered-To", "Received", "Authentication-Results", "X-Corpus", "X-Corpus-Auth"];

/// Sends `files` (paths under ../shared) in the three ways through one daemon and checks:
/// every accepted message is delivered once to its recipient, to both members of the
/// expanded list, to the bcc address and to the archive, byte-identical apart from the
/// fields added and the X-Spam-Flag removed; the unknown recipient's DSN reaches the
/// sender; no panic is logged and the queue manager never dies.
fn run_corpus(files: &[PathBuf]) {
    let t = TempDir::new("corpus");
    let port = free_port();
    let dns = corpus_dns(&t.join("unbound"));
    std::fs::write(t.join("aliases"), "list@d.test l1@d.test, l2@d.test\nowner-list@d.test lists-owner@d.test\n")
        .expect("aliases");
    let d = Daemon::start(t.path(), &corpus_policy(port, dns.port), &[port]);
    let mut accepted: Vec<(usize, Way, Vec<u8>)> = Vec::new();
    let mut refused: Vec<String> = Vec::new();
    let mut n = 0usize;
    for f in files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for way in [Way::Data, Way::Raw, Way::Bdat] {
            n += 1;
            let mut c = Smtp::connect(port).unwrap_or_else(|e| panic!("connect for {}: {e}\n{}", f.display(), d.log()));
            let (m, s, x) = (format!("m{n}@d.test"), format!("s{n}@d.test"), format!("nobody{n}@d.test"));
            let (code, text) = c
                .send(&s, &[&m, "list@d.test", &x], &data, way)
                .unwrap_or_else(|e| panic!("{} sent by {way:?}: the session died: {e}\n{}", f.display(), d.log()));
            let _ = c.cmd("QUIT");
            assert!(
                code == 250 || (500..600).contains(&code),
                "{} by {way:?}: {code} is neither 250 nor a permanent refusal: {text}\n{}",
                f.display(),
                d.log().lines().rev().take(20).collect::<Vec<_>>().join("\n")
            );
            if code == 250 {
                accepted.push((n, way, as_received(&data, way)));
            } else {
                refused.push(format!("{} by {way:?}: {}", f.display(), text.trim()));
            }
        }
    }
    let total = accepted.len();
    wait_for(
        Duration::from_secs(120 + total as u64 / 2),
        "every accepted message delivered and the queue empty",
        || {
            spool_messages(&d.spool()).is_empty()
                && maildir_bytes(&t.join("mail/archive")).len() >= total
                && maildir_bytes(&t.join("mail/audit")).len() >= total
        },
        || format!("{} accepted; queue: {}\n{}", total, queue_list(&d.spool()), d.log()),
    );
    let log = d.log();
    assert!(!log.contains("panicked"), "a panic was logged:\n{log}");
    assert!(!log.contains("qmgr-died"), "the queue manager died:\n{log}");
    assert!(!log.contains("session-failed"), "a session failed:\n{log}");
    assert!(files_under(&d.spool().join("corrupt")).is_empty(), "nothing goes to corrupt/:\n{log}");
    let mut failures = Vec::new();
    for (n, way, sent) in &accepted {
        let own = maildir_bytes(&t.join(&format!("mail/m{n}")));
        if own.len() != 1 {
            failures.push(format!("#{n} {way:?}: {} copies for its recipient", own.len()));
            continue;
        }
        if let Err(e) = check_delivered(&own[0], sent, CORPUS_ADDED, &["X-Spam-Flag"]) {
            failures.push(format!("#{n} {way:?}: {e}"));
        }
        let dsn = maildir_bytes(&t.join(&format!("mail/s{n}")));
        let text = dsn.first().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
        if dsn.len() != 1
            || !text.contains("multipart/report")
            || !text.contains(&format!("nobody{n}@d.test"))
            || !text.contains("5.1.1")
        {
            failures.push(format!(
                "#{n} {way:?}: {} DSNs to the sender: {}",
                dsn.len(),
                text.get(..300).unwrap_or(&text)
            ));
        }
    }
    // A message with more than 50 Received: fields (ours included) is a mail loop: the list
    // is not expanded for it (554 5.4.6), every other copy is made.
    let loops = accepted
        .iter()
        .filter(|(_, _, sent)| split_message(sent).0.iter().filter(|f| field_is(f, "Received")).count() + 1 > 50)
        .count();
    for (who, want) in [("l1", total - loops), ("l2", total - loops), ("audit", total), ("archive", total)] {
        let got = maildir_bytes(&t.join(&format!("mail/{who}"))).len();
        if got != want {
            failures.push(format!("{who}: {got} copies, {want} expected ({total} accepted, {loops} loops)"));
        }
    }
    for a in maildir_bytes(&t.join("mail/archive")) {
        let text = String::from_utf8_lossy(&a[..a.len().min(200)]).into_owned();
        if !text.starts_with("Return-Path: <s") {
            failures.push(format!("an archive copy not from the sender: {text:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} accepted messages went wrong ({} refused):\n{}\nrefused:\n{}",
        failures.len(),
        total,
        refused.len(),
        failures.join("\n"),
        refused.join("\n")
    );
    eprintln!("corpus: {} sends, {} accepted and delivered, {} refused", n, total, refused.len());
}

/// Every message of `../shared/corpus` (set `MAILPOLICY_CORPUS=all`) or, by default, a
/// sample of it: every poison message, every derived one, and every 12th of the rest.
#[test]
fn corpus_through_the_daemon_in_three_ways() {
    let shared = shared_dir();
    let want = std::env::var("MAILPOLICY_CORPUS").unwrap_or_default();
    let all = want == "all";
    let mut files = Vec::new();
    let mut names: Vec<PathBuf> =
        std::fs::read_dir(shared.join("corpus/messages")).expect("corpus").flatten().map(|e| e.path()).collect();
    names.sort();
    for (i, p) in names.into_iter().enumerate() {
        let picked = match want.as_str() {
            "all" => true,
            "" => i % 12 == 0,
            // MAILPOLICY_CORPUS=TEXT: the messages whose file name contains TEXT.
            text => p.file_name().is_some_and(|n| n.to_string_lossy().contains(text)),
        };
        if picked {
            files.push(p);
        }
    }
    for dir in ["corpus/derived", "poison"].iter().filter(|_| all || want.is_empty()) {
        let mut v: Vec<PathBuf> = std::fs::read_dir(shared.join(dir))
            .expect("dir")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .collect();
        v.sort();
        files.extend(v);
    }
    run_corpus(&files);
}

/// Issue 20.1: the messages whose decoded text the queue manager sliced at byte 9 (UTF-8
/// header lines; BINARYMIME bodies with LF line ends) are delivered, and the queue manager
/// lives on.
#[test]
fn qmgr_slice_poison_messages_are_delivered() {
    run_corpus_files(&[
        "poison/qmgr-slice.utf8-cyrillic-from-header.flanker-mailformed-headers.eml",
        "poison/qmgr-slice.utf8-from-header-rfc6532.mikel-mail-utf8_headers.eml",
        "poison/qmgr-slice.utf8-received-continuation.spamassassin-nice-unicode1.eml",
        "poison/qmgr-slice-binarymime.lf-body-german-umlaut.mail-parser-thirdparty-015.eml",
        "poison/qmgr-slice-binarymime.lf-body-eucjp.spamassassin-cjk-iso-2022-jp.2.eml",
        "corpus/derived/derived_qmgr_slice_subject_latin1.eml",
    ]);
}

/// Issue 20.2: the message that made mail-parser 0.9.4 panic (the session died with no
/// reply) is accepted and delivered intact in every way.
#[test]
fn mail_parser_malformed_019_is_accepted_and_delivered() {
    run_corpus_files(&["poison/mailparser-0.9.4-panic.session-dies-at-data.mail-parser-malformed-019.eml"]);
}

/// Issue 20.4: with BODY=BINARYMIME and bare LF line ends, and with an empty header section,
/// `header remove` edits only the header section (a body line, a line of an embedded
/// message/rfc822 stay); Received: lines in a body are no mail loop.
#[test]
fn header_edits_stay_in_the_header_section_for_every_line_ending() {
    run_corpus_files(&[
        "poison/binarymime-lf-header-remove-deletes-body-line.spamassassin-nice-005.eml",
        "poison/binarymime-lf-header-remove-deletes-embedded-rfc822-line.php-mime-mail-parser-issue158a.eml",
        "corpus/derived/derived_no_header_section_with_xspamflag_in_body.eml",
        "corpus/derived/derived_xspamflag_folded.eml",
    ]);
    // 55 Received: lines in the body of an LF message sent to a list: delivered, no loop.
    let t = TempDir::new("body-received");
    let mut m = b"From: a@s.test\nTo: list@d.test\nSubject: quoted headers\nX-Spam-Flag: YES\n\n".to_vec();
    for i in 0..55 {
        m.extend_from_slice(
            format!("Received: from hop{i}.example by x; Sun, 22 Nov 2026 10:00:00 +0000\n").as_bytes(),
        );
    }
    m.extend_from_slice(b"X-Spam-Flag: a body line\n");
    let f = t.join("body-received.eml");
    std::fs::write(&f, &m).expect("write");
    run_corpus(&[f]);
}

fn fault_policy(port: u16) -> String {
    format!(
        "list local = domains [\"d.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; retry_min 1s; retry_max 2s; queue_run 1s; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         route {{ deliver maildir; }}\n"
    )
}

fn send_marked(port: u16, to: &str, marker: &str) -> (u16, String) {
    let mut c = Smtp::connect(port).expect("connect");
    let msg = format!("From: a@d.test\r\nTo: {to}\r\nSubject: {marker}\r\n\r\nbody {marker}\r\n");
    let r = c.send("a@d.test", &[to], msg.as_bytes(), Way::Data).expect("send");
    let _ = c.cmd("QUIT");
    r
}

/// Issue 20.1: a failure in one message's processing (a panic, injected) moves that message
/// to corrupt/ with a log line, and the queue goes on: in routing and in delivery.
#[test]
fn a_panic_in_one_message_moves_it_to_corrupt_and_the_queue_goes_on() {
    let t = TempDir::new("fault-msg");
    let port = free_port();
    let d = Daemon::start_env(
        t.path(),
        &fault_policy(port),
        &[port],
        &[("MAILPOLICY_FAULT", "qmgr-admit:POISON-ROUTE,delivery:POISON-DELIVERY")],
    );
    assert_eq!(send_marked(port, "p1@d.test", "POISON-ROUTE").0, 250);
    assert_eq!(send_marked(port, "p2@d.test", "POISON-DELIVERY").0, 250);
    assert_eq!(send_marked(port, "ok@d.test", "fine-after").0, 250);
    wait_for(
        Duration::from_secs(30),
        "the good message delivered",
        || maildir(&t.join("mail/ok")).len() == 1,
        || d.log(),
    );
    wait_for(
        Duration::from_secs(30),
        "both poisoned messages in corrupt/",
        || files_under(&d.spool().join("corrupt")).len() >= 2,
        || format!("{:?}\n{}", files_under(&d.spool()), d.log()),
    );
    let log = d.log();
    assert!(log.contains("corrupt") && log.contains("processing failed: fault injection at qmgr-admit"), "{log}");
    assert!(log.contains("delivery failed: fault injection at delivery"), "{log}");
    assert!(!log.contains("qmgr-died"), "the queue manager itself survived:\n{log}");
    assert!(maildir(&t.join("mail/p1")).is_empty() && maildir(&t.join("mail/p2")).is_empty());
    assert_eq!(send_marked(port, "ok2@d.test", "still-fine").0, 250);
    wait_for(Duration::from_secs(30), "later mail delivered", || maildir(&t.join("mail/ok2")).len() == 1, || d.log());
}

/// Issue 20.1: when the queue manager itself dies, new mail is answered 451 4.3.0 until its
/// supervisor has restarted it; the message that killed it is in corrupt/ and neither the
/// supervisor's restart nor a daemon restart runs it again.
#[test]
fn a_dead_queue_manager_answers_451_until_it_is_back() {
    let t = TempDir::new("fault-task");
    let port = free_port();
    let mut d = Daemon::start_env(t.path(), &fault_policy(port), &[port], &[("MAILPOLICY_FAULT", "qmgr-task:KILLER")]);
    // A transaction held open before its final dot, to be finished while the manager is down.
    let mut held = Smtp::connect(port).expect("connect");
    assert_eq!(held.cmd("MAIL FROM:<a@d.test>").expect("mail").0, 250);
    assert_eq!(held.cmd("RCPT TO:<while-down@d.test>").expect("rcpt").0, 250);
    assert_eq!(held.cmd("DATA").expect("data").0, 354);
    held.w.write_all(b"Subject: while down\r\n\r\nx\r\n").expect("write");
    assert_eq!(send_marked(port, "victim@d.test", "KILLER").0, 250);
    wait_for(Duration::from_secs(30), "the queue manager to die", || d.log().contains("qmgr-died"), || d.log());
    held.w.write_all(b".\r\n").expect("dot");
    let (code, text) = held.reply().expect("reply");
    assert!(code == 451 && text.contains("4.3.0"), "new mail while the queue manager is down: {text}\n{}", d.log());
    wait_for(Duration::from_secs(30), "the restart", || d.log().contains("qmgr-restarted"), || d.log());
    assert_eq!(send_marked(port, "after@d.test", "after").0, 250);
    wait_for(
        Duration::from_secs(30),
        "mail after the restart",
        || maildir(&t.join("mail/after")).len() == 1,
        || d.log(),
    );
    assert_eq!(files_under(&d.spool().join("corrupt")).len(), 1, "{}", d.log());
    assert!(maildir(&t.join("mail/victim")).is_empty());
    // A daemon restart does not run it again either.
    d.kill9();
    d.restart();
    assert_eq!(send_marked(port, "after2@d.test", "after2").0, 250);
    wait_for(
        Duration::from_secs(30),
        "mail after a daemon restart",
        || maildir(&t.join("mail/after2")).len() == 1,
        || d.log(),
    );
    assert_eq!(d.log().matches("qmgr-died").count(), 1, "{}", d.log());
}

/// Issue 20.3: a session that dies (a panic, injected) releases its `concurrent by
/// client.ip` count: three of them do not lock the address out.
#[test]
fn a_session_that_dies_releases_its_concurrency_count() {
    let t = TempDir::new("fault-session");
    let port = free_port();
    let policy = format!(
        "require \"ratelimit\";\nlist local = domains [\"d.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         on connect {{ if concurrent by client.ip > 2 {{ tempfail 421 4.7.0 \"Too many connections from you\"; }} }}\n\
         route {{ deliver maildir; }}\n"
    );
    let d = Daemon::start_env(t.path(), &policy, &[port], &[("MAILPOLICY_FAULT", "session:SESSION-KILLER")]);
    for i in 0..3 {
        let mut c = Smtp::connect(port).expect("connect");
        let msg = b"Subject: SESSION-KILLER\r\n\r\nx\r\n";
        let r = c.send("a@d.test", &["x@d.test"], msg, Way::Data);
        assert!(r.is_err(), "session {i} was to die: {r:?}");
    }
    wait_for(
        Duration::from_secs(10),
        "three failed sessions",
        || d.log().matches("session-failed").count() == 3,
        || d.log(),
    );
    for i in 0..4 {
        let (code, text) = send_marked(port, "ok@d.test", &format!("after-{i}"));
        assert_eq!(code, 250, "connection {i} after the dead sessions: {text}\n{}", d.log());
    }
}

/// Issue 20.7: a message to an expanded list gets one archive copy, from its own sender.
#[test]
fn one_archive_copy_per_message_to_an_expanded_list() {
    let t = TempDir::new("archive-once");
    let port = free_port();
    std::fs::write(t.join("aliases"), "team@d.test x@d.test, y@d.test\nowner-team@d.test boss@d.test\n")
        .expect("aliases");
    let policy = format!(
        "list local = domains [\"d.test\"];\ntable aliases = map \"aliases\";\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         on data {{ archive \"arch\"; }}\n\
         route {{ expand aliases; archive \"routed\"; deliver maildir; }}\n"
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    let out = swaks(port, &["--from", "sender@c.test", "--to", "team@d.test", "--header", "Subject: to the team"]);
    assert!(out.contains("Queued as"), "{out}");
    wait_for(
        Duration::from_secs(20),
        "both members and an empty queue",
        || {
            maildir(&t.join("mail/x")).len() == 1
                && maildir(&t.join("mail/y")).len() == 1
                && spool_messages(&d.spool()).is_empty()
        },
        || d.log(),
    );
    for folder in ["arch", "routed"] {
        let copies = maildir(&t.join(&format!("mail/{folder}")));
        assert_eq!(copies.len(), 1, "one {folder} copy per message:\n{}", d.log());
        assert!(copies[0].starts_with("Return-Path: <sender@c.test>"), "{}", copies[0]);
    }
}

// ================================================================== issue 10: hardening

/// Issue 10.1: a Maildir or mbox path built from the recipient stays under the directory
/// its literal prefix names: `..` and `/` in the local part are escaped into one path
/// component, and a symbolic link below the root is never followed (the delivery fails
/// with a 5.7.1 bounce and a log line, and nothing is written outside).
#[test]
fn delivery_paths_from_client_data_stay_in_their_directory() {
    let t = TempDir::new("paths");
    let port = free_port();
    let outside = t.join("outside");
    std::fs::create_dir_all(&outside).expect("outside");
    std::fs::create_dir_all(t.join("boxes")).expect("boxes");
    std::os::unix::fs::symlink(&outside, t.join("boxes/evil")).expect("symlink");
    std::os::unix::fs::symlink(&outside, t.join("boxes/evilbox")).expect("symlink");
    let policy = format!(
        "list local = domains [\"d.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         route {{\n\
           if recipient.local :matches \"*box*\" {{ deliver mbox \"boxes/${{recipient.local}}\"; }}\n\
           deliver maildir \"boxes/${{recipient.local}}/\";\n\
         }}\n"
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    let mut c = Smtp::connect(port).expect("connect");
    let to = [
        "\"x/../../outside/pwned\"@d.test",
        "\"../../outside/pwnbox\"@d.test",
        "evil@d.test",
        "evilbox@d.test",
        "sender@d.test",
    ];
    let (code, text) = c.send("sender@d.test", &to, b"Subject: escape\r\n\r\nbody\r\n", Way::Data).expect("send");
    assert_eq!(code, 250, "{text}");
    wait_for(
        Duration::from_secs(30),
        "deliveries and the DSN for the two symlinked boxes",
        || spool_messages(&d.spool()).is_empty() && !maildir(&t.join("boxes/sender")).is_empty(),
        || format!("{:?}\n{}", files_under(t.path()), d.log()),
    );
    assert!(files_under(&outside).is_empty(), "nothing written outside: {:?}", files_under(&outside));
    let inside = files_under(&t.join("boxes"));
    // The quoted local part (quotes included) is one escaped component of boxes/.
    assert!(inside.iter().any(|f| f.starts_with("_x_.._.._outside_pwned_/new/")), "{inside:?}");
    assert!(inside.iter().any(|f| f == "_.._.._outside_pwnbox_"), "{inside:?}");
    let dsn = maildir(&t.join("boxes/sender")).join("\n");
    assert!(dsn.contains("evil@d.test") && dsn.contains("evilbox@d.test") && dsn.contains("5.7.1"), "{dsn}");
    let log = d.log();
    assert!(log.contains("symbolic link"), "a log line names the refusal:\n{log}");
}

/// Issue 10.5: a body line over 998 octets is accepted; a Maildir keeps it whole, the SMTP
/// next hop gets it folded by CRLF SPACE into lines of at most 998 octets.
#[test]
fn long_lines_are_accepted_and_passed_on() {
    let t = TempDir::new("longline");
    let (port, sport) = (free_port(), free_port());
    let sink = Sink::start(&t.join("sink"), sport, &[]);
    let d = Daemon::start(t.path(), &base_policy(port, sport, "none"), &[port]);
    let long = "x".repeat(5000);
    let msg = format!("Subject: long-line-e2e\r\n\r\n{long}\r\nend\r\n");
    let mut c = Smtp::connect(port).expect("connect");
    let (code, text) = c.send("a@s.test", &["u@d.test", "far@far.test"], msg.as_bytes(), Way::Data).expect("send");
    assert_eq!(code, 250, "{text}");
    wait_for(
        Duration::from_secs(30),
        "the Maildir copy and the relayed one",
        || maildir(&t.join("mail/u")).len() == 1 && sink.messages().iter().any(|m| m.contains("long-line-e2e")),
        || d.log(),
    );
    assert!(maildir(&t.join("mail/u"))[0].contains(&long), "the Maildir keeps the line whole");
    let relayed = sink.messages().into_iter().find(|m| m.contains("long-line-e2e")).expect("relayed");
    assert!(!relayed.contains(&long));
    assert!(relayed.lines().all(|l| l.trim_end_matches('\r').len() <= 998), "folded on the way out");
    let joined: String = relayed.replace("\r\n ", "").replace("\n ", "");
    assert!(joined.contains(&long), "unfolding gives the line back");
}

/// Issue 10.4: free space is checked at MAIL against the spool's real file system: with
/// `queue_minfree` above what is free MAIL gets 452 4.3.1 before any upload; with it within
/// reach, a SIZE that does not fit gets 452 4.3.1 and one that fits is accepted.
#[test]
fn free_space_is_checked_at_mail_with_size() {
    let t = TempDir::new("minfree");
    std::fs::create_dir_all(t.join("spool")).expect("spool");
    let free = {
        let out = Command::new("df").args(["-B1", "--output=avail"]).arg(t.join("spool")).output().expect("df");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse::<u64>().ok())
            .expect("df avail")
    };
    let policy_for = |port: u16, minfree: u64| {
        format!(
            "list local = domains [\"d.test\"];\n\
             server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; queue_minfree {minfree}; max_message_size {max}; }}\n\
             listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\nroute {{ deliver maildir; }}\n",
            max = free.saturating_mul(4)
        )
    };
    // queue_minfree twice what is free: every MAIL is refused.
    let port = free_port();
    let d = Daemon::start(t.path(), &policy_for(port, free.saturating_mul(2)), &[port]);
    let mut c = Smtp::connect(port).expect("connect");
    let (code, text) = c.cmd("MAIL FROM:<a@d.test>").expect("mail");
    assert!(code == 452 && text.contains("4.3.1"), "{text}");
    drop(c);
    drop(d);
    // queue_minfree half of what is free: a SIZE of everything that is free does not fit,
    // a small one does.
    let t2 = TempDir::new("minfree2");
    let port = free_port();
    let _d = Daemon::start(t2.path(), &policy_for(port, free / 2), &[port]);
    let mut c = Smtp::connect(port).expect("connect");
    let (code, text) = c.cmd(&format!("MAIL FROM:<a@d.test> SIZE={free}")).expect("mail");
    assert!(code == 452 && text.contains("4.3.1"), "{text}");
    assert_eq!(c.cmd("RSET").expect("rset").0, 250);
    assert_eq!(c.cmd("MAIL FROM:<a@d.test> SIZE=1000").expect("mail").0, 250);
}

/// Issue 10.3: 200 connections from one address that drip a byte every two seconds cannot
/// lock others out: the per-client limit (50) leaves the other slots free, a client from
/// another loopback address gets through at once, and with most slots taken the time-outs
/// shrink so the drippers are cut off by the per-request deadline, not after five minutes.
#[test]
fn slow_clients_cannot_lock_others_out() {
    let t = TempDir::new("slow");
    let port = free_port();
    let dns = unbound_zones(&t.join("unbound"), &[], &["."]);
    let policy = format!(
        "list local = domains [\"d.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; max_sessions 60; dns_server \"127.0.0.1:{}\"; dns_timeout 2s; }}\n\
         listener smtp {{ address \"0.0.0.0:{port}\"; tls none; }}\nroute {{ deliver maildir; }}\n",
        dns.port
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    let mut drippers = Vec::new();
    let mut refused = 0;
    for _ in 0..200 {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut r = BufReader::new(s.try_clone().expect("clone"));
        let mut banner = String::new();
        let _ = r.read_line(&mut banner);
        if banner.starts_with("220") {
            drippers.push(s);
        } else {
            assert!(banner.starts_with("421 4.7.0"), "{banner}");
            refused += 1;
        }
    }
    assert_eq!((drippers.len(), refused), (50, 150), "the per-client limit is 50\n{}", d.log());
    for s in &mut drippers {
        let _ = s.write_all(b"E");
    }
    // A normal client from another address (swaks binds 127.0.0.2), while the others drip.
    let start = Instant::now();
    let out = swaks(
        port,
        &["--local-interface", "127.0.0.2", "--from", "a@d.test", "--to", "u@d.test", "--header", "Subject: through"],
    );
    let took = start.elapsed();
    assert!(out.contains("Queued as"), "{out}\n{}", d.log());
    eprintln!("the other client's whole transaction took {took:?}");
    // The drippers: one byte every two seconds; the server cuts them off by the deadline.
    let dripping = Instant::now();
    while dripping.elapsed() < Duration::from_secs(40) && d.log().matches("request deadline").count() < 50 {
        for s in &mut drippers {
            let _ = s.write_all(b"H");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let cut = d.log().matches("request deadline").count();
    assert_eq!(cut, 50, "every dripping session ends at its per-request deadline\n{}", d.log());
    assert!(d.log().contains("stress=yes"), "most slots were taken: stress time-outs\n{}", d.log());
}

/// Issue 10.6: failed AUTHs are throttled per login too: a guessing attack spread over
/// many addresses (one failure each, never the per-address limit) gets the login refused
/// with 454 4.7.0 from new addresses, even with the right password, while the user's own
/// address, where the login succeeded before, still gets in.
#[test]
fn auth_failures_are_throttled_per_login_without_locking_out_its_owner() {
    let t = TempDir::new("auth-login");
    let port = free_port();
    let mut c =
        Command::new(MAILC).arg("hash-password").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("hash");
    c.stdin.take().expect("stdin").write_all(b"alice-secret\n").expect("write");
    let out = c.wait_with_output().expect("hash-password");
    std::fs::write(t.join("logins"), format!("alice {}\n", String::from_utf8_lossy(&out.stdout).trim()))
        .expect("logins");
    let policy = format!(
        "list local = domains [\"d.test\"];\ntable logins = map \"logins\";\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; }}\n\
         listener submission {{ address \"0.0.0.0:{port}\"; protocol submission; tls starttls; auth required; auth_mechanisms [\"PLAIN\"]; credentials logins; }}\n\
         route {{ deliver maildir; }}\n"
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    let auth = |from: &str, pw: &str| {
        swaks(
            port,
            &[
                "--local-interface",
                from,
                "--tls",
                "--auth",
                "PLAIN",
                "--auth-user",
                "alice",
                "--auth-password",
                pw,
                "--quit-after",
                "AUTH",
            ],
        )
    };
    // The owner logs in from 127.0.0.1 before the attack.
    let out = auth("127.0.0.1", "alice-secret");
    assert!(out.contains("235 "), "{out}");
    // Twelve guesses from twelve addresses.
    for i in 2..14 {
        let out = auth(&format!("127.0.0.{i}"), &format!("guess-{i}"));
        assert!(out.contains("535 ") || out.contains("454 "), "{out}");
    }
    // The right password from a new address is refused now; from the owner's address it works.
    let out = auth("127.0.0.30", "alice-secret");
    assert!(out.contains("454 4.7.0"), "a new address is throttled for this login:\n{out}\n{}", d.log());
    let out = auth("127.0.0.1", "alice-secret");
    assert!(out.contains("235 "), "the owner's address is not locked out:\n{out}\n{}", d.log());
    assert!(d.log().contains("throttled=login"), "{}", d.log());
}

/// Issue 10.2: a message larger than the in-memory bound streams to the spool as it
/// arrives (DATA and BDAT alike) and is delivered byte for byte; header edits and body
/// tests on its first part still apply, and no spill file is left behind.
#[test]
fn large_messages_stream_to_the_spool_intact() {
    let t = TempDir::new("stream");
    let port = free_port();
    let policy = format!(
        "list local = domains [\"d.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         on data {{ if body :contains \"FORBIDDEN-EARLY\" {{ reject 550 5.7.1 \"no\"; }} header add \"X-Size\" \"${{message.size}}\"; header remove \"X-Drop\"; }}\n\
         route {{ deliver maildir; }}\n"
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    let mut body = Vec::new();
    let mut i = 0u64;
    while body.len() < 6 << 20 {
        body.extend_from_slice(
            format!("line {i:08} of a large message, 0123456789abcdefghijklmnopqrstuvwxyz\r\n").as_bytes(),
        );
        i += 1;
    }
    let mut msg = b"Subject: big\r\nX-Drop: yes\r\n\r\n".to_vec();
    msg.extend_from_slice(&body);
    for (n, way) in [Way::Data, Way::Bdat].into_iter().enumerate() {
        let mut c = Smtp::connect(port).expect("connect");
        let to = format!("big{n}@d.test");
        let (code, text) = c.send("a@d.test", &[&to], &msg, way).expect("send");
        assert_eq!(code, 250, "{way:?}: {text}");
        let _ = c.cmd("QUIT");
    }
    let mut bad = b"Subject: early\r\n\r\nFORBIDDEN-EARLY\r\n".to_vec();
    bad.extend_from_slice(&body);
    let mut c = Smtp::connect(port).expect("connect");
    assert_eq!(c.send("a@d.test", &["big9@d.test"], &bad, Way::Data).expect("send").0, 550);
    wait_for(
        Duration::from_secs(60),
        "both delivered",
        || {
            (0..2).all(|n| maildir_bytes(&t.join(&format!("mail/big{n}"))).len() == 1)
                && spool_messages(&d.spool()).is_empty()
        },
        || d.log(),
    );
    for n in 0..2 {
        let got = maildir_bytes(&t.join(&format!("mail/big{n}"))).remove(0);
        check_delivered(&got, &msg, &["Return-Path", "Delivered-To", "Received", "X-Size"], &["X-Drop"])
            .expect("intact");
        let text = String::from_utf8_lossy(&got[..400]).into_owned();
        assert!(text.contains(&format!("X-Size: {}", msg.len())), "message.size counts every byte: {text}");
    }
    assert!(files_under(&d.spool()).iter().all(|f| !f.contains("spill")), "{:?}", files_under(&d.spool()));
}

// ================================================================== issue 14: local submission

/// The base policy, plus a rule that shows what the policy sees of a local submission.
fn local_policy(port: u16, relay: u16) -> String {
    let mut p = base_policy(port, relay, "none");
    p.push_str(
        r#"
on data {
  if listener :is "local" and authenticated and auth.mechanism :is "local" {
    header add "X-Local-User" "${auth.user}";
  }
}
"#,
    );
    p
}

/// `mailc sendmail ARGS` (or the binary under another name, for argv[0]), with `input` on
/// standard input and the policy named by the environment, as cron and git call it.
fn sendmail_as(program: &Path, args: &[&str], input: &[u8], policy: &Path) -> (i32, String) {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .env("MAILPOLICY_POLICY", policy)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sendmail");
    if let Some(mut i) = child.stdin.take() {
        // A usage error ends sendmail before it reads its input (a closed pipe here).
        let _ = i.write_all(input);
    }
    let out = child.wait_with_output().expect("sendmail ends");
    (
        out.status.code().unwrap_or(-1),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

/// The binary under the names other software calls it by (`sendmail`, `mailq`).
fn link_as(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    std::os::unix::fs::symlink(MAILC, &p).expect("symlink mailc");
    p
}

#[test]
fn cron_style_sendmail_goes_through_the_policy() {
    let t = TempDir::new("sendmail");
    let (port, relay) = (free_port(), free_port());
    let d = Daemon::start(t.path(), &local_policy(port, relay), &[port]);
    let policy = t.join("policy.mailpolicy");
    let sendmail = link_as(t.path(), "sendmail");

    // cron: `... | sendmail -t`, the recipients in the header, no From:, Date: or Message-ID:.
    let (code, out) = sendmail_as(
        &sendmail,
        &["-t"],
        b"To: u1@d.test\nBcc: u2@d.test\nSubject: cron-e2e\n\nhello from cron\n",
        &policy,
    );
    assert_eq!(code, 0, "{out}");
    wait_for(
        Duration::from_secs(20),
        "the cron mail in mail/u1 and mail/u2",
        || {
            maildir(&t.join("mail/u1")).iter().any(|m| m.contains("cron-e2e"))
                && maildir(&t.join("mail/u2")).iter().any(|m| m.contains("cron-e2e"))
        },
        || d.log(),
    );
    let m = maildir(&t.join("mail/u1")).into_iter().find(|m| m.contains("cron-e2e")).unwrap_or_default();
    let user =
        String::from_utf8_lossy(&Command::new("id").arg("-un").output().expect("id -un").stdout).trim().to_string();
    assert!(m.contains(&format!("X-Local-User: {user}")), "the policy saw the local user {user}: {m}");
    assert!(m.contains("From: ") && m.contains("Date: ") && m.contains("Message-ID: "), "{m}");
    assert!(!m.contains("Bcc:"), "Bcc: is removed with -t: {m}");
    assert!(m.contains("hello from cron"), "{m}");

    // Recipients as arguments, -f, and -i: a line with a single dot is part of the message.
    let (code, out) = sendmail_as(
        &sendmail,
        &["-i", "-f", "app@s.test", "u3@d.test"],
        b"Subject: dot-e2e\n\n.\nafter the dot\n",
        &policy,
    );
    assert_eq!(code, 0, "{out}");
    wait_for(
        Duration::from_secs(20),
        "the -i mail in mail/u3",
        || maildir(&t.join("mail/u3")).iter().any(|m| m.contains("after the dot")),
        || d.log(),
    );
    let m = maildir(&t.join("mail/u3")).into_iter().find(|m| m.contains("dot-e2e")).unwrap_or_default();
    assert!(m.contains("Return-Path: <app@s.test>"), "-f sets the envelope sender: {m}");
    // Without -i the dot ends the message.
    let (code, out) =
        sendmail_as(MAILC.as_ref(), &["sendmail", "u4@d.test"], b"Subject: nodot-e2e\n\nbefore\n.\nnever\n", &policy);
    assert_eq!(code, 0, "{out}");
    wait_for(
        Duration::from_secs(20),
        "the dot-terminated mail in mail/u4",
        || maildir(&t.join("mail/u4")).iter().any(|m| m.contains("nodot-e2e")),
        || d.log(),
    );
    let m = maildir(&t.join("mail/u4")).into_iter().find(|m| m.contains("nodot-e2e")).unwrap_or_default();
    assert!(m.contains("before") && !m.contains("never"), "{m}");

    // The policy's refusal of a local recipient comes back as a DSN to the submitter.
    let (code, out) = sendmail_as(
        &sendmail,
        &["-f", "u5@d.test", "blocked@d.test", "u6@d.test"],
        b"Subject: refused-e2e\n\nx\n",
        &policy,
    );
    assert_eq!(code, 0, "{out}");
    wait_for(
        Duration::from_secs(20),
        "the DSN in mail/u5 and the mail in mail/u6",
        || {
            maildir(&t.join("mail/u5")).iter().any(|m| m.contains("Blocked by rule for blocked@d.test"))
                && maildir(&t.join("mail/u6")).iter().any(|m| m.contains("refused-e2e"))
        },
        || d.log(),
    );
    assert!(d.log().contains("event=pickup") || d.log().contains("pickup"), "{}", d.log());

    // -bs: an SMTP session on standard input and output; the message goes the same way.
    let conversation = b"EHLO me\r\nMAIL FROM:<bs@s.test>\r\nRCPT TO:<u7@d.test>\r\nDATA\r\nSubject: bs-e2e\r\n\r\nover stdio\r\n.\r\nQUIT\r\n";
    let (code, out) = sendmail_as(&sendmail, &["-bs"], conversation, &policy);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("220 ") && out.contains("250 2.0.0") && out.contains("221 "), "{out}");
    wait_for(
        Duration::from_secs(20),
        "the -bs mail in mail/u7",
        || maildir(&t.join("mail/u7")).iter().any(|m| m.contains("bs-e2e") && m.contains("Return-Path: <bs@s.test>")),
        || d.log(),
    );

    // sysexits: no recipients, a bad address.
    let (code, out) = sendmail_as(&sendmail, &[], b"Subject: x\n\nx\n", &policy);
    assert_eq!(code, 64, "{out}");
    let (code, out) = sendmail_as(&sendmail, &["a@@b"], b"Subject: x\n\nx\n", &policy);
    assert_eq!(code, 67, "{out}");
    let (code, out) = sendmail_as(&sendmail, &["-t"], b"Subject: no one\n\nx\n", &policy);
    assert_eq!(code, 65, "{out}");
    // newaliases means nothing to rebuild.
    let (code, out) = sendmail_as(&link_as(t.path(), "newaliases"), &[], b"", &policy);
    assert_eq!(code, 0, "{out}");
    wait_for(Duration::from_secs(20), "an empty queue", || spool_messages(&d.spool()).is_empty(), || d.log());
}

#[test]
fn mail_submitted_while_the_daemon_is_down_is_delivered_when_it_starts() {
    let t = TempDir::new("maildrop");
    let (port, relay) = (free_port(), free_port());
    let policy = t.join("policy.mailpolicy");
    std::fs::write(&policy, local_policy(port, relay)).expect("write policy");
    let sendmail = link_as(t.path(), "sendmail");
    let (code, out) = sendmail_as(&sendmail, &["u1@d.test"], b"Subject: while-down\n\nqueued offline\n", &policy);
    assert_eq!(code, 0, "{out}");
    let drop_dir = t.join("spool/maildrop");
    assert_eq!(std::fs::read_dir(&drop_dir).map(|r| r.count()).unwrap_or(0), 1, "one file in the maildrop");
    // Something that is not a maildrop file is set aside, not retried for ever.
    std::fs::write(drop_dir.join("0000-garbage"), b"hello").expect("write garbage");
    let d = Daemon::start(t.path(), &local_policy(port, relay), &[port]);
    wait_for(
        Duration::from_secs(20),
        "the offline mail in mail/u1",
        || maildir(&t.join("mail/u1")).iter().any(|m| m.contains("queued offline")),
        || d.log(),
    );
    wait_for(
        Duration::from_secs(10),
        "an empty maildrop",
        || std::fs::read_dir(&drop_dir).map(|r| r.count()).unwrap_or(1) == 0,
        || d.log(),
    );
    assert!(t.join("spool/corrupt/maildrop-0000-garbage").exists(), "{}", d.log());

    // mailq (argv[0]) lists what waits: a message for a relay that is down.
    let (code, out) = sendmail_as(&sendmail, &["far@elsewhere.test"], b"Subject: waits\n\nx\n", &policy);
    assert_eq!(code, 0, "{out}");
    let mailq = link_as(t.path(), "mailq");
    wait_for(
        Duration::from_secs(20),
        "mailq shows the deferred message",
        || sendmail_as(&mailq, &[], b"", &policy).1.contains("far@elsewhere.test"),
        || format!("{}\n{}", sendmail_as(&mailq, &[], b"", &policy).1, d.log()),
    );
}

#[test]
fn git_send_email_submits_through_sendmail() {
    need("/usr/lib/git-core/git-send-email", "git-email");
    let t = TempDir::new("gitsend");
    let (port, relay) = (free_port(), free_port());
    let d = Daemon::start(t.path(), &local_policy(port, relay), &[port]);
    let sendmail = link_as(t.path(), "sendmail");
    let repo = t.join("repo");
    std::fs::create_dir_all(&repo).expect("repo dir");
    let git = |args: &[&str]| {
        let (st, out, err) = run_bounded(
            Command::new("git")
                .args(args)
                .current_dir(&repo)
                .env("GIT_AUTHOR_NAME", "Dev")
                .env("GIT_AUTHOR_EMAIL", "dev@s.test")
                .env("GIT_COMMITTER_NAME", "Dev")
                .env("GIT_COMMITTER_EMAIL", "dev@s.test")
                .env("HOME", t.path())
                .env("MAILPOLICY_POLICY", t.join("policy.mailpolicy")),
            Duration::from_secs(60),
        );
        assert!(st.success(), "git {args:?}: {out}{err}");
        out
    };
    git(&["init", "-q"]);
    std::fs::write(repo.join("a.txt"), "one\n").expect("file");
    git(&["add", "a.txt"]);
    git(&["commit", "-q", "-m", "first"]);
    std::fs::write(repo.join("a.txt"), "two\n").expect("file");
    git(&["commit", "-q", "-am", "patch-e2e: change a"]);
    let server = format!("--smtp-server={}", sendmail.display());
    git(&[
        "send-email",
        "--confirm=never",
        "--suppress-cc=all",
        "--to=u1@d.test",
        "--from=Dev <dev@s.test>",
        &server,
        "-1",
    ]);
    wait_for(
        Duration::from_secs(30),
        "the patch in mail/u1",
        || maildir(&t.join("mail/u1")).iter().any(|m| m.contains("patch-e2e: change a") && m.contains("+two")),
        || d.log(),
    );
}

/// `mailc table query`: what a table gives a key, as the daemon reads it (postmap -q).
#[test]
fn table_query_answers_as_the_daemon_reads_the_table() {
    let t = TempDir::new("tablequery");
    std::fs::write(t.join("virtual"), "info@v.test alice@d.test\n@v.test postmaster@d.test\n").expect("table");
    std::fs::write(t.join("nets.cidr"), "192.0.2.0/24 OK\n").expect("table");
    let policy = t.join("p.mailpolicy");
    std::fs::write(
        &policy,
        "table virtual = map \"virtual\";\ntable nets = cidr \"nets.cidr\";\non rcpt {\n  if recipient in virtual { log \"virtual\"; }\n  if client.ip in nets { log \"net\"; }\n}\n",
    )
    .expect("policy");
    let q = |args: &[&str]| {
        let (st, out, err) = run_bounded(
            Command::new(MAILC).args(["table", "query", "--policy"]).arg(&policy).args(args),
            Duration::from_secs(30),
        );
        (st.code().unwrap_or(-1), out, err)
    };
    let (code, out, err) = q(&["virtual", "info@v.test"]);
    assert_eq!((code, out.as_str()), (0, "alice@d.test\n"), "{err}");
    let (code, out, err) = q(&["virtual", "info@v.test", "nobody@elsewhere.test"]);
    assert_eq!((code, out.as_str()), (1, "alice@d.test\n"), "{err}");
    let (code, out, err) = q(&["nets", "192.0.2.77"]);
    assert_eq!((code, out.as_str()), (0, "OK\n"), "{err}");
    let (code, _, err) = q(&["nosuch", "x"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no table `nosuch`"), "{err}");
}

// ================================================================== issue 14: privileges, systemd, control socket

/// A policy relaying everything from loopback to `[127.0.0.1]:relay`, retries an hour
/// apart: a deferred message waits unless something makes it due.
fn slow_retry_policy(port: u16, relay: u16, extra_server: &str) -> String {
    format!(
        r#"server {{
  hostname "mx.test";
  spool "spool";
  retry_min 1h;
  retry_max 2h;
  queue_run 1h;
  {extra_server}
}}

listener smtp {{
  address "127.0.0.1:{port}";
  protocol smtp;
  tls none;
}}

on rcpt {{
  if recipient.local :is "blocked" {{
    reject 550 5.7.1 "Blocked by rule for ${{recipient}}";
  }}
}}

route {{
  deliver smtp "[127.0.0.1]:{relay}";
}}
"#
    )
}

/// `mailc ARGS`, bounded: (exit code, stdout, stderr).
fn mailc_cmd(args: &[&str]) -> (i32, String, String) {
    let (st, out, err) = run_bounded(Command::new(MAILC).args(args), Duration::from_secs(120));
    (st.code().unwrap_or(-1), out, err)
}

/// `mailc queue list --json`, parsed.
fn queue_json(spool: &Path) -> Vec<serde_json::Value> {
    let (code, out, err) = mailc_cmd(&["queue", "list", "--json", "--spool", &spool.display().to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    v.as_array().cloned().unwrap_or_else(|| panic!("not an array: {out}"))
}

#[test]
fn queue_commands_through_the_control_socket_take_effect_at_once() {
    let t = TempDir::new("control");
    let (port, relay) = (free_port(), free_port());
    let mut d = Daemon::start(t.path(), &slow_retry_policy(port, relay, ""), &[port]);
    let spool = d.spool().display().to_string();
    // The socket: mode 0600 in a private directory.
    use std::os::unix::fs::PermissionsExt;
    let sock = d.spool().join("private/control");
    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
    assert_eq!(mode(&sock), 0o600, "{}", d.log());
    assert_eq!(mode(&d.spool().join("private")), 0o700);

    // Nothing listens on the relay: deferred, next try in an hour.
    let out = swaks(port, &["--from", "a@s.test", "--to", "x@remote.test", "--header", "Subject: flush-e2e"]);
    assert!(out.contains("250 2.0.0 Queued as"), "{out}");
    wait_for(
        Duration::from_secs(30),
        "the message deferred",
        || {
            queue_json(&d.spool()).iter().any(|m| {
                m["queue"] == "deferred" && m["recipients"][0]["state"] == "deferred" && m["sender"] == "a@s.test"
            })
        },
        || format!("{}\n{}", queue_list(&d.spool()), d.log()),
    );
    let list = queue_json(&d.spool());
    assert_eq!(list.len(), 1, "{list:?}");
    let id = list[0]["id"].as_str().expect("id").to_string();
    assert_eq!(list[0]["recipients"][0]["address"], "x@remote.test");
    assert!(list[0]["arrival"].as_str().is_some_and(|a| a.ends_with('Z')), "{list:?}");
    assert!(list[0]["attempts"].as_u64().is_some_and(|n| n >= 1), "{list:?}");

    // hold, through the daemon
    let (code, out, err) = mailc_cmd(&["queue", "hold", &id, "--spool", &spool]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("placed on hold") && !err.contains("no daemon"), "{out}{err}");
    assert_eq!(queue_json(&d.spool())[0]["queue"], "hold");

    // The relay comes up; a flush leaves a held message alone.
    let sink = Sink::start(&t.join("sink"), relay, &[]);
    let (code, out, err) = mailc_cmd(&["queue", "flush", "--spool", &spool]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("0 messages flushed"), "{out}{err}");
    // released through the daemon: due now, delivered at once (not in an hour)
    let (code, out, err) = mailc_cmd(&["queue", "release", &id, "--spool", &spool]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("released from hold"), "{out}{err}");
    wait_for(
        Duration::from_secs(30),
        "the released message at the relay",
        || sink.messages().iter().any(|m| m.contains("flush-e2e")),
        || d.log(),
    );

    // A second deferred message (the relay down again), flushed once it is back.
    drop(sink);
    let out = swaks(port, &["--from", "b@s.test", "--to", "y@remote.test", "--header", "Subject: flush2-e2e"]);
    assert!(out.contains("250 2.0.0 Queued as"), "{out}");
    wait_for(
        Duration::from_secs(30),
        "the second message deferred",
        || queue_json(&d.spool()).iter().any(|m| m["sender"] == "b@s.test" && m["queue"] == "deferred"),
        || d.log(),
    );
    let sink = Sink::start(&t.join("sink2"), relay, &[]);
    let (code, out, err) = mailc_cmd(&["queue", "flush", "remote.test", "--spool", &spool]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1 message flushed") && !err.contains("no daemon"), "{out}{err}");
    wait_for(
        Duration::from_secs(30),
        "the flushed message at the relay",
        || sink.messages().iter().any(|m| m.contains("flush2-e2e")),
        || d.log(),
    );
    wait_for(Duration::from_secs(30), "an empty queue", || queue_json(&d.spool()).is_empty(), || d.log());

    // A third, deleted through the daemon.
    drop(sink);
    let out = swaks(port, &["--from", "c@s.test", "--to", "z@remote.test"]);
    assert!(out.contains("250 2.0.0 Queued as"), "{out}");
    wait_for(
        Duration::from_secs(30),
        "the third message deferred",
        || queue_json(&d.spool()).iter().any(|m| m["queue"] == "deferred"),
        || d.log(),
    );
    let id = queue_json(&d.spool())[0]["id"].as_str().expect("id").to_string();
    let (code, out, err) = mailc_cmd(&["queue", "delete", &id, "--spool", &spool]);
    assert_eq!((code, out.contains("deleted")), (0, true), "{out}{err}");
    assert!(queue_json(&d.spool()).is_empty());
    let (code, _, err) = mailc_cmd(&["queue", "delete", &id, "--spool", &spool]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no message"), "{err}");

    // The daemon down: the files are changed directly, and the command says so.
    let out = swaks(port, &["--from", "e@s.test", "--to", "w@remote.test"]);
    assert!(out.contains("250 2.0.0 Queued as"), "{out}");
    wait_for(
        Duration::from_secs(30),
        "the fourth message deferred",
        || queue_json(&d.spool()).iter().any(|m| m["queue"] == "deferred"),
        || d.log(),
    );
    d.kill9();
    let id = queue_json(&d.spool())[0]["id"].as_str().expect("id").to_string();
    let (code, out, err) = mailc_cmd(&["queue", "hold", &id, "--spool", &spool]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("no daemon answers") && out.contains("placed on hold"), "{out}{err}");
    assert_eq!(queue_json(&d.spool())[0]["queue"], "hold");
    // ... and the restarted daemon (a stale socket replaced) keeps it held.
    d.restart();
    let (code, out, err) = mailc_cmd(&["queue", "flush", "--spool", &spool]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("0 messages flushed") && !err.contains("no daemon"), "{out}{err}");
    assert_eq!(queue_json(&d.spool())[0]["queue"], "hold");
}

#[test]
fn reload_through_the_control_socket_swaps_the_policy_or_refuses_it() {
    let t = TempDir::new("reload-ctl");
    let (port, relay) = (free_port(), free_port());
    let d = Daemon::start(t.path(), &slow_retry_policy(port, relay, ""), &[port]);
    let spool = d.spool().display().to_string();
    let out = swaks(port, &["--from", "a@s.test", "--to", "blocked@remote.test", "--quit-after", "RCPT"]);
    assert!(out.contains("550 5.7.1 Blocked by rule for"), "{out}");

    // A new reply, in force as soon as `mailc reload` returns.
    let new = slow_retry_policy(port, relay, "").replace("Blocked by rule for", "Refused by the new rule for");
    std::fs::write(&d.policy, new).expect("write");
    let (code, out, err) = mailc_cmd(&["reload", "--spool", &spool]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("policy reloaded"), "{out}{err}");
    let out = swaks(port, &["--from", "a@s.test", "--to", "blocked@remote.test", "--quit-after", "RCPT"]);
    assert!(out.contains("550 5.7.1 Refused by the new rule for"), "{out}");

    // A policy with an error: refused with its diagnostic, the running one stays.
    std::fs::write(&d.policy, "on rcpt { frobnicate; }\n").expect("write");
    let (code, out, err) = mailc_cmd(&["reload", "--spool", &spool]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("frobnicate") && err.contains("running policy stays"), "{err}");
    // An open relay: the proof runs again and refuses it.
    std::fs::write(&d.policy, format!("listener smtp {{ address \"0.0.0.0:{port}\"; }}\non rcpt {{ accept; }}\n"))
        .expect("write");
    let (code, out, err) = mailc_cmd(&["reload", "--spool", &spool]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("mailc::open-relay"), "{err}");
    let out = swaks(port, &["--from", "a@s.test", "--to", "blocked@remote.test", "--quit-after", "RCPT"]);
    assert!(out.contains("550 5.7.1 Refused by the new rule for"), "the old policy still runs: {out}");
    assert!(d.log().contains("reload-refused"), "{}", d.log());
}

#[test]
fn reload_without_a_daemon_says_so() {
    let t = TempDir::new("reload-none");
    std::fs::create_dir_all(t.join("spool")).expect("mkdir");
    let (code, out, err) = mailc_cmd(&["reload", "--spool", &t.join("spool").display().to_string()]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("no daemon answers"), "{err}");
}

/// The service manager's side of sd_notify: a datagram socket the daemon is told of.
struct NotifySocket {
    sock: std::os::unix::net::UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).expect("bind notify socket");
        use std::os::unix::fs::PermissionsExt;
        // A daemon that drops privileges connects before it does; let anyone send anyway.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        sock.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
        NotifySocket { sock, path }
    }

    /// The next notification (bounded wait).
    fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self.sock.recv(&mut buf).expect("a notification within 60s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

#[test]
fn sd_notify_ready_reloading_and_stopping() {
    let t = TempDir::new("notify");
    let (port, relay) = (free_port(), free_port());
    let n = NotifySocket::bind(t.path());
    let path = n.path.display().to_string();
    let mut d = Daemon::start_env(t.path(), &slow_retry_policy(port, relay, ""), &[port], &[("NOTIFY_SOCKET", &path)]);
    let ready = n.next();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(listening(port), "READY=1 comes once the listener accepts");
    // SIGHUP (systemctl reload), then the control socket's reload: each RELOADING=1 then READY=1.
    d.signal("HUP");
    let r = n.next();
    assert!(r.lines().any(|l| l == "RELOADING=1") && r.contains("MONOTONIC_USEC="), "{r}");
    assert!(n.next().lines().any(|l| l == "READY=1"));
    let (code, out, err) = mailc_cmd(&["reload", "--spool", &d.spool().display().to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(n.next().contains("RELOADING=1"));
    assert!(n.next().contains("READY=1"));
    d.signal("TERM");
    let s = n.next();
    assert!(s.lines().any(|l| l == "STOPPING=1"), "{s}");
    let start = Instant::now();
    while d.alive() && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!d.alive(), "the daemon stopped after STOPPING=1");
}

/// A system account for the privilege tests, made with useradd when missing (as the
/// package's postinst makes `mailpolicy`).
fn test_account() -> (String, u32, u32) {
    let name = "mailpolicy-e2e";
    let id = |flag: &str| Command::new("id").arg(flag).arg(name).output().expect("id");
    if !id("-u").status.success() {
        // Two tests may race to create it: one wins, both then find it.
        let _ = Command::new("useradd")
            .args(["--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent"])
            .args(["--shell", "/usr/sbin/nologin", name])
            .status();
    }
    let num = |flag: &str| -> u32 {
        let o = id(flag);
        String::from_utf8_lossy(&o.stdout).trim().parse().unwrap_or_else(|_| panic!("no account {name} (useradd)"))
    };
    (name.to_string(), num("-u"), num("-g"))
}

/// One `Uid:`/`Gid:`/`Groups:` line of /proc/PID/status, as numbers.
fn proc_ids(pid: u32, field: &str) -> Vec<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|rest| rest.split_whitespace().filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_default()
}

#[test]
fn started_as_root_the_daemon_drops_to_its_user_and_mail_still_flows() {
    if !is_root() {
        // Not root: it cannot become another user, and says so.
        let t = TempDir::new("privdrop");
        let port = free_port();
        std::fs::write(t.join("p.mailpolicy"), slow_retry_policy(port, free_port(), "user \"root\";")).expect("write");
        let (code, out, err) = mailc_cmd(&["serve", "--policy", &t.join("p.mailpolicy").display().to_string()]);
        assert_eq!(code, 2, "{out}{err}");
        assert!(err.contains("not root"), "{err}");
        return;
    }
    let (user, uid, gid) = test_account();
    let t = TempDir::new("privdrop");
    let (port, relay) = (free_port(), free_port());
    let sink = Sink::start(&t.join("sink"), relay, &[]);
    let policy = slow_retry_policy(port, relay, &format!("user \"{user}\";\n  group \"{user}\";"));
    std::fs::write(t.join("policy.mailpolicy"), &policy).expect("write");
    let mut d = Daemon {
        child: Guard(None),
        dir: t.path().to_path_buf(),
        policy: t.join("policy.mailpolicy"),
        ports: vec![port],
        env: Vec::new(),
        user: None,
    };
    d.restart();
    let pid = d.child.pid();
    // Real, effective, saved and file-system ids: the account's; no other group.
    assert_eq!(proc_ids(pid, "Uid:"), vec![uid; 4], "{}", d.log());
    assert_eq!(proc_ids(pid, "Gid:"), vec![gid; 4]);
    assert_eq!(proc_ids(pid, "Groups:"), vec![gid]);
    // Every thread of it, not only the first (the drop is process-wide).
    let tasks: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    assert!(tasks.len() > 1, "a multi-threaded daemon");
    for t in tasks {
        // (A thread that ended meanwhile has no status left.)
        let Ok(st) = std::fs::read_to_string(format!("/proc/{pid}/task/{t}/status")) else { continue };
        let uids = st.lines().find(|l| l.starts_with("Uid:")).unwrap_or("");
        assert_eq!(uids.split_whitespace().skip(1).collect::<Vec<_>>(), vec![uid.to_string(); 4], "thread {t}");
    }
    assert!(d.log().contains("privileges") && d.log().contains(&format!("uid={uid}")), "{}", d.log());
    // The spool is the account's; the maildrop anyone's to drop into.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let m = std::fs::metadata(d.spool()).expect("spool");
    assert_eq!((m.uid(), m.gid()), (uid, gid));
    let md = std::fs::metadata(d.spool().join("maildrop")).expect("maildrop");
    assert_eq!((md.uid(), md.gid(), md.permissions().mode() & 0o7777), (uid, gid, 0o3733));
    for q in ["incoming", "deferred", "active", "hold", "state", "tmp"] {
        let m = std::fs::metadata(d.spool().join(q)).expect("queue dir");
        assert_eq!((m.uid(), m.permissions().mode() & 0o777), (uid, 0o700), "{q}");
    }
    let sock = std::fs::metadata(d.spool().join("private/control")).expect("control socket");
    assert_eq!((sock.uid(), sock.permissions().mode() & 0o777), (uid, 0o600));

    // SMTP still flows (the spool written as the account) ...
    let out = swaks(port, &["--from", "a@s.test", "--to", "x@remote.test", "--header", "Subject: dropped-smtp"]);
    assert!(out.contains("250 2.0.0 Queued as"), "{out}");
    wait_for(
        Duration::from_secs(30),
        "the SMTP message at the relay",
        || sink.messages().iter().any(|m| m.contains("dropped-smtp")),
        || d.log(),
    );
    // ... and so does local submission by another user: the pickup, running as the account,
    // reads the maildrop file through its group and knows the submitter.
    let runuser = Path::new("/usr/sbin/runuser");
    need("/usr/sbin/runuser", "util-linux");
    let (code, out) = sendmail_as(
        runuser,
        &["-u", "nobody", "--", MAILC, "sendmail", "-t"],
        b"To: y@remote.test\nSubject: dropped-local\n\nhi\n",
        &t.join("policy.mailpolicy"),
    );
    assert_eq!(code, 0, "{out}");
    wait_for(
        Duration::from_secs(30),
        "the local submission at the relay",
        || sink.messages().iter().any(|m| m.contains("dropped-local")),
        || d.log(),
    );
    let m = sink.messages().into_iter().find(|m| m.contains("dropped-local")).unwrap_or_default();
    assert!(m.contains("nobody@mx.test"), "the submitter is the file's owner: {m}");
    // The control socket answers root.
    let (code, out, err) = mailc_cmd(&["queue", "flush", "--spool", &d.spool().display().to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!err.contains("no daemon"), "{err}");
}

#[test]
fn root_without_a_user_to_drop_to_is_refused() {
    let t = TempDir::new("rootrefused");
    let port = free_port();
    let policy = t.join("p.mailpolicy");
    std::fs::write(&policy, slow_retry_policy(port, free_port(), "")).expect("write");
    // (Not root, it would run as the user it is: the other test checks that it cannot
    // become another one.)
    if is_root() {
        let (code, out, err) = mailc_cmd(&["serve", "--policy", &policy.display().to_string()]);
        assert_eq!(code, 2, "{out}{err}");
        assert!(err.contains("refusing to run as root") && err.contains("user"), "{err}");
        assert!(!listening(port), "nothing listens on {port}");
        assert!(!t.join("spool").exists(), "nothing was opened");
    }
    // A user that does not exist is named.
    let (code, _, err) = mailc_cmd(&["serve", "--policy", &policy.display().to_string(), "--user", "no-such-user-e2e"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no-such-user-e2e") && err.contains("does not exist"), "{err}");
}
