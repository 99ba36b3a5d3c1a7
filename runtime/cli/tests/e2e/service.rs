//! Issue 14: running like a real MTA: privileges (a root daemon dropping to a test
//! account), sd_notify on a test NOTIFY_SOCKET, the control socket (queue commands and
//! reload at once, the files when no daemon answers), `mailc queue list --json`.

use super::local::sendmail_as;
use super::*;

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
