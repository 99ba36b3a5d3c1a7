//! `mailc queue`: look at and administer the spool (R32), like `postqueue` and `postsuper`.
//!
//! `list` and `show` read the spool directory directly; a user who may not read it gets
//! `list` from the daemon's public listing socket (`control::request_listing`). A change (hold, release, delete,
//! requeue, flush) goes to the running daemon through its control socket
//! (`daemon/control.rs`), which makes it in the spool and in its scheduler at once: a
//! flushed message is tried now. When no daemon answers, the command makes the same change
//! in the spool's files itself (they are the source of truth), says so, and a daemon sees
//! it when it starts. It never runs recovery ([`Spool::attach`]). Changes are durable when
//! the command returns: a flushed message has its next attempt set to now, a held one is in
//! `hold/`, a released or requeued one is due now, a deleted one is gone.

use std::ffi::OsString;
use std::io::{self, Write};
use std::path::PathBuf;

use mailpolicy_daemon::control;
use mailpolicy_daemon::spool::{Class, QueueId, QueueName, RcptState, Spool, Stored, Summary};

const USAGE: &str = "\
Usage:
  mailc queue list [--json] [--spool DIR]
                                         the queue, like postqueue -p (--json: one JSON array)
  mailc queue show ID [--spool DIR]      envelope, recipient states and message
  mailc queue hold ID [--spool DIR]      put on hold (never delivered until released)
  mailc queue release ID [--spool DIR]   release from hold, due now
  mailc queue delete ID [--spool DIR]    delete the message
  mailc queue requeue ID [--spool DIR]   back to incoming, deferred recipients routed afresh
  mailc queue flush [DOMAIN] [--spool DIR]
                                         make deferred mail (for DOMAIN) due now

The spool is --spool, else $MAILPOLICY_SPOOL, else the policy's (the policy as mailc
serve finds it: $MAILPOLICY_POLICY, /etc/mailpolicy/main.mailpolicy, the embedded
default). Changes go through the daemon's control socket, so they take effect at once;
without a daemon they are made in the spool's files. Exit codes: 0 success, 1 no such
message, 2 usage or I/O error.";

#[derive(Clone, Debug, PartialEq, Eq)]
enum Cmd {
    List,
    ListJson,
    Show(QueueId),
    Hold(QueueId),
    Release(QueueId),
    Delete(QueueId),
    Requeue(QueueId),
    Flush(Option<String>),
}

/// Why a command failed: exit code 1 or 2.
#[derive(Debug)]
enum Failure {
    NotFound(String),
    Io(String),
    /// The reader of our output went away (`mailc queue list | head`): not an error.
    Closed,
}

impl Failure {
    fn from_io(e: io::Error, id: &QueueId) -> Failure {
        if e.kind() == io::ErrorKind::NotFound {
            Failure::NotFound(format!("no message {id} in the queue"))
        } else {
            Failure::Io(e.to_string())
        }
    }
}

pub fn main(args: Vec<OsString>) -> u8 {
    let (cmd, dir) = match parse(args) {
        Ok(x) => x,
        Err(msg) => {
            eprintln!("mailc queue: {msg}\n\n{USAGE}");
            return 2;
        }
    };
    let dir = match dir.or_else(|| std::env::var_os("MAILPOLICY_SPOOL").map(PathBuf::from)) {
        Some(d) => d,
        None => match crate::sendmail::spool_of(None) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("mailc queue: {e}");
                return 2;
            }
        },
    };
    // A change goes to the daemon first, so it takes effect now.
    if let Some(op) = control_op(&cmd) {
        match control::request(&dir, &op, std::time::Duration::from_secs(120)) {
            control::Reached::Answered(a) => {
                if a.ok {
                    println!("{}", a.text);
                } else {
                    eprintln!("mailc queue: {}", a.text);
                }
                return a.code;
            }
            control::Reached::NoDaemon(why) => {
                eprintln!(
                    "mailc queue: no daemon answers on the control socket ({why}): changing the spool's files; \
                     the daemon sees the change when it starts"
                );
            }
        }
    }
    if matches!(cmd, Cmd::List | Cmd::ListJson) {
        return list_main(&cmd, &dir);
    }
    let spool = match Spool::attach(&dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mailc queue: {e}");
            return 2;
        }
    };
    let stdout = io::stdout();
    let mut out = stdout.lock();
    match run(&cmd, &spool, now_ms(), &mut out) {
        Ok(()) => 0,
        Err(Failure::NotFound(m)) => {
            eprintln!("mailc queue: {m}");
            1
        }
        Err(Failure::Io(m)) => {
            eprintln!("mailc queue: {m}");
            // The queue's directories are the daemon's alone (mode 0700).
            if m.contains("Permission denied") {
                eprintln!("mailc queue: the queue in {} is readable by root and the daemon's user only", dir.display());
            }
            2
        }
        Err(Failure::Closed) => 0,
    }
}

/// `list`: from the spool's files, or, for a user who may not read them (they are the
/// daemon's, mode 0700), from the daemon's public listing socket, as Postfix's `mailq`
/// asks `showq`.
fn list_main(cmd: &Cmd, dir: &std::path::Path) -> u8 {
    let listing = match Spool::attach(dir).and_then(|s| control::listing(&s)) {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            match control::request_listing(dir, std::time::Duration::from_secs(120)) {
                Ok(l) => l,
                Err(why) => {
                    eprintln!("mailc queue: {e}");
                    eprintln!(
                        "mailc queue: the queue in {} is readable by root and the daemon's user only, and no \
                         daemon answers on its listing socket ({why})",
                        dir.display()
                    );
                    return 2;
                }
            }
        }
        Err(e) => {
            eprintln!("mailc queue: {e}");
            return 2;
        }
    };
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let written = match cmd {
        Cmd::ListJson => list_json(&listing, &mut out),
        _ => list(&listing, dir, &mut out),
    };
    match written {
        Ok(()) => 0,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            eprintln!("mailc queue: {e}");
            2
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The control-socket request of a command that changes the queue.
fn control_op(cmd: &Cmd) -> Option<control::Op> {
    let id = |q: &QueueId| q.as_str().to_string();
    Some(match cmd {
        Cmd::List | Cmd::ListJson | Cmd::Show(_) => return None,
        Cmd::Hold(q) => control::Op::Hold { id: id(q) },
        Cmd::Release(q) => control::Op::Release { id: id(q) },
        Cmd::Delete(q) => control::Op::Delete { id: id(q) },
        Cmd::Requeue(q) => control::Op::Requeue { id: id(q) },
        Cmd::Flush(d) => control::Op::Flush { domain: d.clone() },
    })
}

fn parse(args: Vec<OsString>) -> Result<(Cmd, Option<PathBuf>), String> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut dir = None;
    let mut json = false;
    let mut words: Vec<String> = Vec::new();
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("spool") => dir = Some(PathBuf::from(parser.value().map_err(|e| e.to_string())?)),
            Long("json") => json = true,
            Long("help") | Short('h') => return Err("help".into()),
            Value(v) => words.push(v.into_string().map_err(|_| "arguments must be UTF-8".to_string())?),
            other => return Err(format!("unexpected argument {}", other.unexpected())),
        }
    }
    let mut words = words.into_iter();
    let sub = words.next().ok_or("no subcommand given")?;
    let rest: Vec<String> = words.collect();
    let one_id = |rest: &[String]| -> Result<QueueId, String> {
        match rest {
            // `list` marks an active message `ID*` and a held one `ID!`: the mark may be
            // copied along with the id, as with Postfix's mailq.
            [id] => QueueId::parse(id.trim_end_matches(['*', '!'])).ok_or_else(|| format!("{id:?} is not a queue id")),
            [] => Err(format!("{sub} needs a queue id")),
            _ => Err(format!("{sub} takes one queue id")),
        }
    };
    let cmd = match sub.as_str() {
        "list" if rest.is_empty() && json => Cmd::ListJson,
        "list" if rest.is_empty() => Cmd::List,
        _ if json => return Err("--json is for list".into()),
        "show" => Cmd::Show(one_id(&rest)?),
        "hold" => Cmd::Hold(one_id(&rest)?),
        "release" => Cmd::Release(one_id(&rest)?),
        "delete" => Cmd::Delete(one_id(&rest)?),
        "requeue" => Cmd::Requeue(one_id(&rest)?),
        "flush" => match rest.as_slice() {
            [] => Cmd::Flush(None),
            [d] => Cmd::Flush(Some(d.to_ascii_lowercase())),
            _ => return Err("flush takes at most one domain".into()),
        },
        "list" => return Err("list takes no arguments".into()),
        other => return Err(format!("unknown queue subcommand {other:?}")),
    };
    Ok((cmd, dir))
}

fn run(cmd: &Cmd, spool: &Spool, now: u64, out: &mut dyn Write) -> Result<(), Failure> {
    let w = |r: io::Result<()>| {
        r.map_err(|e| if e.kind() == io::ErrorKind::BrokenPipe { Failure::Closed } else { Failure::Io(e.to_string()) })
    };
    match cmd {
        Cmd::List => w(control::listing(spool).and_then(|l| list(&l, spool.dir(), out))),
        Cmd::ListJson => w(control::listing(spool).and_then(|l| list_json(&l, out))),
        Cmd::Show(id) => {
            let s = spool.load(id).map_err(|e| Failure::from_io(e, id))?;
            w(show(&s, out))
        }
        // The same change the daemon makes when it is asked (control.rs).
        other => {
            let Some(op) = control_op(other) else { return Ok(()) };
            let (a, _) = control::apply(spool, &op, now);
            match a.code {
                0 => w(writeln!(out, "{}", a.text)),
                1 => Err(Failure::NotFound(a.text)),
                _ => Err(Failure::Io(a.text)),
            }
        }
    }
}

/// `list --json`: one array, one object per message (its unfinished and finished
/// recipients with their states), for scripts.
fn list_json(listing: &control::Listing, out: &mut dyn Write) -> io::Result<()> {
    let v: Vec<serde_json::Value> = listing
        .messages
        .iter()
        .map(|s| {
            let rcpts: Vec<serde_json::Value> = s
                .rcpts
                .iter()
                .map(|r| {
                    let state = match &r.state {
                        RcptState::Pending => "pending",
                        RcptState::Delivered { .. } => "delivered",
                        RcptState::Failed { .. } => "failed",
                        RcptState::Deferred { .. } => "deferred",
                    };
                    serde_json::json!({ "address": r.address, "state": state, "reply": r.state.reply() })
                })
                .collect();
            serde_json::json!({
                "id": s.id.as_str(),
                "queue": s.queue.as_str(),
                "class": match s.class { Class::Normal => "normal", Class::Bounce => "bounce" },
                "size": s.size,
                "arrival": mailpolicy_engine::date::rfc3339(s.arrived_ms),
                "arrival_ms": s.arrived_ms,
                "sender": s.sender,
                "hold_reason": s.hold_reason,
                "attempts": s.attempts,
                "next_attempt_ms": s.next_attempt_ms,
                "recipients": rcpts,
            })
        })
        .collect();
    serde_json::to_writer_pretty(&mut *out, &v).map_err(io::Error::other)?;
    writeln!(out)
}

/// `postqueue -p`: one entry per message, unfinished recipients with their last reply.
fn list(listing: &control::Listing, dir: &std::path::Path, out: &mut dyn Write) -> io::Result<()> {
    let (all, corrupt) = (&listing.messages, &listing.corrupt);
    if all.is_empty() {
        writeln!(out, "Mail queue is empty")?;
    } else {
        writeln!(
            out,
            "{:<23} {:>8} {:<19}  -Sender/Recipient-------",
            "-Queue ID-", "--Size--", "---Arrival Time----"
        )?;
        for s in all {
            write_entry(s, out)?;
        }
        let bytes: u64 = all.iter().map(|s| s.size).sum();
        writeln!(
            out,
            "-- {} Kbytes in {} Request{}.",
            bytes.div_ceil(1024),
            all.len(),
            if all.len() == 1 { "" } else { "s" }
        )?;
    }
    if !corrupt.is_empty() {
        writeln!(
            out,
            "-- {} file{} in {}",
            corrupt.len(),
            if corrupt.len() == 1 { "" } else { "s" },
            dir.join("corrupt").display()
        )?;
    }
    Ok(())
}

const INDENT: usize = 23 + 1 + 8 + 1 + 19 + 2;

fn write_entry(s: &Summary, out: &mut dyn Write) -> io::Result<()> {
    let mark = match s.queue {
        QueueName::Active => '*',
        QueueName::Hold => '!',
        _ => ' ',
    };
    writeln!(
        out,
        "{:<23} {:>8} {:<19}  {}",
        format!("{}{mark}", s.id),
        s.size,
        fmt_time(s.arrived_ms),
        sender(&s.sender)
    )?;
    if s.queue == QueueName::Hold {
        match &s.hold_reason {
            Some(reason) => writeln!(out, "{:INDENT$}(on hold: {reason})", "")?,
            None => writeln!(out, "{:INDENT$}(on hold)", "")?,
        }
    }
    let mut last: Option<&str> = None;
    for r in s.rcpts.iter().filter(|r| !r.state.is_final()) {
        let reply = r.state.reply();
        if reply.is_some() && reply != last {
            writeln!(out, "{:INDENT$}({})", "", reply.unwrap_or_default())?;
        }
        last = reply;
        writeln!(out, "{:INDENT$}{}", "", r.address)?;
    }
    writeln!(out)
}

fn sender(s: &str) -> &str {
    if s.is_empty() {
        "MAILER-DAEMON"
    } else {
        s
    }
}

fn show(s: &Stored, out: &mut dyn Write) -> io::Result<()> {
    let m = &s.message;
    writeln!(out, "Queue ID: {}", s.id)?;
    writeln!(out, "Queue: {}", s.queue.as_str())?;
    writeln!(
        out,
        "Class: {}",
        match s.class {
            Class::Normal => "normal",
            Class::Bounce => "bounce",
        }
    )?;
    writeln!(out, "Arrival: {} UTC", fmt_time(s.arrived_ms))?;
    writeln!(out, "Size: {}", m.data.len())?;
    writeln!(out, "Sender: <{}>", m.sender)?;
    if !m.envid.is_empty() || !m.ret.is_empty() {
        writeln!(out, "DSN: ENVID={} RET={}", m.envid, m.ret)?;
    }
    writeln!(
        out,
        "Client: {} helo={}{}",
        m.client_ip,
        m.helo,
        if m.auth_user.is_empty() { String::new() } else { format!(" auth={}", m.auth_user) }
    )?;
    if let Some(h) = &m.hold {
        writeln!(out, "Held: {h}")?;
    }
    writeln!(
        out,
        "Attempts: {}, next attempt: {} UTC, delay warning sent: {}",
        s.attempts,
        fmt_time(s.next_attempt_ms),
        if s.delay_warned { "yes" } else { "no" }
    )?;
    for (i, (r, st)) in m.recipients.iter().zip(&s.states).enumerate() {
        let mut extra = String::new();
        if !r.notify.is_empty() {
            extra.push_str(&format!(" NOTIFY={}", r.notify.join(",")));
        }
        if !r.orcpt.is_empty() {
            extra.push_str(&format!(" ORCPT={}", r.orcpt));
        }
        writeln!(out, "Recipient {i}: <{}>{extra}", r.address)?;
        let line = match st {
            RcptState::Pending => "pending".to_string(),
            RcptState::Delivered { at, reply } => {
                format!("delivered {} UTC: {reply}", fmt_time(*at))
            }
            RcptState::Failed { at, reply } => format!("failed {} UTC: {reply}", fmt_time(*at)),
            RcptState::Deferred { attempts, next_at, last_reply } => format!(
                "deferred after {attempts} attempt{}, next {} UTC: {last_reply}",
                if *attempts == 1 { "" } else { "s" },
                fmt_time(*next_at)
            ),
        };
        writeln!(out, "    {line}")?;
    }
    writeln!(out, "*** MESSAGE ***")?;
    out.write_all(&m.data)?;
    if !m.data.ends_with(b"\n") {
        writeln!(out)?;
    }
    writeln!(out, "*** END OF MESSAGE ***")
}

/// `YYYY-MM-DD HH:MM:SS` in UTC.
fn fmt_time(ms: u64) -> String {
    mailpolicy_engine::date::plain(ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailpolicy_engine::conn::{QueuedMessage, QueuedRcpt};

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "mailc-queue-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn msg(rcpts: &[&str]) -> QueuedMessage {
        QueuedMessage {
            sender: "alice@example.com".into(),
            recipients: rcpts
                .iter()
                .map(|a| QueuedRcpt {
                    address: a.to_string(),
                    notify: vec![],
                    orcpt: String::new(),
                    ..Default::default()
                })
                .collect(),
            ret: String::new(),
            envid: String::new(),
            data: b"Subject: test\r\n\r\nhello\r\n".to_vec(),
            hold: None,
            archive: vec![],
            filter: None,
            batv_sign: false,
            client_ip: "192.0.2.1".into(),
            helo: "c.example".into(),
            auth_user: String::new(),
            added_headers: vec![],
            session: Default::default(),
            copy: false,
            list: None,
            tail: 0,
        }
    }

    fn setup() -> (TempDir, Spool, QueueId, QueueId) {
        let t = TempDir::new();
        let (spool, _) = Spool::open(&t.0).expect("open");
        let a =
            spool.store(&msg(&["bob@b.example", "carol@c.example"]), Class::Normal, 1_700_000_000_000).expect("store");
        let b = spool.store(&msg(&["dave@c.example"]), Class::Normal, 1_700_000_060_000).expect("store");
        for (id, i) in [(&a, 1), (&b, 0)] {
            spool
                .record(
                    id,
                    &[(
                        i,
                        RcptState::Deferred {
                            attempts: 1,
                            next_at: 1_700_000_900_000,
                            last_reply: "451 4.7.1 greylisted".into(),
                        },
                    )],
                    Some(1_700_000_900_000),
                )
                .expect("record");
            spool.defer(id).expect("defer");
        }
        (t, spool, a, b)
    }

    fn run_s(cmd: Cmd, spool: &Spool, now: u64) -> (Result<(), Failure>, String) {
        let mut out = Vec::new();
        let r = run(&cmd, spool, now, &mut out);
        (r, String::from_utf8_lossy(&out).into_owned())
    }

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn parses_subcommands() {
        let (c, d) = parse(args(&["list"])).expect("list");
        assert_eq!((c, d), (Cmd::List, None));
        assert_eq!(parse(args(&["list", "--json"])).expect("json").0, Cmd::ListJson);
        assert!(parse(args(&["flush", "--json"])).is_err());
        let (c, d) = parse(args(&["show", "ABC123", "--spool", "/x"])).expect("show");
        assert_eq!(c, Cmd::Show(QueueId::parse("ABC123").expect("id")));
        assert_eq!(d, Some(PathBuf::from("/x")));
        assert_eq!(parse(args(&["flush", "Example.COM"])).expect("flush").0, Cmd::Flush(Some("example.com".into())));
        for bad in [
            &[][..],
            &["show"],
            &["show", "../etc/passwd"],
            &["hold", "A", "B"],
            &["list", "x"],
            &["frobnicate"],
            &["flush", "a", "b"],
            &["list", "--bogus"],
        ] {
            assert!(parse(args(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn list_looks_like_postqueue() {
        let (_t, spool, a, b) = setup();
        let (r, out) = run_s(Cmd::List, &spool, 0);
        assert!(r.is_ok());
        let p = " ".repeat(54);
        let want = format!(
            "-Queue ID-              --Size-- ---Arrival Time----  -Sender/Recipient-------\n\
             {a}        24 2023-11-14 22:13:20  alice@example.com\n\
             {p}bob@b.example\n\
             {p}(451 4.7.1 greylisted)\n\
             {p}carol@c.example\n\
             \n\
             {b}        24 2023-11-14 22:14:20  alice@example.com\n\
             {p}(451 4.7.1 greylisted)\n\
             {p}dave@c.example\n\
             \n\
             -- 1 Kbytes in 2 Requests.\n"
        );
        assert_eq!(out, want);
        spool.move_to(&a, QueueName::Hold).expect("hold");
        let (_, out) = run_s(Cmd::List, &spool, 0);
        assert!(out.contains(&format!("{a}!       24 2023-11-14 22:13:20  alice@example.com\n{p}(on hold)\n")));
        let t = TempDir::new();
        let (empty, _) = Spool::open(&t.0).expect("open");
        assert_eq!(run_s(Cmd::List, &empty, 0).1, "Mail queue is empty\n");
    }

    #[test]
    fn show_prints_envelope_states_and_message() {
        let (_t, spool, a, _) = setup();
        let (r, out) = run_s(Cmd::Show(a.clone()), &spool, 0);
        assert!(r.is_ok());
        assert!(out.contains(&format!("Queue ID: {a}\nQueue: deferred\n")));
        assert!(out.contains("Recipient 0: <bob@b.example>\n    pending\n"));
        assert!(out.contains("Recipient 1: <carol@c.example>\n    deferred after 1 attempt, next 2023-11-14 22:28:20 UTC: 451 4.7.1 greylisted\n"));
        assert!(out.contains("*** MESSAGE ***\nSubject: test\r\n\r\nhello\r\n*** END OF MESSAGE ***\n"));
        let missing = QueueId::parse("NOPE").expect("id");
        assert!(matches!(run_s(Cmd::Show(missing), &spool, 0).0, Err(Failure::NotFound(_))));
    }

    #[test]
    fn hold_release_delete() {
        let (_t, spool, a, b) = setup();
        assert!(run_s(Cmd::Hold(a.clone()), &spool, 0).0.is_ok());
        assert_eq!(spool.summary(&a).expect("s").queue, QueueName::Hold);
        // Releasing one not on hold is "not found" (exit 1).
        assert!(matches!(run_s(Cmd::Release(b.clone()), &spool, 0).0, Err(Failure::NotFound(_))));
        assert!(run_s(Cmd::Release(a.clone()), &spool, 42).0.is_ok());
        let s = spool.summary(&a).expect("s");
        assert_eq!((s.queue, s.next_attempt_ms), (QueueName::Deferred, 42));
        assert!(run_s(Cmd::Delete(a.clone()), &spool, 0).0.is_ok());
        assert!(matches!(run_s(Cmd::Delete(a.clone()), &spool, 0).0, Err(Failure::NotFound(_))));
        assert!(matches!(run_s(Cmd::Hold(a), &spool, 0).0, Err(Failure::NotFound(_))));
        assert_eq!(spool.list().expect("list").len(), 1);
    }

    /// `mailc queue delete ID*` with the mark `list` shows; a closed pipe is no error.
    #[test]
    fn list_marks_are_accepted_and_a_closed_pipe_is_quiet() {
        let (_t, spool, a, _) = setup();
        let args = |w: &[&str]| w.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        for mark in ["*", "!", ""] {
            let (cmd, _) = parse(args(&["delete", &format!("{a}{mark}")])).expect("parses");
            assert!(matches!(cmd, Cmd::Delete(ref id) if *id == a), "{mark}");
        }
        assert!(parse(args(&["delete", "*"])).is_err());
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        assert!(matches!(run(&Cmd::List, &spool, 0, &mut Closed), Err(Failure::Closed)));
    }

    #[test]
    fn requeue_resets_deferred_recipients() {
        let (_t, spool, a, _) = setup();
        let (r, out) = run_s(Cmd::Requeue(a.clone()), &spool, 7);
        assert!(r.is_ok());
        assert_eq!(out, format!("{a}: requeued\n"));
        let s = spool.load(&a).expect("load");
        assert_eq!(s.queue, QueueName::Incoming);
        assert_eq!(s.next_attempt_ms, 7);
        assert_eq!(s.states, vec![RcptState::Pending, RcptState::Pending]);
    }

    #[test]
    fn flush_all_or_one_domain() {
        let (_t, spool, a, b) = setup();
        let (r, out) = run_s(Cmd::Flush(Some("b.example".into())), &spool, 5);
        assert!(r.is_ok());
        assert_eq!(out, "1 message flushed\n");
        assert_eq!(spool.summary(&a).expect("s").next_attempt_ms, 5);
        assert_eq!(spool.summary(&b).expect("s").next_attempt_ms, 1_700_000_900_000);
        spool.move_to(&a, QueueName::Hold).expect("hold");
        let (_, out) = run_s(Cmd::Flush(None), &spool, 9);
        assert_eq!(out, "1 message flushed\n");
        let s = spool.load(&b).expect("load");
        assert_eq!(s.next_attempt_ms, 9);
        assert!(matches!(s.states[0], RcptState::Deferred { next_at: 9, .. }));
        assert_eq!(spool.summary(&a).expect("s").next_attempt_ms, 5);
    }

    #[test]
    fn formats_utc_times() {
        assert_eq!(fmt_time(0), "1970-01-01 00:00:00");
        assert_eq!(fmt_time(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(fmt_time(1_700_000_000_999), "2023-11-14 22:13:20");
    }
}
