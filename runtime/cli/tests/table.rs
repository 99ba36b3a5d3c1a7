//! Compiled file tables end to end (issue 13): `mailc table compile` writes `FILE.cdb`,
//! `mailc table query` answers from it exactly as from the source, and `mailc serve` uses
//! it, and stops using it when the source is edited and not compiled again (then it
//! answers from the new text, proven again).
//!
//! No timed assertions: waits are bounded only so that a broken daemon fails the test.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MAILC: &str = env!("CARGO_BIN_EXE_mailc");

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("mailc-table-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mailc(args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut c = Command::new(MAILC)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = c.stdin.take().unwrap();
    let text = stdin.to_string();
    let w = std::thread::spawn(move || {
        let _ = input.write_all(text.as_bytes());
    });
    let out = c.wait_with_output().unwrap();
    w.join().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A table of `n` entries: mixed case keys, values with spaces, a duplicate (the first wins).
fn table_text(n: usize) -> String {
    let mut t = String::from("# users\n\n");
    for i in 0..n {
        t.push_str(&format!("User{i}@Example.org   mbox{} host {i}\n", i % 7));
    }
    t.push_str("user3@example.org not this one\n");
    t
}

#[test]
fn compiled_table_answers_like_its_source() {
    let d = TempDir::new("query");
    let src = d.0.join("users");
    std::fs::write(&src, table_text(20_000)).unwrap();
    let (code, out, err) = mailc(&["table", "compile", "--kind", "map", src.to_str().unwrap()], "");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("20000 entries"), "{out}");
    assert!(d.0.join("users.cdb").exists());
    let mut keys = String::new();
    for i in (0..20_100).step_by(3) {
        keys.push_str(&format!("user{i}@example.org\n"));
    }
    keys.push_str("USER3@EXAMPLE.ORG\nnobody\n\n");
    let (c1, compiled, e1) = mailc(&["table", "query", "--stats", src.to_str().unwrap()], &keys);
    let (c2, text, e2) = mailc(&["table", "query", "--stats", "--source", src.to_str().unwrap()], &keys);
    assert_eq!((c1, c2), (0, 0), "{e1}{e2}");
    assert!(e1.contains("(compiled, 20000 entries)"), "{e1}");
    assert!(e2.contains("(source, 20000 entries)"), "{e2}");
    assert_eq!(compiled, text);
    assert!(compiled.contains("USER3@EXAMPLE.ORG\tmbox3 host 3\n"), "{compiled}");
    assert!(!compiled.contains("nobody"));
    // One key on the command line: its value, exit 1 when absent (as postmap -q).
    let (c, v, _) = mailc(&["table", "query", src.to_str().unwrap(), "user9@example.org"], "");
    assert_eq!((c, v.as_str()), (0, "mbox2 host 9\n"));
    let (c, _, _) = mailc(&["table", "query", src.to_str().unwrap(), "nobody@example.org"], "");
    assert_eq!(c, 1);
    // Edited, not compiled again: the query says so and answers from the text.
    std::fs::write(&src, "user9@example.org changed\n").unwrap();
    let (c, v, e) = mailc(&["table", "query", src.to_str().unwrap(), "user9@example.org"], "");
    assert_eq!((c, v.as_str()), (0, "changed\n"), "{e}");
    assert!(e.contains("older than"), "{e}");
    // Kinds that do not compile, and a source that does not parse: an error, nothing written.
    let cidr = d.0.join("nets");
    std::fs::write(&cidr, "10.0.0.0/8 OK\n").unwrap();
    let (c, _, e) = mailc(&["table", "compile", "--kind", "cidr", cidr.to_str().unwrap()], "");
    assert_eq!(c, 1);
    assert!(e.contains("do not compile"), "{e}");
    assert!(!d.0.join("nets.cdb").exists());
    let (c, _, e) = mailc(&["table", "compile", d.0.join("missing").to_str().unwrap()], "");
    assert_eq!(c, 1, "{e}");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// The replies to RCPT TO for each address, in one session.
fn rcpts(port: u16, addrs: &[&str]) -> Vec<String> {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let reply = |r: &mut BufReader<TcpStream>| loop {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        if l.len() < 4 || l.as_bytes()[3] != b'-' {
            return l.trim_end().to_string();
        }
    };
    reply(&mut r);
    w.write_all(b"EHLO client.test\r\n").unwrap();
    reply(&mut r);
    w.write_all(b"MAIL FROM:<a@client.test>\r\n").unwrap();
    reply(&mut r);
    let mut out = Vec::new();
    for a in addrs {
        w.write_all(format!("RCPT TO:<{a}>\r\n").as_bytes()).unwrap();
        out.push(reply(&mut r));
    }
    let _ = w.write_all(b"QUIT\r\n");
    out
}

#[test]
fn the_daemon_uses_the_compiled_table_and_not_a_stale_one() {
    let d = TempDir::new("serve");
    let port = free_port();
    std::fs::write(d.0.join("users"), table_text(5000)).unwrap();
    let (code, _, err) = mailc(&["table", "compile", d.0.join("users").to_str().unwrap()], "");
    assert_eq!(code, 0, "{err}");
    let policy = format!(
        "list local = domains [\"example.org\"];\n\
         table users = map \"users\";\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         on rcpt {{\n\
           if recipient.domain not in local {{ reject 554 5.7.1 \"Relay access denied\"; }}\n\
           if lookup users recipient :is \"mbox3 host 3\" {{ accept; }}\n\
           if recipient not in users {{ reject 550 5.1.1 \"No such user\"; }}\n\
           accept;\n\
         }}\n\
         route {{ deliver maildir; }}\n"
    );
    std::fs::write(d.0.join("p.mailpolicy"), policy).unwrap();
    let log = std::fs::File::create(d.0.join("log")).unwrap();
    let _daemon = Guard(
        Command::new(MAILC)
            .args(["serve", "--policy", d.0.join("p.mailpolicy").to_str().unwrap()])
            // The test's own account (as root: root on purpose, spec/cli.md).
            .args(["--user", String::from_utf8_lossy(&Command::new("id").arg("-un").output().unwrap().stdout).trim()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_for("the daemon to listen", || TcpStream::connect(("127.0.0.1", port)).is_ok());
    let r = rcpts(port, &["User3@example.org", "user4999@example.org", "user5000@example.org", "x@other.test"]);
    assert!(r[0].starts_with("250") && r[1].starts_with("250"), "{r:?}");
    assert!(r[2].starts_with("550 5.1.1") && r[3].starts_with("554"), "{r:?}");
    let logged = || std::fs::read_to_string(d.0.join("log")).unwrap_or_default();
    assert!(!logged().contains("compiled table is not used"), "{}", logged());
    // The compiled table is what answers: replace it (atomically, as `compile` does) with
    // one of other contents that still describes the source; the daemon follows it.
    let (users, cdb) = (d.0.join("users"), d.0.join("users.cdb"));
    let meta = std::fs::metadata(&users).unwrap();
    // Same kind, size and mtime as `users`: give `other` users' size and mtime, compile.
    let mut padded = "user5000@example.org new\n".to_string();
    while (padded.len() as u64) < meta.len() {
        padded.push('#');
    }
    padded.truncate(meta.len() as usize - 1);
    padded.push('\n');
    std::fs::write(d.0.join("other"), &padded).unwrap();
    let f = std::fs::File::options().write(true).open(d.0.join("other")).unwrap();
    f.set_modified(meta.modified().unwrap()).unwrap();
    drop(f);
    let (code, _, err) = mailc(&["table", "compile", d.0.join("other").to_str().unwrap()], "");
    assert_eq!(code, 0, "{err}");
    std::fs::rename(d.0.join("other.cdb"), &cdb).unwrap();
    wait_for("the daemon to use the new compiled table", || {
        rcpts(port, &["user5000@example.org"])[0].starts_with("250")
    });
    // The source edited and not compiled again: the compiled table no longer stands for it;
    // the daemon says so and answers from the new text.
    std::fs::write(&users, "fresh@example.org one\n").unwrap();
    wait_for("the daemon to read the edited source", || {
        let r = rcpts(port, &["fresh@example.org", "user1@example.org"]);
        r[0].starts_with("250") && r[1].starts_with("550")
    });
    assert!(logged().contains("the compiled table is not used"), "{}", logged());
    assert!(Path::new(&cdb).exists());
}
