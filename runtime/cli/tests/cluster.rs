//! Several MX hosts on one policy state (spec/language.md section 5.3): two real
//! `mailc serve` daemons on loopback sharing one real `redis-server` that the test starts
//! on a port and in a directory of its own, and stops. Rate limits, greylisting, alerts
//! and `concurrent` leases hold across the hosts and across restarts; a dead or hung Redis
//! gives the configured behaviour (`state_on_error`) and the hosts recover by themselves.
//!
//! No timed assertions: every wait is bounded only so that a broken daemon fails the test
//! instead of hanging it.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mailpolicy_test_support::{free_port, listening, wait_for, Serve};

const MAILC: &str = env!("CARGO_BIN_EXE_mailc");
const REDIS: &str = "/usr/bin/redis-server";

fn need(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} not found (Debian package {package}); run tests/run.sh, which installs the test peers"
    );
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mailc-cluster-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
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
    fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    fn signal(&self, sig: &str) {
        if let Some(c) = &self.0 {
            let st = Command::new("kill").arg(format!("-{sig}")).arg(c.id().to_string()).status().expect("run kill");
            assert!(st.success(), "kill -{sig} failed");
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A redis-server of the test's own: no persistence, its own port and directory.
struct Redis {
    child: Guard,
    dir: PathBuf,
    port: u16,
    args: Vec<String>,
}

impl Redis {
    fn start(dir: PathBuf) -> Redis {
        Redis::start_with(dir, &[])
    }

    /// With more redis-server options (`--requirepass SECRET`).
    fn start_with(dir: PathBuf, args: &[&str]) -> Redis {
        need(REDIS, "redis-server");
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut r =
            Redis { child: Guard(None), dir, port: free_port(), args: args.iter().map(|a| a.to_string()).collect() };
        r.restart();
        r
    }

    fn restart(&mut self) {
        self.child.kill();
        let child = Command::new(REDIS)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--protected-mode", "no"])
            .args(&self.args)
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Guard(Some(child));
        let port = self.port;
        wait_for(Duration::from_secs(20), "redis-server to listen", || listening(port), || self.log());
        // Listening, but ours? (Another test's server on a port free a moment ago.)
        let alive = self.child.0.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        assert!(alive, "redis-server on {port} exited (the port taken?): {}", self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

/// `mailc serve` in a directory of its own (spool, Maildirs, log), killed on drop.
/// `mailc serve` (test-support's one starter) running `policy` in `dir`, ready when `port`
/// listens.
fn daemon(dir: PathBuf, policy: &str, port: u16) -> Serve {
    Serve::start(MAILC, &dir, policy, &[port])
}

/// Two hosts of one cluster: the same rules, each its own hostname, spool and port.
fn policy(host: &str, port: u16, state: &str, extra_server: &str, rules: &str) -> String {
    format!(
        "require [\"ratelimit\", \"greylist\"];\n\
         list local = domains [\"d.test\"];\n\
         server {{ hostname \"{host}\"; spool \"spool\"; maildir \"mail\"; local_domains local; state \"{state}\"; {extra_server} }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         {rules}\n\
         route {{ if recipient.is_local {{ deliver maildir; }} }}\n"
    )
}

fn cluster(t: &TempDir, redis: &Redis, extra_server: &str, rules: &str) -> (Serve, Serve) {
    let (pa, pb) = (free_port(), free_port());
    let a = daemon(t.join("a"), &policy("mx-a.test", pa, &redis.url(), extra_server, rules), pa);
    let b = daemon(t.join("b"), &policy("mx-b.test", pb, &redis.url(), extra_server, rules), pb);
    // The start-up probe (test-support's one connection opened and closed once the port
    // listens) is a session too: wait until it has been logged (after the client's reverse
    // lookup, so not at once) and has ended (its `concurrent` count is on Redis before its
    // `disconnect` line), so no test counts it.
    let settled = |d: &Serve| {
        let log = d.log();
        let event = |e: &str| log.lines().filter(|l| l.split_whitespace().nth(1) == Some(e)).count();
        event("connect") >= 1 && event("connect") == event("disconnect")
    };
    let ctx = || format!("A:\n{}\nB:\n{}", a.log(), b.log());
    wait_for(Duration::from_secs(20), "the probe sessions to end", || settled(&a) && settled(&b), ctx);
    (a, b)
}

/// An SMTP client that reads every reply.
struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
    /// The greeting (a 220, or the 421 that refused the session).
    banner: (u16, String),
}

impl Client {
    fn connect(port: u16) -> Client {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let w = s.try_clone().expect("clone");
        let mut c = Client { r: BufReader::new(s), w, banner: (0, String::new()) };
        c.banner = c.reply();
        c
    }

    fn reply(&mut self) -> (u16, String) {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line).unwrap_or(0) == 0 {
                return (0, format!("{text}(closed)"));
            }
            text.push_str(&line);
            let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            if line.as_bytes().get(3) != Some(&b'-') {
                return (code, text);
            }
        }
    }

    fn cmd(&mut self, line: &str) -> (u16, String) {
        let _ = self.w.write_all(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// One whole transaction: the code of the first refusal, or of the reply to the data.
    fn send(&mut self, from: &str, to: &str) -> (u16, String) {
        for (line, ok) in [(format!("MAIL FROM:<{from}>"), 250), (format!("RCPT TO:<{to}>"), 250), ("DATA".into(), 354)]
        {
            let r = self.cmd(&line);
            if r.0 != ok {
                let _ = self.cmd("RSET");
                return r;
            }
        }
        let _ = self.w.write_all(format!("From: <{from}>\r\nSubject: cluster\r\n\r\nhello\r\n.\r\n").as_bytes());
        self.reply()
    }
}

/// One session: EHLO, one message.
fn send_one(port: u16, from: &str, to: &str) -> (u16, String) {
    let mut c = Client::connect(port);
    if c.banner.0 != 220 {
        return c.banner.clone();
    }
    c.cmd("EHLO client.test");
    let r = c.send(from, to);
    c.cmd("QUIT");
    r
}

const RATE_RULE: &str = "on mail { if rate messages by client.ip per 1h > 4 { tempfail 451 4.7.1 \"Too many messages from ${client.ip}\"; } }";

/// R7/R22: a per-client limit of N holds across both hosts (N accepted in total, not 2N),
/// and across a restart of either host.
#[test]
fn a_rate_limit_holds_across_two_hosts_and_their_restarts() {
    let t = TempDir::new("rate");
    let redis = Redis::start(t.join("redis"));
    let (mut a, mut b) = cluster(&t, &redis, "", RATE_RULE);
    let mut accepted = 0;
    let mut refused = Vec::new();
    for i in 0..10 {
        let port = if i % 2 == 0 { a.port } else { b.port };
        let (code, text) = send_one(port, "s@far.test", "u@d.test");
        match code {
            250 => accepted += 1,
            451 => {
                assert!(text.contains("4.7.1 Too many messages"), "{text}");
                refused.push(i)
            }
            _ => panic!("unexpected reply {text}\nA:\n{}\nB:\n{}", a.log(), b.log()),
        }
    }
    assert_eq!(accepted, 4, "the limit of 4 holds over two hosts; refused: {refused:?}\nA:\n{}", a.log());
    // The window lives in Redis: a restarted host still refuses, and so does the other.
    a.restart();
    b.restart();
    for port in [a.port, b.port] {
        let (code, text) = send_one(port, "s@far.test", "u@d.test");
        assert_eq!(code, 451, "after a restart: {text}");
    }
    wait_for(
        Duration::from_secs(20),
        "four messages delivered",
        || a.mail("u").len() + b.mail("u").len() == 4,
        || format!("A:\n{}\nB:\n{}", a.log(), b.log()),
    );
}

/// B7: a greylisted triplet that passed on host A passes on host B (and after B restarts);
/// a new triplet first seen on A is still deferred on B.
#[test]
fn a_greylisted_triplet_passed_on_one_host_passes_on_the_other() {
    let t = TempDir::new("grey");
    let redis = Redis::start(t.join("redis"));
    let rules = "on rcpt { if greylist :delay 2s { tempfail 450 4.7.1 \"Greylisted, try again later\"; } }";
    let (a, mut b) = cluster(&t, &redis, "", rules);
    let (code, text) = send_one(a.port, "s@far.test", "u@d.test");
    assert_eq!(code, 450, "first attempt on A is greylisted: {text}");
    let (code, text) = send_one(b.port, "s@far.test", "u@d.test");
    assert_eq!(code, 450, "a retry on B before the delay is still greylisted: {text}");
    std::thread::sleep(Duration::from_millis(2_200));
    let (code, text) = send_one(a.port, "s@far.test", "u@d.test");
    assert_eq!(code, 250, "the retry on A after the delay passes: {text}\n{}", a.log());
    let (code, text) = send_one(b.port, "s@far.test", "u@d.test");
    assert_eq!(code, 250, "the triplet passed on A passes on B: {text}\n{}", b.log());
    b.restart();
    let (code, text) = send_one(b.port, "s@far.test", "u@d.test");
    assert_eq!(code, 250, "and still after B restarts: {text}");
    let (code, text) = send_one(a.port, "other@far.test", "u@d.test");
    assert_eq!(code, 450, "a new triplet: {text}");
    let (code, text) = send_one(b.port, "other@far.test", "u@d.test");
    assert_eq!(code, 450, "a new triplet first seen on A is deferred on B: {text}");
}

/// R7: an alert fires once per window across the cluster, not once per host.
#[test]
fn an_alert_fires_once_across_the_cluster() {
    let t = TempDir::new("alert");
    let redis = Redis::start(t.join("redis"));
    let rules = "on mail { if sender.domain :is \"noisy.test\" { alert \"admin@d.test\" \"noisy sender ${sender.domain}\" :every 1h; } }";
    let (a, b) = cluster(&t, &redis, "alert_from \"alerts@d.test\";", rules);
    for i in 0..6 {
        let port = if i % 2 == 0 { a.port } else { b.port };
        let (code, text) = send_one(port, "x@noisy.test", "u@d.test");
        assert_eq!(code, 250, "{text}");
    }
    let ctx = || format!("A:\n{}\nB:\n{}", a.log(), b.log());
    wait_for(Duration::from_secs(20), "six messages", || a.mail("u").len() + b.mail("u").len() == 6, ctx);
    wait_for(Duration::from_secs(20), "an alert", || a.mail("admin").len() + b.mail("admin").len() >= 1, ctx);
    // Both queues are idle once the six messages are in: any second alert would be too.
    std::thread::sleep(Duration::from_millis(500));
    let alerts: Vec<String> = a.mail("admin").into_iter().chain(b.mail("admin")).collect();
    assert_eq!(alerts.len(), 1, "one alert across two hosts: {alerts:?}\n{}", ctx());
    assert!(alerts[0].contains("Subject: mailpolicy alert: noisy sender noisy.test"), "{}", alerts[0]);
    let alert_lines = |log: String| log.lines().filter(|l| l.split_whitespace().nth(1) == Some("alert")).count();
    let logged = alert_lines(a.log()) + alert_lines(b.log());
    assert_eq!(logged, 1, "{}", ctx());
}

/// R22: `concurrent by client.ip` counts the sessions of every host; a host killed with its
/// sessions open stops counting when their leases (`state_lease`) run out.
#[test]
fn concurrent_sessions_count_across_hosts_and_a_dead_host_leaks_none() {
    let t = TempDir::new("conc");
    let redis = Redis::start(t.join("redis"));
    let rules =
        "on connect { if concurrent by client.ip > 2 { tempfail 421 4.7.0 \"Too many sessions from ${client.ip}\"; } }";
    let (mut a, b) = cluster(&t, &redis, "state_lease 2s;", rules);
    let one = Client::connect(a.port);
    assert_eq!(one.banner.0, 220, "{}", one.banner.1);
    let two = Client::connect(b.port);
    assert_eq!(two.banner.0, 220, "{}", two.banner.1);
    let three = Client::connect(b.port);
    assert_eq!(three.banner.0, 421, "a third session over both hosts is refused: {}", three.banner.1);
    drop(three);
    // The open sessions' leases are renewed while they live (past the lease's life).
    std::thread::sleep(Duration::from_millis(2_500));
    let again = Client::connect(b.port);
    assert_eq!(again.banner.0, 421, "live sessions keep their leases: {}", again.banner.1);
    drop(again);
    // Host A dies with session `one` open: it cannot release its lease, which expires.
    a.stop();
    drop(one);
    wait_for(Duration::from_secs(20), "A's lease to run out", || Client::connect(b.port).banner.0 == 220, || b.log());
    drop(two);
    a.restart();
}

/// A stage that records an event the policy counts gets the stage's `concurrent` counts
/// in the event's own round trip: they are the cluster's, and current (a session that
/// ended on the other host no longer counts).
#[test]
fn counts_answered_with_the_event_are_the_clusters() {
    let t = TempDir::new("fused");
    let redis = Redis::start(t.join("redis"));
    let rules = "on mail {\n\
                   if rate messages by client.ip per 1h > 1000 { tempfail 451 4.7.1 \"Too many messages\"; }\n\
                   if concurrent by client.ip > 1 { tempfail 451 4.7.0 \"Too many sessions\"; }\n\
                 }";
    let (a, b) = cluster(&t, &redis, "", rules);
    let started = std::time::Instant::now();
    let mut one = Client::connect(a.port);
    one.cmd("EHLO client.test");
    let mut two = Client::connect(b.port);
    two.cmd("EHLO client.test");
    // A's session has asked nothing: it counts on B once A's publisher wrote it, a few
    // milliseconds after it opened (more on a loaded machine): B's MAIL waits for that.
    let mut mails = 0;
    let mut last = (0, String::new());
    wait_for(
        Duration::from_secs(20),
        "the session on A to count on B",
        || {
            mails += 1;
            last = two.cmd("MAIL FROM:<s@far.test>");
            two.cmd("RSET");
            last.0 != 250
        },
        || b.log(),
    );
    assert_eq!(last.0, 451, "a session on A and one on B: {}", last.1);
    assert!(last.1.contains("4.7.0"), "{}", last.1);
    one.cmd("QUIT");
    drop(one);
    wait_for(
        Duration::from_secs(20),
        "A's session to stop counting",
        || {
            mails += 1;
            let (code, _) = two.cmd("MAIL FROM:<s@far.test>");
            two.cmd("RSET");
            code == 250
        },
        || b.log(),
    );
    two.cmd("QUIT");
    drop(two);
    // One round trip per MAIL (the event and both counts); besides them, only the
    // publisher's writes of B's session counts, at most one per session opened or closed
    // and one per renewal (every third of the default 1m lease): B's own counts, logged
    // when it stops. A session costs no round trip of its own to open or close.
    let pid = b.pid().expect("B runs").to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    wait_for(Duration::from_secs(20), "B to stop", || b.log().contains("stopped"), || b.log());
    let logged = |field: &str| -> usize {
        b.log()
            .lines()
            .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix(field)).map(str::to_string))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let (trips, writes) = (logged("state_round_trips="), logged("state_count_writes="));
    let sessions = b.log().lines().filter(|l| l.split_whitespace().nth(1) == Some("disconnect")).count();
    let renewals = started.elapsed().as_secs() as usize / 20 + 1;
    assert_eq!(trips, mails + writes, "{trips} round trips for {mails} MAIL commands:\n{}", b.log());
    assert!(writes >= 1 && writes <= 2 * sessions + renewals, "{writes} count writes for {sessions} sessions");
}

/// Sessions racing on both hosts, each stage one script: the rate limit is exact across
/// the hosts however the sessions interleave (N accepted in total, not 2N, not N-1), and
/// sessions open at once on both hosts never get past the `concurrent` limit together.
#[test]
fn racing_sessions_on_both_hosts_get_the_exact_limits() {
    let t = TempDir::new("race");
    let redis = Redis::start(t.join("redis"));
    let (a, b) = cluster(
        &t,
        &redis,
        "",
        "on mail { if rate messages by client.ip per 1h > 5 { tempfail 451 4.7.1 \"Too many messages\"; } }",
    );
    let go = std::sync::Arc::new(std::sync::Barrier::new(12));
    let racers: Vec<_> = (0..12)
        .map(|i| {
            let (port, go) = (if i % 2 == 0 { a.port } else { b.port }, go.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(port);
                c.cmd("EHLO client.test");
                go.wait();
                let r = c.send("s@far.test", "u@d.test");
                c.cmd("QUIT");
                r
            })
        })
        .collect();
    let replies: Vec<(u16, String)> = racers.into_iter().map(|h| h.join().expect("racer")).collect();
    let accepted = replies.iter().filter(|r| r.0 == 250).count();
    let refused = replies.iter().filter(|r| r.0 == 451 && r.1.contains("4.7.1")).count();
    assert_eq!((accepted, refused), (5, 7), "{replies:?}\nA:\n{}\nB:\n{}", a.log(), b.log());
    drop((a, b));

    let rules =
        "on connect { if concurrent by client.network > 3 { tempfail 421 4.7.0 \"Too many sessions from ${client.ip}\"; } }\n\
         on mail { if concurrent by client.ip > 1 { tempfail 451 4.7.0 \"Too many sessions\"; } }";
    let t2 = TempDir::new("race2");
    let (a, b) = cluster(&t2, &redis, "", rules);
    let go = std::sync::Arc::new(std::sync::Barrier::new(10));
    let racers: Vec<_> = (0..10)
        .map(|i| {
            let (port, go) = (if i % 2 == 0 { a.port } else { b.port }, go.clone());
            std::thread::spawn(move || {
                go.wait();
                let c = Client::connect(port);
                let code = c.banner.0;
                go.wait();
                (code, c)
            })
        })
        .collect();
    let held: Vec<(u16, Client)> = racers.into_iter().map(|h| h.join().expect("racer")).collect();
    let greeted = held.iter().filter(|(code, _)| *code == 220).count();
    assert!(greeted <= 3, "{greeted} sessions open at once past a limit of 3 over two hosts");
    assert!(
        held.iter().all(|(code, _)| *code == 220 || *code == 421),
        "{:?}",
        held.iter().map(|h| h.0).collect::<Vec<_>>()
    );
    drop(held);
    // The closed sessions stop counting on both hosts (their hosts publish the counts).
    let ctx = || format!("A:\n{}\nB:\n{}", a.log(), b.log());
    let mut open = Vec::new();
    wait_for(
        Duration::from_secs(20),
        "three sessions over both hosts",
        || {
            open.clear();
            open = vec![Client::connect(a.port), Client::connect(b.port), Client::connect(a.port)];
            open.iter().all(|c| c.banner.0 == 220)
        },
        ctx,
    );
    assert_eq!(Client::connect(b.port).banner.0, 421, "a fourth over both hosts: {}", ctx());
    // A session that has not asked its `client.ip` count (it asked only the network's, at
    // connect) is counted under it on the other host all the same: its host publishes it.
    drop(open);
    // (The three sessions end on their hosts a moment after the client closes them.)
    let mut idle = None;
    wait_for(
        Duration::from_secs(20),
        "a session on A",
        || {
            idle = Some(Client::connect(a.port)).filter(|c| c.banner.0 == 220);
            idle.is_some()
        },
        ctx,
    );
    let mut other = Client::connect(b.port);
    other.cmd("EHLO client.test");
    wait_for(
        Duration::from_secs(20),
        "the idle session on A to count on B",
        || {
            let (code, _) = other.cmd("MAIL FROM:<s@far.test>");
            other.cmd("RSET");
            code == 451
        },
        ctx,
    );
    drop(idle);
}

/// `state_on_error tempfail` (the default): a dead Redis fails the lookup with 451 4.4.3,
/// a hung one too, within `state_timeout`; both hosts recover by themselves when it is back.
#[test]
fn a_dead_or_hung_redis_tempfails_and_the_hosts_recover() {
    let t = TempDir::new("down");
    let mut redis = Redis::start(t.join("redis"));
    let (a, b) = cluster(&t, &redis, "state_timeout 300ms;", RATE_RULE);
    assert_eq!(send_one(a.port, "s@far.test", "u@d.test").0, 250);
    redis.child.kill();
    for port in [a.port, b.port] {
        let (code, text) = send_one(port, "s@far.test", "u@d.test");
        assert_eq!(code, 451, "{text}");
        assert!(text.contains("4.4.3"), "a dead store is a lookup failure: {text}");
    }
    redis.restart();
    let ctx = || format!("A:\n{}\nB:\n{}", a.log(), b.log());
    for port in [a.port, b.port] {
        wait_for(Duration::from_secs(20), "recovery", || send_one(port, "s@far.test", "u@d.test").0 == 250, ctx);
    }
    assert!(a.log().contains("state-down") && a.log().contains("state-up"), "{}", a.log());
    // A hung Redis (stopped, its socket open): the session gets its answer after the
    // time-out, not never.
    redis.child.signal("STOP");
    let (code, text) = send_one(a.port, "s@far.test", "u@d.test");
    redis.child.signal("CONT");
    assert_eq!(code, 451, "{text}");
    assert!(text.contains("4.4.3"), "{text}");
    wait_for(Duration::from_secs(20), "recovery", || send_one(a.port, "s@far.test", "u@d.test").0 == 250, ctx);
}

/// `state_on_error local`: with Redis dead, each host answers from its own state (its own
/// share of the window), and goes back to the shared state when Redis returns.
#[test]
fn a_dead_redis_falls_back_to_local_state_when_the_policy_says_so() {
    let t = TempDir::new("local");
    let mut redis = Redis::start(t.join("redis"));
    // The connection limit (never reached) makes every session ask the store at connect.
    let rules = format!("{RATE_RULE}\non connect {{ if rate connections by client.ip per 1h > 1000 {{ tempfail 421 4.7.0 \"Too many\"; }} }}");
    let (a, b) = cluster(&t, &redis, "state_timeout 300ms; state_on_error local;", &rules);
    // Two messages on each host: four in the shared window, two in each local one.
    for port in [a.port, b.port, a.port, b.port] {
        assert_eq!(send_one(port, "s@far.test", "u@d.test").0, 250);
    }
    assert_eq!(send_one(a.port, "s@far.test", "u@d.test").0, 451, "the shared window is full");
    redis.child.kill();
    // A has counted three locally (the refused attempt counts): one more is accepted there.
    let (code, text) = send_one(a.port, "s@far.test", "u@d.test");
    assert_eq!(code, 250, "A answers from its own window: {text}\n{}", a.log());
    let (code, text) = send_one(a.port, "s@far.test", "u@d.test");
    assert_eq!(code, 451, "and its own window fills: {text}");
    assert!(text.contains("4.7.1"), "the policy's refusal, not a lookup failure: {text}");
    let (code, text) = send_one(b.port, "s@far.test", "u@d.test");
    assert_eq!(code, 250, "B answers from its own window: {text}");
    // Redis comes back empty (no persistence): the shared window starts again.
    redis.restart();
    let ctx = || format!("A:\n{}\nB:\n{}", a.log(), b.log());
    // A session asks the store at connect (the connection limit): each host notices by
    // itself that Redis is back.
    for d in [&a, &b] {
        wait_for(
            Duration::from_secs(20),
            "the host back on Redis",
            || {
                let mut c = Client::connect(d.port);
                c.cmd("QUIT");
                d.log().contains("state-up")
            },
            ctx,
        );
    }
    let mut n = 0;
    for i in 0..8 {
        let port = if i % 2 == 0 { a.port } else { b.port };
        if send_one(port, "s@far.test", "u@d.test").0 == 250 {
            n += 1;
        }
    }
    assert_eq!(n, 4, "the shared window again: {}", ctx());
}

/// `state_password`: the password of a Redis with `requirepass` comes from a secret (a
/// file here), not the policy text; a host with the wrong one gets the configured failure
/// (451 4.4.3), and one with the right one shares the window.
#[test]
fn the_state_password_is_a_secret() {
    let t = TempDir::new("password");
    let redis = Redis::start_with(t.join("redis"), &["--requirepass", "s3cret-pass"]);
    let host = |name: &str, pass: &str| {
        let dir = t.join(name);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("redis.pass"), format!("{pass}\n")).expect("password file");
        let port = free_port();
        let rules = format!("secret redis = file \"redis.pass\";\n{RATE_RULE}");
        daemon(dir, &policy(name, port, &redis.url(), "state_password redis; state_timeout 500ms;", &rules), port)
    };
    let good = host("good", "s3cret-pass");
    let bad = host("bad", "wrong");
    for _ in 0..4 {
        let (code, text) = send_one(good.port, "s@far.test", "u@d.test");
        assert_eq!(code, 250, "{text}\n{}", good.log());
    }
    let (code, text) = send_one(good.port, "s@far.test", "u@d.test");
    assert_eq!(code, 451, "the window is in Redis: {text}");
    assert!(text.contains("4.7.1"), "{text}");
    let (code, text) = send_one(bad.port, "s@far.test", "u@d.test");
    assert_eq!(code, 451, "{text}\n{}", bad.log());
    assert!(text.contains("4.4.3"), "the wrong password is a store failure: {text}");
    assert!(bad.log().contains("state-down"), "{}", bad.log());
    assert!(!good.log().contains("s3cret-pass") && !bad.log().contains("wrong"), "no password in the logs");
}

// ------------------------------------------------------------------ PROXY protocol

const HAPROXY: &str = "/usr/sbin/haproxy";

/// HAProxy in front of `backend`: a v1 frontend and a v2 frontend, connecting to the
/// daemon from 127.0.0.9 (the trusted load balancer; clients come from 127.0.0.1).
fn haproxy(dir: &Path, v1: u16, v2: u16, backend: u16) -> Guard {
    need(HAPROXY, "haproxy");
    let cfg = format!(
        "global\n  maxconn 100\n\
         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend f1\n  bind 127.0.0.1:{v1}\n  default_backend b1\n\
         backend b1\n  server mx 127.0.0.1:{backend} send-proxy source 127.0.0.9\n\
         frontend f2\n  bind 127.0.0.1:{v2}\n  default_backend b2\n\
         backend b2\n  server mx 127.0.0.1:{backend} send-proxy-v2 source 127.0.0.9\n"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg).expect("haproxy.cfg");
    let child = Command::new(HAPROXY)
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("haproxy.log")).expect("log"))
        .stderr(std::fs::File::create(dir.join("haproxy.err")).expect("log"))
        .spawn()
        .expect("start haproxy");
    let g = Guard(Some(child));
    let err = || std::fs::read_to_string(dir.join("haproxy.err")).unwrap_or_default();
    wait_for(Duration::from_secs(20), "haproxy to listen", || listening(v1) && listening(v2), err);
    g
}

/// R12/issue 15: behind a real HAProxy, v1 (`send-proxy`) and v2 (`send-proxy-v2`),
/// `client.ip` is the client's, not the load balancer's; a PROXY header from an address
/// that is not a trusted load balancer is refused, and so is a malformed one, and the
/// daemon goes on.
#[test]
fn proxy_protocol_v1_and_v2_behind_haproxy() {
    let t = TempDir::new("proxy");
    let (port, v1, v2) = (free_port(), free_port(), free_port());
    let policy = format!(
        "list local = domains [\"d.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; proxy_protocol [\"127.0.0.9\"]; }}\n\
         on mail {{ if sender.local :is \"who\" {{ reject 550 5.7.1 \"you are ${{client.ip}}\"; }} }}\n\
         route {{ if recipient.is_local {{ deliver maildir; }} }}\n"
    );
    let d = daemon(t.join("mx"), &policy, port);
    let _lb = haproxy(&t.0, v1, v2, port);
    for (front, version) in [(v1, "1"), (v2, "2")] {
        let mut c = Client::connect(front);
        assert_eq!(c.banner.0, 220, "through HAProxy v{version}: {}\n{}", c.banner.1, d.log());
        c.cmd("EHLO client.test");
        let (code, text) = c.cmd("MAIL FROM:<who@far.test>");
        assert_eq!(code, 550, "{text}");
        assert!(text.contains("you are 127.0.0.1"), "client.ip is the client's, not 127.0.0.9: {text}");
        c.cmd("RSET");
        let (code, text) = c.send("s@far.test", "u@d.test");
        assert_eq!(code, 250, "{text}");
        c.cmd("QUIT");
        assert!(d.log().contains(&format!("proxy=127.0.0.9:")), "{}", d.log());
        assert!(d.log().contains(&format!("version={version}")), "{}", d.log());
    }
    wait_for(Duration::from_secs(20), "two messages", || d.mail("u").len() == 2, || d.log());
    let m = d.mail("u");
    assert!(m.iter().all(|m| m.contains("[127.0.0.1]")), "Received: names the client: {m:?}");

    // A PROXY header straight from a client (127.0.0.1 is no load balancer): refused
    // before any byte is answered.
    let refused = |bytes: &[u8]| {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let _ = s.write_all(bytes);
        let mut got = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut got);
        got
    };
    let got = refused(b"PROXY TCP4 192.0.2.1 127.0.0.1 1234 25\r\nEHLO x\r\n");
    assert!(got.is_empty(), "an untrusted PROXY header gets nothing: {:?}", String::from_utf8_lossy(&got));
    assert!(d.log().contains("reason=\"not a trusted proxy\""), "{}", d.log());
}

/// Malformed PROXY headers from the trusted load balancer's address are refused without
/// a panic, and the next good one is served. (The daemon trusts 127.0.0.1 here so that
/// the test itself can speak for the load balancer.)
#[test]
fn malformed_proxy_headers_are_refused() {
    let t = TempDir::new("proxy-bad");
    let port = free_port();
    let policy = format!(
        "list local = domains [\"d.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; proxy_protocol [\"127.0.0.0/8\"]; }}\n\
         on mail {{ reject 550 5.7.1 \"you are ${{client.ip}}\"; }}\n\
         route {{ if recipient.is_local {{ deliver maildir; }} }}\n"
    );
    let d = daemon(t.join("mx"), &policy, port);
    let talk = |bytes: &[u8]| {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut got = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut got);
        String::from_utf8_lossy(&got).to_string()
    };
    let mut sig = vec![0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];
    let v2_short = [sig.clone(), vec![0x21, 0x11, 0x00, 0x04, 1, 2, 3, 4]].concat();
    let v2_cut = [sig.clone(), vec![0x21, 0x11, 0x00, 0x0C, 1, 2]].concat();
    sig[5] = 0xFF;
    for bad in [
        &b"EHLO client.test\r\n"[..],
        b"PROXY TCP4 192.0.2.1 127.0.0.1 99999 25\r\nEHLO x\r\n",
        b"PROXY TCP6 192.0.2.1 127.0.0.1 1 25\r\n",
        b"PROXY TCP4 192.0.2.1\n",
        &[b"PROXY UNKNOWN ".to_vec(), vec![b'A'; 300]].concat(),
        &v2_short,
        &v2_cut,
        &sig,
        b"",
    ] {
        let got = talk(bad);
        assert!(got.is_empty(), "{:?} refused: got {got:?}", String::from_utf8_lossy(bad));
    }
    // A good header, then the client waits for the greeting as clients do (one that talks
    // first, right after the header, is an early talker like any other).
    let good = |header: &[u8]| {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let mut w = s.try_clone().expect("clone");
        let _ = w.write_all(header);
        let mut c = Client { r: BufReader::new(s), w, banner: (0, String::new()) };
        c.banner = c.reply();
        assert_eq!(c.banner.0, 220, "{}", c.banner.1);
        c.cmd("EHLO x");
        let (_, text) = c.cmd("MAIL FROM:<a@b.test>");
        c.cmd("QUIT");
        text
    };
    let got = good(b"PROXY TCP4 192.0.2.77 127.0.0.1 4000 25\r\n");
    assert!(got.contains("you are 192.0.2.77"), "{got}\n{}", d.log());
    let early = talk(b"PROXY TCP4 192.0.2.78 127.0.0.1 4000 25\r\nEHLO x\r\n");
    assert!(early.contains("554 5.5.1"), "bytes right after the header are early talk: {early}");
    let got = good(
        &[
            &[0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x21, 0x00, 36][..],
            &[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x42],
            &[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01],
            &[0x10, 0x00, 0x00, 0x19],
        ]
        .concat(),
    );
    assert!(got.contains("you are 2001:db8::42"), "{got}\n{}", d.log());
    assert!(!d.log().contains("session-failed"), "{}", d.log());
}

/// An implicit-TLS listener (`protocol submissions`) behind a load balancer: the client
/// speaks first, so its ClientHello may come in the same packet as the PROXY header; the
/// handshake takes it from there (it was once read as SMTP early talk and the handshake
/// waited for bytes already read).
#[test]
fn implicit_tls_takes_a_client_hello_sent_with_the_proxy_header() {
    let t = TempDir::new("proxy-tls");
    let port = free_port();
    let (cert, key) = mailpolicy_daemon::tls::self_signed(&t.join("tls"), "mx.test").expect("certificate");
    let policy = format!(
        "server {{ hostname \"mx.test\"; spool \"spool\"; }}\n\
         listener smtps {{ address \"127.0.0.1:{port}\"; protocol submissions; auth none; cert \"{}\"; key \"{}\"; proxy_protocol [\"127.0.0.0/8\"]; }}\n\
         on mail {{ reject 550 5.7.1 \"you are ${{client.ip}} over ${{tls.version}}\"; }}\n",
        cert.display(),
        key.display()
    );
    let d = daemon(t.join("mx"), &policy, port);
    for (header, client) in [
        (b"PROXY TCP4 192.0.2.90 127.0.0.1 4000 465\r\n".to_vec(), "192.0.2.90"),
        (
            [
                &[0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x11, 0x00, 12][..],
                &[192, 0, 2, 91, 127, 0, 0, 1, 0x0F, 0xA0, 0x01, 0xD1],
            ]
            .concat(),
            "192.0.2.91",
        ),
    ] {
        let cfg = mailpolicy_daemon::tls::client_config(&cert).expect("client config");
        let name = rustls::pki_types::ServerName::try_from("mx.test").expect("name");
        let mut c = rustls::ClientConnection::new(cfg, name).expect("client");
        let mut first = header;
        c.write_tls(&mut first).expect("ClientHello");
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        tcp.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        tcp.write_all(&first).expect("the header and the ClientHello in one write");
        let greeting = tls_reply(&mut c, &mut tcp);
        assert!(greeting.starts_with("220 "), "{greeting}\n{}", d.log());
        let mut say = |line: &str| {
            let mut s = rustls::Stream::new(&mut c, &mut tcp);
            std::io::Write::write_all(&mut s, format!("{line}\r\n").as_bytes()).expect("write");
            tls_reply(&mut c, &mut tcp)
        };
        assert!(say("EHLO x").starts_with("250"));
        let got = say("MAIL FROM:<a@b.test>");
        assert!(got.contains(&format!("you are {client} over TLSv1.")), "{got}\n{}", d.log());
        say("QUIT");
    }
    assert!(!d.log().contains("tls-failed"), "{}", d.log());
}

/// One SMTP reply (all its lines) read over a TLS client connection.
fn tls_reply(c: &mut rustls::ClientConnection, tcp: &mut TcpStream) -> String {
    let mut s = rustls::Stream::new(c, tcp);
    let mut text = String::new();
    loop {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            match std::io::Read::read(&mut s, &mut b) {
                Ok(1) => line.push(b[0]),
                other => panic!("reading a reply: {other:?}; so far {text}{}", String::from_utf8_lossy(&line)),
            }
        }
        let line = String::from_utf8_lossy(&line).to_string();
        text.push_str(&line);
        if line.as_bytes().get(3) != Some(&b'-') {
            return text;
        }
    }
}

/// R27: a call-ahead answer one host got is the cluster's: host B answers a recipient host
/// A called ahead for from the shared store, even with the next hop gone (a recipient no
/// host asked about then fails, as it must).
#[test]
fn a_callahead_answer_is_shared_by_the_hosts() {
    const SMTP_SINK: &str = "/usr/sbin/smtp-sink";
    need(SMTP_SINK, "postfix");
    let t = TempDir::new("callahead");
    let redis = Redis::start(t.join("redis"));
    let sink_port = free_port();
    let mut sink = Command::new(SMTP_SINK);
    if std::fs::read_to_string("/proc/self/status").is_ok_and(|s| s.contains("Uid:\t0\t")) {
        sink.args(["-u", "nobody"]);
    }
    let sink = sink
        .arg(format!("127.0.0.1:{sink_port}"))
        .arg("10")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start smtp-sink");
    let mut sink = Guard(Some(sink));
    wait_for(Duration::from_secs(10), "smtp-sink", || listening(sink_port), String::new);
    let host = |name: &str, port: u16| {
        format!(
            "require [\"callahead\"];\n\
             list local = domains [\"d.test\"];\n\
             list relayed = domains [\"ok.test\"];\n\
             server {{ hostname \"{name}\"; spool \"spool\"; maildir \"mail\"; local_domains local; relay_domains relayed; state \"{}\"; state_timeout 500ms; }}\n\
             listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
             on rcpt {{ if not callahead {{ reject callahead; }} }}\n\
             route {{ deliver smtp \"[127.0.0.1]:{sink_port}\"; }}\n",
            redis.url()
        )
    };
    let (pa, pb) = (free_port(), free_port());
    let a = daemon(t.join("a"), &host("mx-a.test", pa), pa);
    let b = daemon(t.join("b"), &host("mx-b.test", pb), pb);
    let rcpt = |port: u16, to: &str| {
        let mut c = Client::connect(port);
        c.cmd("EHLO client.test");
        c.cmd("MAIL FROM:<s@far.test>");
        let r = c.cmd(&format!("RCPT TO:<{to}>"));
        c.cmd("QUIT");
        r
    };
    let (code, text) = rcpt(a.port, "bob@ok.test");
    assert_eq!(code, 250, "A called ahead: {text}\n{}", a.log());
    sink.kill();
    let (code, text) = rcpt(b.port, "bob@ok.test");
    assert_eq!(code, 250, "B answers from A's call-ahead: {text}\n{}", b.log());
    let (code, text) = rcpt(b.port, "carol@ok.test");
    assert!((400..500).contains(&code), "nobody asked about carol, and the next hop is gone: {text}");
}

// ------------------------------------------------------------------ shadow copies (R12)

/// A host of a backup pair: relays `d.test` to `sink`, holds its copies at its peer's
/// `backup_listen`, and holds the peer's at its own. The key is the same on both hosts.
fn backup_host(dir: &Path, host: &str, port: u16, listen: u16, peer: u16, sink: u16, redis: &Redis, extra: &str) {
    std::fs::create_dir_all(dir).expect("host dir");
    std::fs::write(dir.join("backup.key"), "k3y shared by the pair\n").expect("key");
    let policy = format!(
        "secret backup = file \"backup.key\";\n\
         list relayed = domains [\"d.test\"];\n\
         server {{ hostname \"{host}\"; spool \"spool\"; relay_domains relayed; state \"{}\"; retry_min 1h;\n\
           backup_peer \"127.0.0.1:{peer}\"; backup_listen \"127.0.0.1:{listen}\"; backup_key backup; {takeover} {extra} }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         route {{ if recipient.local :is \"gone\" {{ reject 550 5.1.1 \"no such user\"; }} deliver smtp \"[127.0.0.1]:{sink}\"; }}\n",
        redis.url(),
        takeover = if extra.contains("backup_takeover") { "" } else { "backup_takeover 2s;" },
    );
    std::fs::write(dir.join("policy.mailpolicy"), policy).expect("policy");
}

/// The next hop of both hosts: a third `mailc serve` delivering `d.test` to a Maildir.
fn sink(dir: PathBuf, port: u16) -> Serve {
    let policy = format!(
        "list local = domains [\"d.test\"];\n\
         server {{ hostname \"sink.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         route {{ if recipient.is_local {{ deliver maildir; }} }}\n"
    );
    daemon(dir, &policy, port)
}

/// A backup pair: A (mx-a.test) and B (mx-b.test), each the other's backup peer.
struct Pair {
    a: Serve,
    b: Serve,
    b_listen: u16,
}

fn pair(t: &TempDir, redis: &Redis, sink_port: u16, extra_a: &str) -> Pair {
    pair_with(t, redis, sink_port, extra_a, "")
}

fn pair_with(t: &TempDir, redis: &Redis, sink_port: u16, extra_a: &str, extra_b: &str) -> Pair {
    let (pa, pb, la, lb) = (free_port(), free_port(), free_port(), free_port());
    backup_host(&t.join("a"), "mx-a.test", pa, la, lb, sink_port, redis, extra_a);
    backup_host(&t.join("b"), "mx-b.test", pb, lb, la, sink_port, redis, extra_b);
    let b = daemon(t.join("b"), &std::fs::read_to_string(t.join("b/policy.mailpolicy")).expect("policy"), pb);
    wait_for(Duration::from_secs(20), "B's backup listener", || listening(lb), || b.log());
    let a = daemon(t.join("a"), &std::fs::read_to_string(t.join("a/policy.mailpolicy")).expect("policy"), pa);
    Pair { a, b, b_listen: lb }
}

/// A test's own Redis and backup pair, in a temp dir named after `name`, with the port of
/// the next hop (not started).
fn backup_pair(name: &str) -> (TempDir, Redis, u16, Pair) {
    let t = TempDir::new(name);
    let redis = Redis::start(t.join("redis"));
    let sink_port = free_port();
    let p = pair(&t, &redis, sink_port, "");
    (t, redis, sink_port, p)
}

/// The queue id of the last `event` line of a log (`queued`: the message stored last).
fn logged_id(log: &str, event: &str) -> String {
    let line = log.lines().filter(|l| l.split_whitespace().nth(1) == Some(event)).last().unwrap_or_default();
    let id = line.split_whitespace().find_map(|w| w.strip_prefix("id=")).unwrap_or_default();
    assert!(!id.is_empty(), "no {event} line in:\n{log}");
    id.to_string()
}

fn queued_id(log: &str) -> String {
    logged_id(log, "queued")
}

/// The held copies of a host (files under its spool's backup/held/ORIGIN/).
fn held(d: &Serve) -> Vec<String> {
    let mut out = Vec::new();
    for o in std::fs::read_dir(d.dir.join("spool/backup/held")).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(o.path()).into_iter().flatten().flatten() {
            out.push(f.file_name().to_string_lossy().to_string());
        }
    }
    out
}

fn in_spool(d: &Serve, id: &str) -> bool {
    ["incoming", "active", "deferred", "hold"].iter().any(|q| d.dir.join("spool").join(q).join(id).is_file())
}

/// R12, issue 15 item 4: host A accepts a message for a next hop that is down, holding a
/// copy at host B before its 250, and is killed (-9) before it could deliver. B sees A's
/// heartbeat in Redis run out, waits `backup_takeover`, and delivers its copy, under A's
/// queue id, to the next hop once it is up: the accepted message is not lost.
#[test]
fn a_host_killed_before_delivering_loses_nothing_its_peer_delivers_the_copy() {
    let (t, _redis, sink_port, mut p) = backup_pair("takeover");
    let (code, text) = send_one(p.a.port, "s@far.test", "u@d.test");
    assert_eq!(code, 250, "{text}\n{}", p.a.log());
    let id = queued_id(&p.a.log());
    let a_log = p.a.log();
    assert!(a_log.contains(&format!("shadowed session=")) && a_log.contains(&format!("id={id}")), "{a_log}");
    // The copy was held by B before A answered 250.
    assert_eq!(held(&p.b), vec![id.clone()], "{}", p.b.log());
    assert!(p.b.log().contains("shadow-held origin=mx-a.test@"), "{}", p.b.log());
    // A tries the next hop, which is down, and keeps the message.
    wait_for(Duration::from_secs(20), "A's failed attempt", || p.a.log().contains("status=deferred"), || p.a.log());
    assert!(in_spool(&p.a, &id), "A keeps the message it could not deliver");
    p.a.stop();
    // Nothing is released while A's heartbeat could still be alive...
    std::thread::sleep(Duration::from_millis(1_500));
    assert!(!p.b.log().contains("shadow-released"), "released too early:\n{}", p.b.log());
    // ...and the next hop comes back.
    let s = sink(t.join("sink"), sink_port);
    let ctx = || format!("B:\n{}\nsink:\n{}", p.b.log(), s.log());
    wait_for(Duration::from_secs(30), "B to release A's copy", || p.b.log().contains("shadow-released"), ctx);
    assert!(p.b.log().contains(&format!("shadow-released origin=mx-a.test@")), "{}", ctx());
    let released = p.b.log().lines().find(|l| l.contains("shadow-released")).unwrap_or_default().to_string();
    assert!(released.contains(&format!(" id={id} ")), "the copy keeps A's queue id: {released}");
    wait_for(Duration::from_secs(30), "the copy delivered", || s.mail("u").len() == 1, ctx);
    let m = s.mail("u");
    assert!(m[0].contains("Subject: cluster"), "{m:?}");
    assert!(held(&p.b).is_empty(), "the copy left B's held copies for its queue");
    // Once only: B's queue removed it after delivering.
    wait_for(Duration::from_secs(20), "B's queue empty", || !in_spool(&p.b, &id), ctx);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(s.mail("u").len(), 1, "{}", ctx());
}

/// The normal case: A delivers, confirms in Redis, and B drops its copy and delivers
/// nothing, even once A is gone. B down at accept time: A accepts with its own copy
/// alone (`backup_on_error accept`, the default) or, with `backup_on_error tempfail`,
/// answers 451 and keeps nothing. A copy not signed with the pair's key is refused.
#[test]
fn a_delivered_message_is_confirmed_and_its_copy_dropped() {
    let t = TempDir::new("confirm");
    let redis = Redis::start(t.join("redis"));
    let sink_port = free_port();
    let s = sink(t.join("sink"), sink_port);
    let mut p = pair(&t, &redis, sink_port, "");
    let (code, text) = send_one(p.a.port, "s@far.test", "u@d.test");
    assert_eq!(code, 250, "{text}\n{}", p.a.log());
    let id = queued_id(&p.a.log());
    let ctx = || format!("A:\n{}\nB:\n{}\nsink:\n{}", p.a.log(), p.b.log(), s.log());
    wait_for(Duration::from_secs(20), "A's delivery", || s.mail("u").len() == 1, ctx);
    wait_for(Duration::from_secs(20), "A's confirmation", || p.a.log().contains("shadow-confirmed"), ctx);
    wait_for(Duration::from_secs(20), "B to drop its copy", || p.b.log().contains("shadow-dropped"), ctx);
    assert!(p.b.log().contains(&format!("id={id} reason=confirmed")), "{}", ctx());
    assert!(held(&p.b).is_empty(), "{:?}", held(&p.b));
    // A dies now: B has nothing of A's left to deliver.
    p.a.stop();
    let ctx = || format!("B:\n{}\nsink:\n{}", p.b.log(), s.log());
    std::thread::sleep(Duration::from_millis(8_000));
    assert!(!p.b.log().contains("shadow-released"), "{}", ctx());
    assert_eq!(s.mail("u").len(), 1, "delivered once: {}", ctx());

    // A copy from someone without the key is refused, and nothing is held.
    let mut c = TcpStream::connect(("127.0.0.1", p.b_listen)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let body = b"MAILPOLICY-SPOOL 1\n";
    let _ = c.write_all(
        format!("MAILPOLICY-SHADOW 1 evil.test@0123456789abcdef 0123456789AB0000000000 {}\r\n", body.len()).as_bytes(),
    );
    let _ = c.write_all(body);
    let _ = c.write_all(format!("{}\r\n", "00".repeat(32)).as_bytes());
    let mut reply = String::new();
    let _ = BufReader::new(c).read_line(&mut reply);
    assert!(reply.starts_with("535 5.7.8") || reply.starts_with("501"), "{reply}");
    assert!(p.b.log().contains("shadow-refused"), "{}", p.b.log());
    assert!(held(&p.b).is_empty());

    // B goes down: A (restarted) accepts with its own copy alone, by default...
    p.b.stop();
    p.a.restart();
    let (code, text) = send_one(p.a.port, "s@far.test", "u@d.test");
    assert_eq!(code, 250, "{text}");
    assert!(
        p.a.log().contains("shadow-failed") && p.a.log().contains("action=\"accepted without a copy\""),
        "{}",
        p.a.log()
    );
    // ...or refuses for now with `backup_on_error tempfail`, keeping nothing.
    let policy = std::fs::read_to_string(t.join("a/policy.mailpolicy")).expect("policy");
    std::fs::write(
        t.join("a/policy.mailpolicy"),
        policy.replace("backup_takeover 2s;", "backup_takeover 2s; backup_on_error tempfail;"),
    )
    .expect("policy");
    p.a.restart();
    let (code, text) = send_one(p.a.port, "s@far.test", "u@d.test");
    assert_eq!(code, 451, "{text}\n{}", p.a.log());
    assert!(text.contains("4.3.0"), "{text}");
    // (The session's line: A's retries of the earlier message may log their own.)
    let log = p.a.log();
    let refused = logged_id(
        &log.lines().filter(|l| l.contains("action=tempfail")).collect::<Vec<_>>().join("\n"),
        "shadow-failed",
    );
    let ctx = || p.a.log();
    wait_for(Duration::from_secs(10), "the refused message removed", || !in_spool(&p.a, &refused), ctx);
}

/// Section 5.5: a message its origin quarantines (`corrupt/`: here a spool file damaged
/// while A was down, which A's recovery moves aside at start) will never be delivered
/// there; A says so in the store and B delivers its good copy at once, A alive (B's
/// `backup_takeover` is an hour: silence plays no part).
#[test]
fn a_copy_its_origin_quarantined_is_delivered_by_the_peer_at_once() {
    let t = TempDir::new("unusable");
    let redis = Redis::start(t.join("redis"));
    let sink_port = free_port();
    let mut p = pair_with(&t, &redis, sink_port, "", "backup_takeover 1h;");
    let (code, text) = send_one(p.a.port, "s@far.test", "u@d.test");
    assert_eq!(code, 250, "{text}\n{}", p.a.log());
    let id = queued_id(&p.a.log());
    assert_eq!(held(&p.b), vec![id.clone()], "{}", p.b.log());
    wait_for(Duration::from_secs(20), "A's failed attempt", || p.a.log().contains("status=deferred"), || p.a.log());
    p.a.stop();
    // (Killed perhaps before the deferral moved it out of active/: recovery checks it there.)
    let file = ["incoming", "active", "deferred", "hold"]
        .iter()
        .map(|q| p.a.dir.join("spool").join(q).join(&id))
        .find(|f| f.is_file())
        .expect("A keeps the message");
    std::fs::write(&file, b"not a spool file any more\n").expect("damage the file");
    let s = sink(t.join("sink"), sink_port);
    p.a.restart();
    let ctx = || format!("A:\n{}\nB:\n{}\nsink:\n{}", p.a.log(), p.b.log(), s.log());
    assert!(p.a.dir.join("spool/corrupt").join(&id).is_file(), "A's recovery quarantined it: {}", ctx());
    wait_for(Duration::from_secs(20), "A to say its copy is unusable", || p.a.log().contains("shadow-unusable"), ctx);
    assert!(p.a.log().contains(&format!("shadow-unusable id={id} ")), "{}", ctx());
    wait_for(Duration::from_secs(20), "B to release its copy", || p.b.log().contains("shadow-released"), ctx);
    let released = p.b.log().lines().find(|l| l.contains("shadow-released")).unwrap_or_default().to_string();
    assert!(released.contains(&format!(" id={id} ")) && released.contains("unusable"), "{released}");
    wait_for(Duration::from_secs(30), "the copy delivered", || s.mail("u").len() == 1, ctx);
    assert!(s.mail("u")[0].contains("Subject: cluster"), "{}", ctx());
    assert!(held(&p.b).is_empty(), "{:?}", held(&p.b));
    // A delivers nothing of it (its own is in corrupt/), and B once.
    wait_for(Duration::from_secs(20), "B's queue empty", || !in_spool(&p.b, &id), ctx);
    assert!(!in_spool(&p.a, &id), "{}", ctx());
    assert_eq!(s.mail("u").len(), 1, "{}", ctx());
}

/// Section 5.5: a DSN a host makes itself is held by its peer like an accepted message. A
/// bounces a recipient; its bounce to the sender cannot go yet (the next hop is down) and A
/// is killed: B delivers the bounce, under A's id for it, once the next hop is up.
#[test]
fn a_bounce_its_host_died_before_sending_is_delivered_by_the_peer() {
    let (t, _redis, sink_port, mut p) = backup_pair("dsn");
    let (code, text) = send_one(p.a.port, "s@d.test", "gone@d.test");
    assert_eq!(code, 250, "{text}\n{}", p.a.log());
    let id = queued_id(&p.a.log());
    let ctx = || format!("A:\n{}\nB:\n{}", p.a.log(), p.b.log());
    wait_for(Duration::from_secs(20), "A's bounce", || p.a.log().contains("dsn_id="), ctx);
    let log = p.a.log();
    let dsn_line = log.lines().find(|l| l.contains("dsn_id=")).unwrap_or_default();
    let dsn = dsn_line.split_whitespace().find_map(|w| w.strip_prefix("dsn_id=")).unwrap_or_default().to_string();
    assert!(!dsn.is_empty() && dsn != id, "{dsn_line}");
    // The bounce is held by B before A queues it; the bounced message itself is done,
    // confirmed, and its copy dropped.
    // (A logs `shadowed` once B answered, after B holds the file.)
    let shadowed = format!("shadowed id={dsn} kind=failure ");
    wait_for(Duration::from_secs(20), "B to hold the bounce", || p.a.log().contains(&shadowed), ctx);
    assert!(held(&p.b).contains(&dsn), "{}", ctx());
    // (B removes the file, then logs it: wait for the line, which comes last.)
    let dropped = format!("id={id} reason=confirmed");
    wait_for(Duration::from_secs(20), "B to drop the bounced message's copy", || p.b.log().contains(&dropped), ctx);
    assert!(!held(&p.b).contains(&id), "{}", ctx());
    wait_for(
        Duration::from_secs(20),
        "A's failed attempt at the bounce",
        || p.a.log().lines().any(|l| l.contains(&dsn) && l.contains("status=deferred")),
        ctx,
    );
    p.a.stop();
    let s = sink(t.join("sink"), sink_port);
    let ctx = || format!("B:\n{}\nsink:\n{}", p.b.log(), s.log());
    wait_for(Duration::from_secs(30), "B to release the bounce", || p.b.log().contains("shadow-released"), ctx);
    let released = p.b.log().lines().find(|l| l.contains("shadow-released")).unwrap_or_default().to_string();
    assert!(released.contains(&format!(" id={dsn} ")), "{released}");
    wait_for(Duration::from_secs(30), "the bounce delivered", || s.mail("s").len() == 1, ctx);
    let m = s.mail("s");
    assert!(m[0].contains("gone@d.test") && m[0].contains("multipart/report"), "{m:?}");
    wait_for(Duration::from_secs(20), "B's queue empty", || !in_spool(&p.b, &dsn), ctx);
    assert_eq!(s.mail("s").len(), 1, "delivered once: {}", ctx());
    assert!(s.mail("gone").is_empty());
}

/// `mailc queue flush` on a host's spool: its deferred messages are due now.
fn flush(d: &Serve) {
    let out = Command::new(MAILC)
        .args(["queue", "flush", "--spool"])
        .arg(d.dir.join("spool"))
        .output()
        .expect("mailc queue flush");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// The `shadow-held` lines of a host for queue id `id`.
fn held_lines(d: &Serve, id: &str) -> usize {
    d.log().lines().filter(|l| l.contains("shadow-held origin=mx-a.test@") && l.contains(&format!(" id={id} "))).count()
}

/// The next hop comes up and A's queue is flushed: A delivers `id` once and confirms it,
/// B drops its copy and has released nothing.
fn delivered_and_dropped(t: &TempDir, p: &Pair, sink_port: u16, id: &str) {
    let s = sink(t.join("sink"), sink_port);
    flush(&p.a);
    let ctx = || format!("A:\n{}\nB:\n{}\nsink:\n{}", p.a.log(), p.b.log(), s.log());
    wait_for(Duration::from_secs(30), "A's delivery", || s.mail("u").len() == 1, ctx);
    let dropped = format!("id={id} reason=confirmed");
    wait_for(Duration::from_secs(20), "B to drop its copy", || p.b.log().contains(&dropped), ctx);
    assert!(p.a.log().contains(&format!("shadow-confirmed id={id} ")), "{}", ctx());
    assert!(held(&p.b).is_empty(), "{}", ctx());
    wait_for(Duration::from_secs(20), "A's queue empty", || !in_spool(&p.a, id), ctx);
    assert!(!in_spool(&p.b, id) && !p.b.log().contains("shadow-released"), "B released nothing: {}", ctx());
    assert_eq!(s.mail("u").len(), 1, "{}", ctx());
}

/// Section 5.5: a message accepted while the peer was down (`backup_on_error accept`: 250
/// with A's copy alone) gets its copy once the peer is back, A not restarted: A's retries
/// fail while B is down (logged, with the wait), then B holds it (`shadowed id=ID
/// kind=retry` on A, `shadow-held` on B); once A delivers it, it is confirmed and B drops
/// its copy like any other.
#[test]
fn a_message_accepted_without_a_copy_gets_one_when_the_peer_is_back() {
    let (t, _redis, sink_port, mut p) = backup_pair("recopy");
    p.b.stop();
    let (code, text) = send_one(p.a.port, "s@far.test", "u@d.test");
    assert_eq!(code, 250, "{text}\n{}", p.a.log());
    let id = queued_id(&p.a.log());
    let ctx = || format!("A:\n{}\nB:\n{}", p.a.log(), p.b.log());
    assert!(
        p.a.log().lines().any(|l| l.contains("shadow-failed session=")
            && l.contains(&format!(" id={id} "))
            && l.contains("action=\"accepted without a copy\"")),
        "{}",
        ctx()
    );
    let retry_failed = format!("shadow-failed id={id} kind=retry ");
    wait_for(Duration::from_secs(20), "A's retry to fail", || p.a.log().contains(&retry_failed), ctx);
    assert!(p.a.log().contains("action=\"retry in "), "{}", ctx());
    let marker = p.a.dir.join("spool/backup/sent").join(&id);
    assert!(!marker.exists(), "no copy held, no marker");
    wait_for(Duration::from_secs(20), "A's failed attempt", || p.a.log().contains("status=deferred"), ctx);
    // B comes back: A's next retry hands it the copy.
    p.b.restart();
    let ctx = || format!("A:\n{}\nB:\n{}", p.a.log(), p.b.log());
    let shadowed = format!("shadowed id={id} kind=retry ");
    wait_for(Duration::from_secs(60), "A's retry to land", || p.a.log().contains(&shadowed), ctx);
    assert_eq!(held_lines(&p.b, &id), 1, "{}", ctx());
    assert_eq!(held(&p.b), vec![id.clone()], "{}", ctx());
    assert!(marker.is_file(), "{}", ctx());
    assert!(in_spool(&p.a, &id), "A still has its own: {}", ctx());
    // A delivers it: confirmed as any copy, and dropped by B.
    delivered_and_dropped(&t, &p, sink_port, &id);
    assert!(!marker.exists());
}

/// Section 5.5: at start a host copies every queued message with no `sent/` marker (as a
/// DSN or alert stored just before a kill -9 has none; here the marker of a held copy is
/// lost, as a crash may lose it). The peer, which held a copy already, keeps one: the
/// second replaces the first, and once A delivered and confirmed the message B drops it:
/// nothing is delivered twice.
#[test]
fn a_queued_message_without_a_marker_is_copied_at_start_and_a_second_copy_is_harmless() {
    let (t, _redis, sink_port, mut p) = backup_pair("recopy-start");
    let (code, text) = send_one(p.a.port, "s@far.test", "u@d.test");
    assert_eq!(code, 250, "{text}\n{}", p.a.log());
    let id = queued_id(&p.a.log());
    let ctx = || format!("A:\n{}\nB:\n{}", p.a.log(), p.b.log());
    assert_eq!(held(&p.b), vec![id.clone()], "{}", ctx());
    wait_for(Duration::from_secs(20), "A's failed attempt", || p.a.log().contains("status=deferred"), ctx);
    p.a.stop();
    let marker = p.a.dir.join("spool/backup/sent").join(&id);
    std::fs::remove_file(&marker).expect("A's marker");
    p.a.restart();
    let ctx = || format!("A:\n{}\nB:\n{}", p.a.log(), p.b.log());
    let shadowed = format!("shadowed id={id} kind=retry ");
    wait_for(Duration::from_secs(30), "A's copy at start", || p.a.log().contains(&shadowed), ctx);
    assert_eq!(held_lines(&p.b, &id), 2, "{}", ctx());
    assert_eq!(held(&p.b), vec![id.clone()], "one copy held: {}", ctx());
    assert!(marker.is_file(), "{}", ctx());
    delivered_and_dropped(&t, &p, sink_port, &id);
}

/// A CA and a certificate it signed for 127.0.0.1 (`ca.pem`, `peer.pem`, `peer.key` in
/// `dir`), made with openssl (Debian's, which tests/run.sh installs).
fn backup_certificates(dir: &Path, prefix: &str) {
    need("/usr/bin/openssl", "openssl");
    std::fs::create_dir_all(dir).expect("cert dir");
    std::fs::write(dir.join("peer.ext"), "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n").expect("ext");
    for script in [
        format!("openssl req -x509 -newkey rsa:2048 -nodes -keyout {prefix}ca.key -out {prefix}ca.pem -days 2 -subj '/CN=backup test CA'"),
        format!("openssl req -newkey rsa:2048 -nodes -keyout {prefix}peer.key -out {prefix}peer.csr -subj '/CN=backup peer'"),
        format!("openssl x509 -req -in {prefix}peer.csr -CA {prefix}ca.pem -CAkey {prefix}ca.key -CAcreateserial -out {prefix}peer.pem -days 2 -extfile peer.ext"),
    ] {
        let out = Command::new("sh").arg("-c").arg(&script).current_dir(dir).output().expect("openssl");
        assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Section 5.5, `backup_tls`: the copy travels over TLS, the peer verified against the
/// pair's CA (its certificate is for 127.0.0.1, `backup_peer`'s address); the listener
/// refuses a copy in the clear; a sender whose CA the peer's certificate does not chain to
/// hands it nothing (and accepts with its own copy alone, `backup_on_error accept`).
#[test]
fn copies_travel_over_tls_to_a_verified_peer() {
    let t = TempDir::new("backup-tls");
    let certs = t.join("certs");
    backup_certificates(&certs, "");
    backup_certificates(&certs, "other-");
    let c = |f: &str| certs.join(f).display().to_string();
    let tls = format!(
        "backup_tls true; backup_tls_cert \"{}\"; backup_tls_key \"{}\"; backup_tls_ca \"{}\";",
        c("peer.pem"),
        c("peer.key"),
        c("ca.pem")
    );
    let redis = Redis::start(t.join("redis"));
    let sink_port = free_port();
    let s = sink(t.join("sink"), sink_port);
    let mut p = pair_with(&t, &redis, sink_port, &tls, &tls);
    let (code, text) = send_one(p.a.port, "s@far.test", "u@d.test");
    assert_eq!(code, 250, "{text}\n{}", p.a.log());
    let id = queued_id(&p.a.log());
    let ctx = || format!("A:\n{}\nB:\n{}", p.a.log(), p.b.log());
    assert!(p.a.log().contains(&format!("shadowed session=")), "{}", ctx());
    assert!(p.b.log().contains(&format!("shadow-held origin=mx-a.test@")), "{}", ctx());
    wait_for(Duration::from_secs(20), "A's delivery", || s.mail("u").len() == 1, ctx);
    wait_for(
        Duration::from_secs(20),
        "B to drop its copy",
        || p.b.log().contains(&format!("id={id} reason=confirmed")),
        ctx,
    );

    // The listener takes nothing in the clear: the plain protocol gets no answer.
    let mut plain = TcpStream::connect(("127.0.0.1", p.b_listen)).expect("connect");
    plain.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let _ = plain.write_all(b"MAILPOLICY-SHADOW 1 evil.test@0123456789abcdef 0123456789AB0000000000 1\r\nx\r\n");
    let mut reply = String::new();
    let _ = BufReader::new(plain).read_line(&mut reply);
    assert!(!reply.starts_with("250") && !reply.contains("held"), "{reply}");
    wait_for(Duration::from_secs(20), "B to refuse it", || p.b.log().contains("reason=\"TLS handshake"), ctx);
    assert!(held(&p.b).is_empty(), "{:?}", held(&p.b));

    // A sender that trusts another CA does not hand B a copy.
    let policy = std::fs::read_to_string(t.join("a/policy.mailpolicy")).expect("policy");
    std::fs::write(t.join("a/policy.mailpolicy"), policy.replace(&c("ca.pem"), &c("other-ca.pem"))).expect("policy");
    p.a.restart();
    let ctx = || format!("A:\n{}\nB:\n{}", p.a.log(), p.b.log());
    let (code, text) = send_one(p.a.port, "s@far.test", "u@d.test");
    assert_eq!(code, 250, "{text}\n{}", p.a.log());
    let failed =
        p.a.log().lines().filter(|l| l.contains("shadow-failed session=")).last().unwrap_or_default().to_string();
    assert!(failed.contains("TLS") && failed.contains("accepted without a copy"), "{}", ctx());
    assert!(held(&p.b).is_empty(), "{:?}", held(&p.b));
}
