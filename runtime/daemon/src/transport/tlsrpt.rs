//! TLS-RPT (RFC 8460): the results of outbound sessions made under `:tls dane` and
//! `:tls sts`, recorded per policy domain, and the daily aggregate report.
//!
//! * [`Recorder::record`] appends one JSON line per session result (a success, or a failure
//!   with its RFC 8460 result type) to `SPOOL/tlsrpt/sessions.jsonl` (appends of one line,
//!   so concurrent deliveries never interleave, and results survive a restart).
//! * [`Recorder::take_reports`] (every `tls_report_interval`) moves that file aside, sums it
//!   per policy domain and policy into the report's JSON (section 4), and for each domain
//!   whose `_smtp._tls` TXT record (`v=TLSRPTv1; rua=...`) names a `mailto:` address makes
//!   the report mail (section 5.3: `multipart/report; report-type="tlsrpt"`, the report
//!   gzipped as `application/tlsrpt+gzip`) for the caller to queue; an `https:` address is
//!   sent the gzipped report by POST (section 5.4). A domain without the record gets none.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::dane::Tlsa;
use super::mx::{Hop, Resolver};
use super::sts::Policy;

/// The policy a session result counts under (the report's `policy` object).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReportPolicy {
    /// The policy domain (the recipient domain).
    pub domain: String,
    /// `sts`, `tlsa` or `no-policy-found`.
    pub kind: String,
    /// The policy file's lines, or the TLSA records.
    pub strings: Vec<String>,
    /// The MTA-STS `mx` patterns, or the DANE host.
    pub mx_host: Vec<String>,
}

impl ReportPolicy {
    /// An MTA-STS policy.
    pub fn sts(domain: &str, p: &Policy) -> ReportPolicy {
        ReportPolicy {
            domain: domain.to_string(),
            kind: "sts".into(),
            strings: super::security::policy_strings(p),
            mx_host: p.mx.clone(),
        }
    }

    /// DANE TLSA records of one host.
    pub fn tlsa(domain: &str, host: &str, records: &[Tlsa]) -> ReportPolicy {
        ReportPolicy {
            domain: domain.to_string(),
            kind: "tlsa".into(),
            strings: records.iter().map(Tlsa::text).collect(),
            mx_host: vec![host.trim_end_matches('.').to_string()],
        }
    }

    /// No policy.
    pub fn none(domain: &str) -> ReportPolicy {
        ReportPolicy { domain: domain.to_string(), kind: "no-policy-found".into(), strings: vec![], mx_host: vec![] }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Event {
    at: u64,
    policy: ReportPolicy,
    /// None: a successful session.
    #[serde(default)]
    result: Option<String>,
    #[serde(default)]
    mx: String,
    #[serde(default)]
    ip: String,
    #[serde(default)]
    reason: String,
}

/// Where session results go.
#[derive(Debug)]
pub struct Recorder {
    dir: PathBuf,
}

/// What a report run made: the mails to queue, and the outcome of each POST
/// (domain, URI, result) for the log.
#[derive(Clone, Debug, Default)]
pub struct ReportRun {
    pub mails: Vec<ReportMail>,
    pub posts: Vec<(String, String, Result<(), String>)>,
}

/// One report mail to queue: the recipient and the message.
#[derive(Clone, Debug)]
pub struct ReportMail {
    pub to: String,
    pub domain: String,
    pub data: Vec<u8>,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Maps a TLS handshake error to RFC 8460's result types (section 4.3).
pub fn result_type(error: &str) -> &'static str {
    let e = error.to_ascii_lowercase();
    if e.contains("starttls") || e.contains("does not offer") || e.contains("not offered") {
        "starttls-not-supported"
    } else if e.contains("expired") || e.contains("notvalidyet") || e.contains("not valid yet") {
        "certificate-expired"
    } else if e.contains("notvalidforname") || e.contains("not valid for name") || e.contains("name") {
        "certificate-host-mismatch"
    } else if e.contains("tlsa") || e.contains("dane") {
        "validation-failure"
    } else if e.contains("unknownissuer") || e.contains("unknown issuer") || e.contains("certificate") {
        "certificate-not-trusted"
    } else {
        "validation-failure"
    }
}

impl Recorder {
    /// Results under `dir` (`SPOOL/tlsrpt`).
    pub fn new(dir: PathBuf) -> Recorder {
        Recorder { dir }
    }

    fn file(&self) -> PathBuf {
        self.dir.join("sessions.jsonl")
    }

    /// Records one session result under `policy`: `Ok(hop)` a session that got the TLS the
    /// policy asks for, `Err((result_type, hop, reason))` one that did not.
    pub fn record(&self, policy: &ReportPolicy, result: Result<&Hop, (&str, &Hop, String)>) {
        let (result, hop, reason) = match result {
            Ok(h) => (None, h, String::new()),
            Err((t, h, r)) => (Some(t.to_string()), h, r),
        };
        let ev = Event {
            at: now_secs(),
            policy: policy.clone(),
            result,
            mx: hop.name.trim_end_matches('.').to_string(),
            ip: hop.addr.ip().to_string(),
            reason: reason.chars().take(200).collect(),
        };
        let Ok(mut line) = serde_json::to_vec(&ev) else { return };
        line.push(b'\n');
        let _ = std::fs::create_dir_all(&self.dir);
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(self.file()) {
            let _ = f.write_all(&line);
        }
    }

    /// Sums the results recorded since the last report into one report per domain, makes
    /// the mails for their `mailto:` addresses and POSTs to their `https:` ones.
    pub async fn take_reports(
        &self,
        resolver: &dyn Resolver,
        org: &str,
        contact: &str,
        https_roots: Arc<rustls::RootCertStore>,
        https_port: u16,
    ) -> ReportRun {
        let mut run = ReportRun::default();
        let sending = self.dir.join("sessions.sending");
        // A file left by a report run that was cut short is sent first.
        if !sending.exists() && std::fs::rename(self.file(), &sending).is_err() {
            return run;
        }
        let text = std::fs::read_to_string(&sending).unwrap_or_default();
        let _ = std::fs::remove_file(&sending);
        let events: Vec<Event> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        let mut by_domain: BTreeMap<String, Vec<Event>> = BTreeMap::new();
        for e in events {
            by_domain.entry(e.policy.domain.clone()).or_default().push(e);
        }
        for (domain, events) in by_domain {
            let Some(rua) = rua_of(resolver, &domain).await else { continue };
            let (json, report_id) = report_json(org, contact, &events);
            let gz = gzip(json.as_bytes());
            for uri in rua {
                if let Some(addr) = uri.strip_prefix("mailto:") {
                    let addr = addr.split('?').next().unwrap_or(addr).to_string();
                    if addr.contains('@') && !addr.contains(['\r', '\n', '<', '>', ' ']) {
                        let data = report_mail(org, contact, &domain, &report_id, &addr, &gz, events.first());
                        run.mails.push(ReportMail { to: addr, domain: domain.clone(), data });
                    }
                } else if uri.starts_with("https://") {
                    let r = post(&uri, &gz, https_roots.clone(), https_port, resolver).await;
                    run.posts.push((domain.clone(), uri, r));
                }
            }
        }
        run
    }
}

/// The `rua` URIs of `_smtp._tls.DOMAIN` (RFC 8460 section 3): exactly one `v=TLSRPTv1`
/// record.
async fn rua_of(resolver: &dyn Resolver, domain: &str) -> Option<Vec<String>> {
    let records = tokio::time::timeout(Duration::from_secs(10), resolver.txt(&format!("_smtp._tls.{domain}")))
        .await
        .ok()?
        .ok()?;
    let rpt: Vec<&String> = records.iter().filter(|r| r.starts_with("v=TLSRPTv1")).collect();
    let [one] = rpt.as_slice() else { return None };
    let rua = one.split(';').find_map(|f| f.trim().strip_prefix("rua=").map(str::to_string))?;
    let uris: Vec<String> = rua.split(',').map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect();
    (!uris.is_empty()).then_some(uris)
}

fn rfc3339(secs: u64) -> String {
    mailpolicy_engine::date::rfc3339(secs.saturating_mul(1000))
}

/// The report (RFC 8460 section 4.4) and its report-id.
fn report_json(org: &str, contact: &str, events: &[Event]) -> (String, String) {
    let start = events.iter().map(|e| e.at).min().unwrap_or(0);
    let end = events.iter().map(|e| e.at).max().unwrap_or(0).max(start + 1);
    let report_id = format!("{}.{}@{}", rfc3339(start), rand::random::<u32>(), org);
    let mut policies: BTreeMap<&ReportPolicy, (u64, u64, BTreeMap<(String, String, String, String), u64>)> =
        BTreeMap::new();
    for e in events {
        let p = policies.entry(&e.policy).or_default();
        match &e.result {
            None => p.0 += 1,
            Some(t) => {
                p.1 += 1;
                *p.2.entry((t.clone(), e.mx.clone(), e.ip.clone(), e.reason.clone())).or_default() += 1;
            }
        }
    }
    let policies: Vec<serde_json::Value> = policies
        .into_iter()
        .map(|(p, (ok, failed, details))| {
            let details: Vec<serde_json::Value> = details
                .into_iter()
                .map(|((t, mx, ip, reason), n)| {
                    serde_json::json!({
                        "result-type": t,
                        "receiving-mx-hostname": mx,
                        "receiving-ip": ip,
                        "failed-session-count": n,
                        "failure-reason-code": reason,
                    })
                })
                .collect();
            let mut policy = serde_json::json!({
                "policy-type": p.kind,
                "policy-domain": p.domain,
            });
            if !p.strings.is_empty() {
                policy["policy-string"] = serde_json::json!(p.strings);
            }
            if !p.mx_host.is_empty() {
                policy["mx-host"] = serde_json::json!(p.mx_host);
            }
            serde_json::json!({
                "policy": policy,
                "summary": {
                    "total-successful-session-count": ok,
                    "total-failure-session-count": failed,
                },
                "failure-details": details,
            })
        })
        .collect();
    let report = serde_json::json!({
        "organization-name": org,
        "date-range": { "start-datetime": rfc3339(start), "end-datetime": rfc3339(end) },
        "contact-info": contact,
        "report-id": report_id,
        "policies": policies,
    });
    (serde_json::to_string_pretty(&report).unwrap_or_default(), report_id)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let _ = e.write_all(data);
    e.finish().unwrap_or_default()
}

/// The report mail (RFC 8460 section 5.3).
fn report_mail(
    org: &str,
    from: &str,
    domain: &str,
    report_id: &str,
    to: &str,
    gz: &[u8],
    first: Option<&Event>,
) -> Vec<u8> {
    use base64::Engine;
    let now = now_secs();
    let start = first.map(|e| e.at).unwrap_or(now);
    let boundary = format!("tlsrpt-{:016x}", rand::random::<u64>());
    let b64 = base64::engine::general_purpose::STANDARD.encode(gz);
    let mut body = String::new();
    for chunk in b64.as_bytes().chunks(76) {
        body.push_str(&String::from_utf8_lossy(chunk));
        body.push_str("\r\n");
    }
    let file = format!("{org}!{domain}!{start}!{now}.json.gz");
    format!(
        "From: TLS reporting <{from}>\r\n\
         To: <{to}>\r\n\
         Date: {date}\r\n\
         Subject: Report Domain: {domain} Submitter: {org} Report-ID: <{report_id}>\r\n\
         Message-ID: <{id}@{org}>\r\n\
         TLS-Report-Domain: {domain}\r\n\
         TLS-Report-Submitter: {org}\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=\"tlsrpt\"; boundary=\"{boundary}\"\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         This is an aggregate TLS report (RFC 8460) from {org} for {domain}.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: application/tlsrpt+gzip\r\n\
         Content-Transfer-Encoding: base64\r\n\
         Content-Disposition: attachment; filename=\"{file}\"\r\n\
         \r\n\
         {body}\
         --{boundary}--\r\n",
        date = mailpolicy_engine::date::rfc2822(now.saturating_mul(1000)),
        id = format!("{:016x}", rand::random::<u64>()),
    )
    .into_bytes()
}

/// POSTs the gzipped report to an `https:` rua (RFC 8460 section 5.4).
async fn post(
    uri: &str,
    gz: &[u8],
    roots: Arc<rustls::RootCertStore>,
    port: u16,
    resolver: &dyn Resolver,
) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = uri.strip_prefix("https://").ok_or("not https")?;
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, format!("/{p}")),
        None => (rest, "/".to_string()),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().map_err(|_| "bad port")?),
        None => (authority, port),
    };
    let ips = resolver.ips(host).await.map_err(|e| format!("{host}: {e:?}"))?;
    let ip = ips.first().ok_or("no address")?;
    let work = async {
        let tcp = tokio::net::TcpStream::connect((*ip, port)).await.map_err(|e| e.to_string())?;
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates((*roots).clone())
            .with_no_client_auth();
        let sn = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
        let mut s =
            tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(sn, tcp).await.map_err(|e| e.to_string())?;
        let head = format!(
            "POST {path} HTTP/1.0\r\nHost: {host}\r\nContent-Type: application/tlsrpt+gzip\r\nContent-Length: {}\r\n\r\n",
            gz.len()
        );
        s.write_all(head.as_bytes()).await.map_err(|e| e.to_string())?;
        s.write_all(gz).await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 1024];
        let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let _ = resp.parse(buf.get(..n).unwrap_or_default());
        match resp.code {
            Some(200..=299) => Ok(()),
            c => Err(format!("HTTP status {}", c.unwrap_or(0))),
        }
    };
    tokio::time::timeout(Duration::from_secs(30), work).await.map_err(|_| "timed out".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_sums_sessions_per_policy_with_rfc_8460_names() {
        let p = ReportPolicy {
            domain: "d.test".into(),
            kind: "sts".into(),
            strings: vec!["version: STSv1".into()],
            mx_host: vec!["mx.d.test".into()],
        };
        let ev = |result: Option<&str>| Event {
            at: 1_700_000_000,
            policy: p.clone(),
            result: result.map(str::to_string),
            mx: "mx.d.test".into(),
            ip: "192.0.2.1".into(),
            reason: String::new(),
        };
        let (json, id) = report_json(
            "org.test",
            "postmaster@org.test",
            &[ev(None), ev(None), ev(Some("certificate-host-mismatch"))],
        );
        let v: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert_eq!(v["report-id"], id.as_str());
        let pol = &v["policies"][0];
        assert_eq!(pol["policy"]["policy-type"], "sts");
        assert_eq!(pol["summary"]["total-successful-session-count"], 2);
        assert_eq!(pol["summary"]["total-failure-session-count"], 1);
        assert_eq!(pol["failure-details"][0]["result-type"], "certificate-host-mismatch");
        assert_eq!(v["date-range"]["start-datetime"], "2023-11-14T22:13:20Z");
        assert_eq!(result_type("invalid peer certificate: NotValidForName"), "certificate-host-mismatch");
        assert_eq!(result_type("invalid peer certificate: UnknownIssuer"), "certificate-not-trusted");
        assert_eq!(result_type("no TLSA record matches the certificate chain"), "validation-failure");
    }

    /// A report run: the recorded sessions of two domains, one asking for reports by mail
    /// and by HTTPS (a loopback server that checks the POST), one publishing no TLSRPT
    /// record (no report); the results file is consumed.
    #[tokio::test]
    async fn reports_go_to_mailto_and_https_rua_and_only_to_domains_that_ask() {
        use std::io::Read;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = mailpolicy_test_support::TempDir::new("tlsrpt");
        let (listener, port, acceptor, roots) = super::super::sts::tests::loopback_tls("rua.example.test").await;
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut s = acceptor.accept(tcp).await.expect("tls");
            let mut req = Vec::new();
            let mut b = [0u8; 4096];
            loop {
                let n = s.read(&mut b).await.expect("read");
                req.extend_from_slice(b.get(..n).unwrap_or_default());
                let text = String::from_utf8_lossy(&req).to_string();
                if let Some((head, _)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if req.len() >= head.len() + 4 + len || n == 0 {
                        break;
                    }
                }
            }
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\n").await;
            let _ = s.shutdown().await;
            req
        });
        let rec = Recorder::new(dir.join("tlsrpt"));
        let hop = Hop { name: "mx.a.test".into(), addr: "192.0.2.1:25".parse().expect("addr"), preference: Some(10) };
        let a = ReportPolicy::tlsa(
            "a.test",
            "mx.a.test",
            &[Tlsa { usage: 3, selector: 1, matching: 1, data: vec![0xab; 32] }],
        );
        rec.record(&a, Ok(&hop));
        rec.record(&a, Err(("validation-failure", &hop, "no TLSA record matches the certificate chain".into())));
        rec.record(&ReportPolicy::none("b.test"), Ok(&hop));
        let mut dns = super::super::mx::StaticResolver::new();
        dns.add_ip("rua.example.test", std::net::IpAddr::from([127, 0, 0, 1]));
        dns.add_txt(
            "_smtp._tls.a.test",
            &format!("v=TLSRPTv1; rua=mailto:tlsrpt@a.test,https://rua.example.test:{port}/report"),
        );
        let run = rec.take_reports(&dns, "sender.test", "postmaster@sender.test", roots, 443).await;
        assert!(matches!(run.posts.as_slice(), [(d, _, Ok(()))] if d == "a.test"), "{:?}", run.posts);
        let mails = run.mails;
        assert_eq!(mails.len(), 1, "one mail, for a.test only: {mails:?}");
        assert_eq!((mails[0].to.as_str(), mails[0].domain.as_str()), ("tlsrpt@a.test", "a.test"));
        let text = String::from_utf8_lossy(&mails[0].data).to_string();
        assert!(text.contains("TLS-Report-Domain: a.test\r\n") && text.contains("report-type=\"tlsrpt\""), "{text}");
        assert!(text.contains("Content-Type: application/tlsrpt+gzip"), "{text}");
        let req = server.await.expect("server");
        let split = req.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
        let head = String::from_utf8_lossy(&req[..split]).to_string();
        assert!(head.starts_with("POST /report ") && head.contains("Content-Type: application/tlsrpt+gzip"), "{head}");
        let mut json = String::new();
        flate2::read::GzDecoder::new(&req[split..]).read_to_string(&mut json).expect("gzip");
        let v: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert_eq!(v["organization-name"], "sender.test");
        assert_eq!(v["policies"][0]["policy"]["policy-type"], "tlsa");
        assert_eq!(v["policies"][0]["policy"]["policy-string"][0], format!("3 1 1 {}", "ab".repeat(32)));
        assert_eq!(v["policies"][0]["summary"]["total-failure-session-count"], 1);
        assert!(!dir.join("tlsrpt/sessions.jsonl").exists(), "the results were consumed");
        let again =
            rec.take_reports(&dns, "sender.test", "p@sender.test", Arc::new(rustls::RootCertStore::empty()), 443).await;
        assert!(again.mails.is_empty() && again.posts.is_empty(), "nothing new to report");
    }
}
