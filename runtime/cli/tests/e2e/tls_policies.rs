//! Outbound TLS policies (issue 17): `:tls dane` against an unbound that validates a zone
//! signed in the test (ldns-signzone), `:tls sts` against policy hosts served by
//! `openssl s_server -WWW`, and the TLS-RPT report that comes of them, received by smtp-sink.

use super::*;
use mailpolicy_test_support::SignedZone;

/// The test CA and one certificate it signed for every name the tests' next hop answers
/// for (`hop.pem`, `hop.key`, `hop-chain.pem` with the CA appended for DANE-TA), made with
/// openssl in `dir`; returns the SHA-256 of the hop's SubjectPublicKeyInfo and of the CA
/// certificate, in hex, as TLSA `3 1 1` and `2 0 1` records write them.
fn certificates(dir: &Path, names: &[&str]) -> (String, String) {
    let sh = |script: &str| {
        let (st, out, err) =
            run_bounded(Command::new("sh").arg("-c").arg(script).current_dir(dir), Duration::from_secs(60));
        assert!(st.success(), "{script}: {out}{err}");
        out
    };
    let sans: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).chain(["IP:127.0.0.2".to_string()]).collect();
    std::fs::write(dir.join("hop.ext"), format!("subjectAltName={}\nextendedKeyUsage=serverAuth\n", sans.join(",")))
        .expect("ext");
    sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj '/CN=tls policies test CA' 2>&1");
    sh("openssl req -newkey rsa:2048 -nodes -keyout hop.key -out hop.csr -subj '/CN=hop' 2>&1");
    sh("openssl x509 -req -in hop.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out hop.pem -days 2 -extfile hop.ext 2>&1");
    sh("cat hop.pem ca.pem > hop-chain.pem");
    let hex = |s: String| s.rsplit('=').next().unwrap_or_default().trim().to_string();
    let spki =
        hex(sh("openssl x509 -in hop.pem -noout -pubkey | openssl pkey -pubin -outform DER | openssl dgst -sha256"));
    let ca = hex(sh("openssl x509 -in ca.pem -outform DER | openssl dgst -sha256"));
    assert_eq!((spki.len(), ca.len()), (64, 64), "{spki} {ca}");
    (spki, ca)
}

/// The next hop: a second daemon on 127.0.0.2:`port` (127.0.0.1 is the sender's own
/// address, which MX delivery refuses as a loop), STARTTLS with `hop-chain.pem`, every
/// recipient to a Maildir under `dir/mail`.
fn tls_hop(dir: &Path, certs: &Path, port: u16, domains: &[&str]) -> Daemon {
    std::fs::create_dir_all(dir).expect("hop dir");
    let list = domains.iter().map(|d| format!("\"{d}\"")).collect::<Vec<_>>().join(", ");
    let policy = format!(
        "list local = domains [{list}];\n\
         server {{ hostname \"hop.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; }}\n\
         listener smtp {{ address \"127.0.0.2:{port}\"; cert \"{}\"; key \"{}\"; }}\n\
         route {{ deliver maildir; }}\n",
        certs.join("hop-chain.pem").display(),
        certs.join("hop.key").display()
    );
    let d = Daemon::start(dir, &policy, &[]);
    wait_for(
        Duration::from_secs(30),
        "the next hop on 127.0.0.2",
        || TcpStream::connect(("127.0.0.2", port)).is_ok(),
        || d.log(),
    );
    d
}

/// The sender: local domain s.test, DNS from `dns`, `route` as given, fast retries.
fn tls_sender(port: u16, dns: u16, extra_server: &str, route: &str) -> String {
    format!(
        "list local = domains [\"s.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; retry_min 1s; retry_max 2s; queue_run 1s; dns_server \"127.0.0.1:{dns}\"; {extra_server} }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         route {{\n  if recipient.domain in local {{ deliver maildir; }}\n{route}\n}}\n"
    )
}

fn send(port: u16, to: &str) {
    let out = swaks(port, &["--from", "a@s.test", "--to", to, "--header", &format!("Subject: tlsp-{to}")]);
    assert!(out.contains("Queued as"), "{out}");
}

/// The daemon's delivery event for `to` with `status`, once it is logged.
fn delivery_line(d: &Daemon, hop: &Daemon, to: &str, status: &str) -> String {
    let want = |l: &&str| l.contains("delivery") && l.contains(&format!("to={to}")) && l.contains(status);
    wait_for(
        Duration::from_secs(60),
        &format!("{to} {status}"),
        || d.log().lines().any(|l| want(&l)),
        || format!("{}\n--- hop ---\n{}", d.log(), hop.log()),
    );
    d.log().lines().find(want).unwrap_or_default().to_string()
}

/// RFC 7672 through a validating resolver. dane.test is signed in the test and unbound has
/// its key as trust anchor; plain.test is not signed. Against a next hop whose certificate
/// the records describe or not:
/// - DANE-EE `3 1 1` of the hop's key: delivered, `tls_policy=dane`;
/// - DANE-TA `2 0 1` of the CA, the hop sending its chain with the CA and a name the MX host
///   has: delivered; the same CA for an MX host the certificate does not name: deferred;
/// - a `3 1 1` that matches nothing: deferred, never sent in clear or unverified;
/// - a TLSA RRset changed after signing (bogus, SERVFAIL from unbound): deferred;
/// - `0 1 1` only (PKIX-TA, unusable for SMTP): mandatory TLS without authentication,
///   delivered as `dane-unauthenticated`;
/// - plain.test, its (insecure) TLSA record matching nothing: ignored, delivered as `may`.
#[test]
fn dane_tlsa_records_from_a_validating_resolver_decide_the_next_hop() {
    let t = TempDir::new("dane-out");
    let names = ["mx.dane.test", "mxta.dane.test", "mxwrong.dane.test", "mxbogus.dane.test", "mxpkix.dane.test"];
    let (spki, ca) = certificates(t.path(), &names);
    let (port, hop_port) = (free_port(), free_port());
    let zero = "0".repeat(64);
    let bad = "1234".repeat(16);
    let zone = format!(
        "$ORIGIN dane.test.\n$TTL 300\n\
         @ SOA ns.dane.test. hostmaster.dane.test. 1 3600 600 86400 300\n\
         @ NS ns.dane.test.\nns A 127.0.0.1\n\
         @ MX 10 mx.dane.test.\nmx A 127.0.0.2\n_{hop_port}._tcp.mx TLSA 3 1 1 {spki}\n\
         ta MX 10 mxta.dane.test.\nmxta A 127.0.0.2\n_{hop_port}._tcp.mxta TLSA 2 0 1 {ca}\n\
         taname MX 10 mxother.dane.test.\nmxother A 127.0.0.2\n_{hop_port}._tcp.mxother TLSA 2 0 1 {ca}\n\
         wrong MX 10 mxwrong.dane.test.\nmxwrong A 127.0.0.2\n_{hop_port}._tcp.mxwrong TLSA 3 1 1 {zero}\n\
         bogus MX 10 mxbogus.dane.test.\nmxbogus A 127.0.0.2\n_{hop_port}._tcp.mxbogus TLSA 3 1 1 {bad}\n\
         pkix MX 10 mxpkix.dane.test.\nmxpkix A 127.0.0.2\n_{hop_port}._tcp.mxpkix TLSA 0 1 1 {zero}\n"
    );
    let signed = SignedZone::sign(&t.join("zones"), "dane.test.", &zone);
    signed.tamper(&bad, &"5678".repeat(16));
    let plain = t.join("zones/plain.test.zone");
    std::fs::write(
        &plain,
        format!(
            "$ORIGIN plain.test.\n$TTL 300\n@ SOA ns.plain.test. hostmaster.plain.test. 1 3600 600 86400 300\n\
             @ NS ns.plain.test.\nns A 127.0.0.1\n@ MX 10 mx.plain.test.\nmx A 127.0.0.2\n_{hop_port}._tcp.mx TLSA 3 1 1 {zero}\n"
        ),
    )
    .expect("plain zone");
    let ub = Unbound::start_with(
        &["test."],
        &[],
        &[],
        &[("dane.test.", &signed.file), ("plain.test.", &plain)],
        &[&signed.trust_anchor],
    );
    let domains = [
        "dane.test",
        "ta.dane.test",
        "taname.dane.test",
        "wrong.dane.test",
        "bogus.dane.test",
        "pkix.dane.test",
        "plain.test",
    ];
    let hop = tls_hop(&t.join("hop"), t.path(), hop_port, &domains);
    // `deliver smtp "DOMAIN:PORT"` looks up the domain's MX, and connects to PORT: its TLSA
    // records are `_PORT._tcp.MXHOST`
    let route = format!("  deliver smtp \"${{recipient.domain}}:{hop_port}\" :tls dane;");
    let d = Daemon::start(t.path(), &tls_sender(port, ub.port, "", &route), &[port]);
    let rcpts = [
        ("ee@dane.test", "sent"),
        ("ta@ta.dane.test", "sent"),
        ("taname@taname.dane.test", "deferred"),
        ("wrong@wrong.dane.test", "deferred"),
        ("bogus@bogus.dane.test", "deferred"),
        ("pkix@pkix.dane.test", "sent"),
        ("plain@plain.test", "sent"),
    ];
    for (to, _) in rcpts {
        send(port, to);
    }
    for (to, status) in rcpts {
        let line = delivery_line(&d, &hop, to, &format!("status={status}"));
        let policy = match to {
            "pkix@pkix.dane.test" => "tls_policy=dane-unauthenticated",
            "plain@plain.test" => "tls_policy=may",
            _ if status == "sent" => "tls_policy=dane",
            _ => "",
        };
        assert!(line.contains(policy), "{to}: {line}");
        if status == "sent" {
            assert!(line.contains("tls=yes"), "{to}: {line}");
        }
    }
    let log = d.log();
    let reason = |to: &str| {
        log.lines().find(|l| l.contains(&format!("to={to}")) && l.contains("status=deferred")).unwrap_or_default()
    };
    assert!(reason("wrong@wrong.dane.test").contains("no TLSA record matches"), "{log}");
    assert!(reason("taname@taname.dane.test").contains("DANE-TA chain does not verify"), "{log}");
    assert!(reason("bogus@bogus.dane.test").contains("TLSA lookup"), "{log}");
    for (to, status) in rcpts {
        let dir = hop.dir.join("mail").join(to.split('@').next().unwrap_or_default());
        if status == "sent" {
            wait_for(Duration::from_secs(30), &format!("{to} at the hop"), || maildir(&dir).len() == 1, || hop.log());
        } else {
            assert!(maildir(&dir).is_empty(), "{to} reached the hop");
        }
    }
}

/// An MTA-STS policy host: `openssl s_server -WWW` on `ip`:`port` serving `policy` as
/// `/.well-known/mta-sts.txt` with the test's certificate; stopped on drop.
fn policy_host(dir: &Path, certs: &Path, ip: &str, port: u16, policy: &str) -> mailpolicy_test_support::Peer {
    need("/usr/bin/openssl", "openssl");
    std::fs::create_dir_all(dir.join(".well-known")).expect("www dir");
    std::fs::write(dir.join(".well-known/mta-sts.txt"), policy).expect("policy file");
    let child = Command::new("openssl")
        .args(["s_server", "-WWW", "-quiet", "-accept", &format!("{ip}:{port}")])
        .arg("-cert")
        .arg(certs.join("hop-chain.pem"))
        .arg("-key")
        .arg(certs.join("hop.key"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let peer = mailpolicy_test_support::Peer(child);
    wait_for(
        Duration::from_secs(15),
        &format!("the policy host on {ip}:{port}"),
        || TcpStream::connect((ip, port)).is_ok(),
        String::new,
    );
    peer
}

/// RFC 8461 and RFC 8460. Three recipient domains publish `_mta-sts` TXT records and
/// policies served over HTTPS on loopback (`mta_sts_port`, certificates of the test's CA
/// trusted through `mta_sts_ca` and `tls_ca`):
/// - sts.test, `enforce` naming its MX host: delivered, `tls_policy=sts enforce`, the
///   policy cached in the spool;
/// - stsbad.test, `enforce` naming other hosts: deferred, nothing sent;
/// - ststest.test, `testing` naming other hosts: delivered as `sts testing`, and reported;
/// - nosts.test publishes nothing: `may`.
///
/// Then the TLS-RPT report (`tls_report_interval 3s`) of sts.test and ststest.test arrives
/// at the `rua=mailto:` of their `_smtp._tls` records (smtp-sink): gzipped JSON with one
/// success for sts.test and a `validation-failure` for ststest.test.
#[test]
fn mta_sts_policies_over_https_enforce_or_test_and_tls_rpt_reports_them() {
    let t = TempDir::new("sts-out");
    let names = [
        "mx.sts.test",
        "mx.stsbad.test",
        "mx.ststest.test",
        "mx.nosts.test",
        "mta-sts.sts.test",
        "mta-sts.stsbad.test",
        "mta-sts.ststest.test",
    ];
    certificates(t.path(), &names);
    let (port, hop_port, https_port, sink_port) = (free_port(), free_port(), free_port(), free_port());
    let policy = |mode: &str, mx: &str| format!("version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n");
    let _hosts = [
        policy_host(&t.join("www1"), t.path(), "127.0.0.3", https_port, &policy("enforce", "mx.sts.test")),
        policy_host(&t.join("www2"), t.path(), "127.0.0.4", https_port, &policy("enforce", "*.elsewhere.test")),
        policy_host(&t.join("www3"), t.path(), "127.0.0.5", https_port, &policy("testing", "mx.other.test")),
    ];
    let mut records = vec![
        "mta-sts.sts.test. A 127.0.0.3".to_string(),
        "mta-sts.stsbad.test. A 127.0.0.4".to_string(),
        "mta-sts.ststest.test. A 127.0.0.5".to_string(),
        "_smtp._tls.sts.test. TXT \"v=TLSRPTv1; rua=mailto:reports@rpt.test\"".to_string(),
        "_smtp._tls.ststest.test. TXT \"v=TLSRPTv1; rua=mailto:reports@rpt.test\"".to_string(),
    ];
    for d in ["sts", "stsbad", "ststest", "nosts"] {
        records.push(format!("{d}.test. MX 10 mx.{d}.test."));
        records.push(format!("mx.{d}.test. A 127.0.0.2"));
        if d != "nosts" {
            records.push(format!("_mta-sts.{d}.test. TXT \"v=STSv1; id=20261201\""));
        }
    }
    let records: Vec<&str> = records.iter().map(String::as_str).collect();
    let ub = Unbound::start(&["test."], &records, &[]);
    let hop = tls_hop(&t.join("hop"), t.path(), hop_port, &["sts.test", "stsbad.test", "ststest.test", "nosts.test"]);
    let sink = Sink::start(&t.join("sink"), sink_port, &[]);
    let ca = t.join("ca.pem").display().to_string();
    let extra = format!(
        "mta_sts_port {https_port}; mta_sts_ca \"{ca}\"; tls_ca \"{ca}\"; tls_report_interval 3s; tls_report_org \"mx.test\";"
    );
    let route = format!(
        "  if recipient.domain :is \"rpt.test\" {{ deliver smtp \"[127.0.0.1]:{sink_port}\"; }}\n  \
         deliver smtp \"${{recipient.domain}}:{hop_port}\" :tls sts;"
    );
    let d = Daemon::start(t.path(), &tls_sender(port, ub.port, &extra, &route), &[port]);
    let rcpts = [
        ("enforced@sts.test", "status=sent", "tls_policy=\"sts enforce\""),
        ("refused@stsbad.test", "status=deferred", "does not match the MTA-STS policy of stsbad.test"),
        ("tested@ststest.test", "status=sent", "tls_policy=\"sts testing\""),
        ("none@nosts.test", "status=sent", "tls_policy=may"),
    ];
    for (to, _, _) in rcpts {
        send(port, to);
    }
    for (to, status, what) in rcpts {
        let line = delivery_line(&d, &hop, to, status);
        assert!(line.contains(what), "{to}: {line}");
    }
    let cached = std::fs::read_to_string(d.spool().join("sts/sts.test")).expect("the cached policy of sts.test");
    assert!(cached.contains("20261201") && cached.contains("mx.sts.test"), "{cached}");
    assert!(
        maildir(&hop.dir.join("mail/refused")).is_empty(),
        "stsbad.test's message reached an MX host it does not name"
    );
    // The reports: one mail per domain at the rua address.
    wait_for(
        Duration::from_secs(60),
        "TLS-RPT reports for sts.test and ststest.test at the sink",
        || {
            let m = sink.messages();
            ["TLS-Report-Domain: sts.test", "TLS-Report-Domain: ststest.test"]
                .iter()
                .all(|h| m.iter().any(|x| x.contains(h)))
        },
        || d.log(),
    );
    let reports: Vec<(String, String)> = sink
        .messages()
        .iter()
        .filter(|m| m.contains("report-type=\"tlsrpt\""))
        .map(|m| {
            let domain =
                m.lines().find_map(|l| l.strip_prefix("TLS-Report-Domain: ")).unwrap_or_default().trim().to_string();
            (domain, report_json(m))
        })
        .collect();
    let json = |domain: &str| reports.iter().find(|(d, _)| d == domain).map(|(_, j)| j.clone()).unwrap_or_default();
    let sts = json("sts.test");
    assert!(sts.contains("\"policy-type\": \"sts\"") && sts.contains("\"total-successful-session-count\": 1"), "{sts}");
    assert!(sts.contains("\"total-failure-session-count\": 0") && sts.contains("mode: enforce"), "{sts}");
    let testing = json("ststest.test");
    assert!(testing.contains("\"result-type\": \"validation-failure\""), "{testing}");
    assert!(testing.contains("\"receiving-mx-hostname\": \"mx.ststest.test\""), "{testing}");
    assert!(testing.contains("\"total-failure-session-count\": 1"), "{testing}");
    assert!(!reports.iter().any(|(d, _)| d == "nosts.test" || d == "stsbad.test"), "only domains with a TLSRPT record");
}

/// The JSON of a TLS-RPT mail: its `application/tlsrpt+gzip` part, base64-decoded and
/// gunzipped by gzip(1).
fn report_json(mail: &str) -> String {
    use base64::Engine;
    let part = mail.split("Content-Type: application/tlsrpt+gzip").nth(1).expect("the report part");
    let body = part.split("\n\n").nth(1).or_else(|| part.split("\r\n\r\n").nth(1)).unwrap_or_default();
    let b64: String = body.lines().take_while(|l| !l.starts_with("--")).collect::<String>().replace(['\r', ' '], "");
    let gz = base64::engine::general_purpose::STANDARD.decode(b64).expect("base64");
    let mut child = Command::new("gzip").arg("-dc").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("gzip");
    child.stdin.take().expect("stdin").write_all(&gz).expect("write");
    let out = child.wait_with_output().expect("gzip output");
    assert!(out.status.success(), "gzip -dc failed");
    String::from_utf8(out.stdout).expect("utf-8 JSON")
}
