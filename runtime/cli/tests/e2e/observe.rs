//! Observability (issue 14 item 4): `/metrics` on the admin listener scraped against the
//! traffic the test sent, exactly; syslog datagrams on a socket the test binds, with
//! facility and severity (RFC 3164, RFC 5424 after a reload); the Postfix-style summary
//! lines, read by pflogsumm.

use super::*;

// ================================================================== observability (issue 14 item 4)

/// One HTTP GET on 127.0.0.1:`port`; returns (status line, headers and body).
fn http_get(port: u16, path: &str) -> (String, String) {
    use std::io::Read;
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the admin listener");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").expect("send request");
    let mut all = String::new();
    s.read_to_string(&mut all).expect("read response");
    let status = all.lines().next().unwrap_or("").to_string();
    (status, all)
}

/// The value of the sample `name{labels}` in an exposition (labels in the order written),
/// or 0 when the exposition has no such sample.
fn sample(text: &str, name: &str, labels: &str) -> f64 {
    let key = if labels.is_empty() { name.to_string() } else { format!("{name}{{{labels}}}") };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(&key).and_then(|v| v.strip_prefix(' ')))
        .map(|v| v.trim().parse::<f64>().unwrap_or_else(|_| panic!("not a number: {v}")))
        .unwrap_or(0.0)
}

/// The policy of the observability tests: local d.test and s.test, far.test to a sink,
/// slow.test to a port nobody listens on (deferred), gone.test bounced at routing,
/// blocked@ refused at RCPT, senders in the `watched` map held, no early retry.
fn observed_policy(port: u16, sink: u16, dead: u16, extra_server: &str) -> String {
    format!(
        r#"list local = domains ["d.test", "s.test"];
table watched = map "watched.map";

server {{
  hostname "mx.test";
  spool "spool";
  maildir "mail";
  local_domains local;
  retry_min 1h;
  retry_max 2h;
  queue_run 1h;
{extra_server}}}

listener smtp {{
  address "127.0.0.1:{port}";
  protocol smtp;
  tls none;
}}

on mail {{
  if sender in watched {{
    hold "watched sender";
  }}
}}

on rcpt {{
  if recipient.local :is "blocked" {{
    reject 550 5.7.1 "Blocked by rule";
  }}
}}

route {{
  if recipient.domain in local {{
    deliver maildir;
  }}
  if recipient.domain :is "gone.test" {{
    reject 550 5.1.2 "Domain gone";
  }}
  if recipient.domain :is "slow.test" {{
    deliver smtp "[127.0.0.1]:{dead}";
  }}
  deliver smtp "[127.0.0.1]:{sink}";
}}
"#
    )
}

/// The known traffic of the observability tests, each by swaks: returns the queue ids of
/// the accepted messages by recipient.
fn observed_traffic(port: u16) -> Vec<(String, String)> {
    let mut ids = Vec::new();
    for (from, to) in [
        ("a@s.test", "u1@d.test"),
        ("a@s.test", "x@far.test"),
        ("a@s.test", "blocked@d.test"),
        ("a@s.test", "y@slow.test"),
        ("held@s.test", "u2@d.test"),
        ("a@s.test", "z@gone.test"),
    ] {
        let out = swaks(port, &["--from", from, "--to", to, "--header", "Subject: observed"]);
        if to.starts_with("blocked") {
            assert!(out.contains("550 5.7.1 Blocked by rule"), "{out}");
        } else {
            let id = out.lines().find_map(|l| l.split("Queued as ").nth(1)).map(|s| s.trim().to_string());
            ids.push((to.to_string(), id.unwrap_or_else(|| panic!("not queued: {out}"))));
        }
    }
    ids
}

/// Item 4: the counters of `/metrics` are what the test did, exactly.
#[test]
fn metrics_count_what_the_test_did() {
    let t = TempDir::new("metrics");
    let (port, sport, dead, admin) = (free_port(), free_port(), free_port(), free_port());
    let sink = Sink::start(&t.join("sink"), sport, &[]);
    std::fs::write(t.join("watched.map"), "held@s.test yes\n").expect("table");
    let policy = observed_policy(port, sport, dead, &format!("  admin \"127.0.0.1:{admin}\";\n"));
    let d = Daemon::start(t.path(), &policy, &[port, admin]);
    let (status, body) = http_get(admin, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    assert!(body.contains("Content-Type: application/openmetrics-text"), "{body}");
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    assert_eq!(http_get(admin, "/nothing").0, "HTTP/1.1 404 Not Found");
    // The counters before the traffic: the test's own "is it listening" connection is a
    // session too. Every count below is the difference.
    wait_for(
        Duration::from_secs(20),
        "the probe session closed",
        || sample(&http_get(admin, "/metrics").1, "mailpolicy_sessions_current", "listener=\"smtp\"") == 0.0,
        || http_get(admin, "/metrics").1,
    );
    let before = http_get(admin, "/metrics").1;

    let ids = observed_traffic(port);
    // A file in corrupt/, as a message the queue manager gave up on would leave.
    std::fs::write(d.spool().join("corrupt").join("0000DEADBEEF"), "junk").expect("corrupt file");
    // Delivered: u1 (Maildir), x (the sink), the DSN of z to a@s.test (Maildir).
    wait_for(
        Duration::from_secs(30),
        "u1, x and the DSN of z delivered, y deferred",
        || {
            let m = http_get(admin, "/metrics").1;
            sample(&m, "mailpolicy_deliveries_total", "result=\"delivered\"") >= 3.0
                && sample(&m, "mailpolicy_deliveries_total", "result=\"deferred\"") >= 1.0
                && sample(&m, "mailpolicy_queue_messages", "queue=\"deferred\"") >= 1.0
        },
        || format!("{}\n{}", http_get(admin, "/metrics").1, d.log()),
    );
    assert_eq!(sink.messages().len(), 1);
    wait_for(
        Duration::from_secs(20),
        "no session open",
        || sample(&http_get(admin, "/metrics").1, "mailpolicy_sessions_current", "listener=\"smtp\"") == 0.0,
        || http_get(admin, "/metrics").1,
    );
    let m = http_get(admin, "/metrics").1;
    let ctx = format!("{m}\n{}", d.log());
    let s = |name: &str, labels: &str| sample(&m, name, labels) - sample(&before, name, labels);
    assert_eq!(s("mailpolicy_sessions_total", "listener=\"smtp\""), 6.0, "{ctx}");
    // Six sessions: 220 and 221 each; EHLO and MAIL 250 each; five RCPTs 250 and one 550;
    // five DATA 354 and five 250 after the dot.
    let r = |code: &str| {
        s("mailpolicy_replies_total", &format!("listener=\"smtp\",class=\"{}xx\",code=\"{code}\"", &code[..1]))
    };
    assert_eq!((r("220"), r("221"), r("250"), r("354"), r("550")), (6.0, 6.0, 22.0, 5.0, 1.0), "{ctx}");
    assert_eq!(r("421") + r("451") + r("452") + r("554") + r("503"), 0.0, "{ctx}");
    // The verdicts, by the deciding rule's FILE:LINE.
    let line_of = |text: &str| policy.lines().position(|l| l.contains(text)).map(|i| i + 1).expect("policy line");
    let file = d.policy.display().to_string();
    let v = |stage: &str, outcome: &str, line: usize| {
        s("mailpolicy_verdicts_total", &format!("stage=\"{stage}\",outcome=\"{outcome}\",rule=\"{file}:{line}\""))
    };
    let rcpt_reject =
        v("rcpt", "reject", line_of("reject 550 5.7.1")) + v("rcpt", "reject", line_of("if recipient.local"));
    assert_eq!(rcpt_reject, 1.0, "{ctx}");
    let route_reject = v("route", "reject", line_of("reject 550 5.1.2"))
        + v("route", "reject", line_of("if recipient.domain :is \"gone.test\""));
    assert_eq!(route_reject, 1.0, "{ctx}");
    let maildir_line = v("route", "deliver", line_of("deliver maildir"))
        + v("route", "deliver", line_of("if recipient.domain in local"));
    // u1, the DSN to a@s.test, and u2 (routed when it was queued, then held).
    assert_eq!(maildir_line, 3.0, "{ctx}");
    // The deliveries: delivered u1, x, the DSN; deferred y once (no retry within the hour);
    // bounced z at routing.
    assert_eq!(s("mailpolicy_deliveries_total", "result=\"delivered\""), 3.0, "{ctx}");
    assert_eq!(s("mailpolicy_deliveries_total", "result=\"deferred\""), 1.0, "{ctx}");
    assert_eq!(s("mailpolicy_deliveries_total", "result=\"bounced\""), 1.0, "{ctx}");
    // The queue, read from the spool: y deferred, u2 on hold, the corrupt file.
    let q = |queue: &str| sample(&m, "mailpolicy_queue_messages", &format!("queue=\"{queue}\""));
    assert_eq!(
        (q("incoming"), q("active"), q("deferred"), q("hold"), q("corrupt")),
        (0.0, 0.0, 1.0, 1.0, 1.0),
        "{ctx}"
    );
    let qr = |labels: &str| sample(&m, "mailpolicy_queue_recipients", labels);
    assert_eq!(qr("queue=\"deferred\",destination=\"slow.test\""), 1.0, "{ctx}");
    assert_eq!(qr("queue=\"hold\",destination=\"d.test\""), 1.0, "{ctx}");
    // One table lookup per MAIL (six), each in the histogram; a spool commit per stored
    // message at least (five and the DSN).
    assert_eq!(s("mailpolicy_lookup_duration_seconds_count", "backend=\"table\""), 6.0, "{ctx}");
    assert!(s("mailpolicy_spool_commit_duration_seconds_count", "") >= 6.0, "{ctx}");
    assert!(
        m.contains("mailpolicy_lookup_duration_seconds_bucket{le=\"+Inf\",backend=\"table\"} 6")
            || m.contains("mailpolicy_lookup_duration_seconds_bucket{backend=\"table\",le=\"+Inf\"} 6"),
        "{ctx}"
    );

    // The summary lines (standard error: `TIME HOST mailpolicy/PROG[PID]: ID: TEXT`).
    let log = d.log();
    let id_of = |to: &str| ids.iter().find(|(t, _)| t == to).map(|(_, i)| i.clone()).expect("queue id");
    let summary = |prog: &str, id: &str, start: &str| -> String {
        log.lines()
            .find(|l| l.contains(&format!(" mailpolicy/{prog}[")) && l.contains(&format!("]: {id}: {start}")))
            .unwrap_or_else(|| panic!("no {prog} line `{id}: {start}`:\n{log}"))
            .to_string()
    };
    let x = id_of("x@far.test");
    summary("smtpd", &x, "client=");
    let q = summary("qmgr", &x, "from=<a@s.test>, size=");
    assert!(q.ends_with(", nrcpt=1 (queue active)"), "{q}");
    let sent = summary("smtp", &x, "to=<x@far.test>, relay=");
    check_summary(&sent, &format!("relay=127.0.0.1[127.0.0.1]:{sport}"), "2.0.0", "sent (250 ");
    let local = summary("local", &id_of("u1@d.test"), "to=<u1@d.test>, relay=local");
    check_summary(&local, "relay=local", "2.0.0", "sent (250 2.0.0 delivered to maildir)");
    let deferred = summary("smtp", &id_of("y@slow.test"), "to=<y@slow.test>");
    check_summary(&deferred, "relay=none", "4.", "deferred (4");
    let bounced = summary("qmgr", &id_of("z@gone.test"), "to=<z@gone.test>");
    check_summary(&bounced, "relay=none", "5.1.2", "bounced (550 5.1.2 Domain gone)");
    summary("qmgr", &x, "removed");
    // The refusal, as Postfix's smtpd words it.
    let refused = summary("smtpd", "NOQUEUE", "reject: RCPT from ");
    assert!(
        refused.ends_with("[127.0.0.1]: 550 5.7.1 Blocked by rule; from=<a@s.test> to=<blocked@d.test> proto=ESMTP helo=<client.test>"),
        "{refused}"
    );
}

/// A per-recipient summary line: `... to=<..>, relay=R, delay=S, delays=a/b/c/d, dsn=D, status=ST`.
fn check_summary(line: &str, relay: &str, dsn: &str, status: &str) {
    let text = line.split("]: ").nth(1).unwrap_or_else(|| panic!("no tag: {line}"));
    let parts: Vec<&str> = text.splitn(6, ", ").collect();
    assert_eq!(parts.len(), 6, "{line}");
    assert!(parts[0].contains(": to=<"), "{line}");
    assert_eq!(parts[1], relay, "{line}");
    let number = |v: &str| v.parse::<f64>().is_ok_and(|n| n >= 0.0);
    assert!(parts[2].strip_prefix("delay=").is_some_and(number), "{line}");
    let delays: Vec<&str> = parts[3].strip_prefix("delays=").unwrap_or("").split('/').collect();
    assert!(delays.len() == 4 && delays.iter().all(|d| number(d)), "{line}");
    assert!(parts[4].strip_prefix("dsn=").is_some_and(|d| d.starts_with(dsn) && d.split('.').count() == 3), "{line}");
    assert!(parts[5].strip_prefix("status=").is_some_and(|s| s.starts_with(status) && s.ends_with(')')), "{line}");
}

/// Item 4: with `log syslog`, lines arrive on the syslog socket (here one the test binds)
/// with the mail facility and each line's severity; RFC 5424 after a reload that asks for
/// it; pflogsumm reads the summary lines as a syslog daemon writes them to a file.
#[test]
fn syslog_lines_have_facility_and_severity() {
    use std::os::unix::net::UnixDatagram;
    let t = TempDir::new("syslog");
    let (port, sport, dead) = (free_port(), free_port(), free_port());
    let _sink = Sink::start(&t.join("sink"), sport, &[]);
    std::fs::write(t.join("watched.map"), "held@s.test yes\n").expect("table");
    let sock_path = t.join("log.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind the syslog socket");
    sock.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let server = "  log syslog;\n  syslog_socket \"log.sock\";\n";
    let policy = observed_policy(port, sport, dead, server);
    let mut d = Daemon::start(t.path(), &policy, &[port]);
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (got, stop) = (got.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    got.lock().unwrap().push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
        })
    };
    let lines = || got.lock().unwrap().clone();
    observed_traffic(port);
    wait_for(
        Duration::from_secs(30),
        "the summary lines of every recipient on the socket",
        || {
            let l = lines();
            let has = |to: &str, status: &str| l.iter().any(|l| l.contains(to) && l.contains(status));
            has("to=<x@far.test>", "status=sent")
                && has("to=<u1@d.test>", "status=sent")
                && has("to=<a@s.test>", "status=sent")
                && has("to=<y@slow.test>", "status=deferred")
                && has("to=<z@gone.test>", "status=bounced")
        },
        || format!("{:#?}\n{}", lines(), d.log()),
    );
    let all = lines();
    let ctx = format!("{all:#?}");
    // RFC 3164 as syslog(3) sends it: <PRI>Mmm dd hh:mm:ss TAG[PID]: MSG; PRI = 8 × 2 (mail) + severity.
    let pid = d.child.pid();
    let find =
        |what: &str| all.iter().find(|l| l.contains(what)).unwrap_or_else(|| panic!("no line with {what}: {ctx}"));
    let check3164 = |l: &str, pri: u32, tag: &str| {
        let rest = l.strip_prefix(&format!("<{pri}>")).unwrap_or_else(|| panic!("PRI {pri} expected: {l}"));
        let (time, msg) = rest.split_at(15.min(rest.len()));
        let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
        assert!(months.iter().any(|m| time.starts_with(m)) && time.as_bytes()[9] == b':', "timestamp: {l}");
        assert!(msg.starts_with(&format!(" {tag}[{pid}]: ")), "tag {tag}[{pid}]: {l}");
    };
    check3164(find("to=<x@far.test>"), 16 + 6, "mailpolicy/smtp"); // info
    check3164(find("to=<y@slow.test>"), 16 + 4, "mailpolicy/smtp"); // warning: deferred
    check3164(find("listening listener=smtp"), 16 + 5, "mailpolicy"); // notice
    check3164(find("verdict "), 16 + 6, "mailpolicy");
    // No line went to standard error meanwhile but what came before the policy was read.
    assert!(!d.log().contains("to=<x@far.test>"), "{}", d.log());

    // pflogsumm reads the summary lines once a syslog daemon has written them to a file.
    let pflogsumm = "/usr/sbin/pflogsumm";
    need(pflogsumm, "pflogsumm");
    let file: String = all
        .iter()
        .filter_map(|l| l.split_once('>').map(|(_, r)| r))
        .map(|r| format!("{} mx {}\n", &r[..15], &r[16..]))
        .collect();
    std::fs::write(t.join("maillog"), &file).expect("maillog");
    let (st, out, err) = run_bounded(
        Command::new(pflogsumm).args(["--syslog-name=mailpolicy", "--no_no_msg_size", "-e"]).arg(t.join("maillog")),
        Duration::from_secs(60),
    );
    assert!(st.success(), "{err}");
    let count = |label: &str| {
        out.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|w| w.get(1) == Some(&label) && w.first().is_some_and(|n| n.parse::<u32>().is_ok()))
            .and_then(|w| w.first().map(|n| n.to_string()))
            .unwrap_or_else(|| panic!("no `{label}` in pflogsumm's report:\n{out}\n{file}"))
    };
    // Received: five queued (and the DSN, which has no client line); delivered: u1, x, DSN.
    assert_eq!(count("received"), "5", "{out}");
    assert_eq!(count("delivered"), "3", "{out}");
    assert_eq!(count("deferred"), "1", "{out}");
    assert_eq!(count("bounced"), "1", "{out}");
    assert_eq!(count("rejected"), "1", "{out}");

    // SIGHUP to RFC 5424, facility local3: the next lines follow it.
    std::fs::write(
        &d.policy,
        observed_policy(port, sport, dead, &format!("{server}  syslog_format rfc5424;\n  syslog_facility local3;\n")),
    )
    .expect("policy");
    d.signal("HUP");
    wait_for(
        Duration::from_secs(20),
        "the reloaded line",
        || lines().iter().any(|l| l.contains("reloaded")),
        || format!("{:#?}", lines()),
    );
    let l = lines().into_iter().find(|l| l.contains("reloaded")).unwrap_or_default();
    // <PRI>1 TIMESTAMP HOST APP PROCID MSGID - MSG; local3 = 19, notice = 5.
    let parts: Vec<&str> = l.splitn(8, ' ').collect();
    assert_eq!(parts.first().copied(), Some(format!("<{}>1", 19 * 8 + 5).as_str()), "{l}");
    assert!(parts.get(1).is_some_and(|t| t.ends_with('Z') && t.contains('T')), "{l}");
    let pid_s = pid.to_string();
    assert_eq!(parts.get(2..7), Some(&["mx.test", "mailpolicy", pid_s.as_str(), "reloaded", "-"][..]), "{l}");

    // SIGHUP to the journal's native protocol (the socket the test binds standing in for
    // /run/systemd/journal/socket): KEY=VALUE fields, PRIORITY and SYSLOG_FACILITY.
    std::fs::write(&d.policy, observed_policy(port, sport, dead, "  log journal;\n  journal_socket \"log.sock\";\n"))
        .expect("policy");
    d.signal("HUP");
    wait_for(
        Duration::from_secs(20),
        "the reloaded entry in the journal's format",
        || lines().iter().any(|l| l.contains("MAILPOLICY_EVENT=reloaded")),
        || format!("{:#?}", lines()),
    );
    let entry = lines().into_iter().find(|l| l.contains("MAILPOLICY_EVENT=reloaded")).unwrap_or_default();
    let fields: Vec<&str> = entry.lines().collect();
    assert!(fields.first().is_some_and(|f| f.starts_with("MESSAGE=reloaded ")), "{entry}");
    for f in ["PRIORITY=5", "SYSLOG_FACILITY=2", "SYSLOG_IDENTIFIER=mailpolicy", &format!("SYSLOG_PID={pid}")] {
        assert!(fields.contains(&f), "{f} in {entry}");
    }
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    d.kill9();
}
