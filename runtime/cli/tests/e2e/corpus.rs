//! Issue 20: every real message survives (the corpus and poison messages through the daemon).

use super::*;

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

/// unbound with the corpus's DKIM/ARC key records; every other name is NXDOMAIN at once.
fn corpus_dns() -> Unbound {
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
    Unbound::start(&["."], &refs, &[])
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
    let dns = corpus_dns();
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
