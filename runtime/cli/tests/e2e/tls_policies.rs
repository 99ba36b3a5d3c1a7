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
