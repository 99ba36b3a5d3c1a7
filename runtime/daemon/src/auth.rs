//! Sender authentication with the mail-auth crate (R25, B7): SPF at MAIL, DKIM and DMARC
//! on the message, an `Authentication-Results` header on accepted mail, and DKIM signing
//! of mail our own users send (`server { dkim_key; dkim_selector; dkim_domain; }`).
//!
//! Results are computed once per transaction, when the policy first reads `spf`, `dkim`,
//! `dmarc` or `dmarc.policy`, and only then: a policy that never asks pays no DNS query.

use std::net::IpAddr;
use std::time::Duration;

use base64::Engine as _;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{DkimSigner, Done};
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{AuthenticatedMessage, DkimResult, DmarcResult, MessageAuthenticator, SpfOutput, SpfResult};
use mailpolicy_engine::conn::{ContentReport, MethodReport};
use mailpolicy_lang::ir::Program;

/// The DNS client of sender authentication. Every query obeys the policy's `dns_timeout`
/// (a UDP answer that comes back truncated is asked again over TCP), and each check as a
/// whole (SPF; DKIM with DMARC) obeys `lookup_timeout`: past it the result is `temperror`
/// and the session goes on.
pub struct SenderAuth {
    auth: MessageAuthenticator,
    hostname: String,
    lookup_timeout: Duration,
}

/// What one transaction has learnt so far: the SPF result DMARC is computed over. The
/// engine asks each check once per transaction and drops this when its transaction
/// number changes (`AuthQuery::transaction`).
#[derive(Default)]
pub struct AuthState {
    pub spf: Option<SpfOutput>,
}

pub fn spf_word(r: SpfResult) -> &'static str {
    match r {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    }
}

/// A DKIM result as the engine's report of it: the word and the error's text.
fn dkim_report(r: &DkimResult) -> MethodReport {
    let (word, err) = match r {
        DkimResult::Pass => ("pass", None),
        DkimResult::Neutral(e) => ("neutral", Some(e)),
        DkimResult::Fail(e) => ("fail", Some(e)),
        DkimResult::PermError(e) => ("permerror", Some(e)),
        DkimResult::TempError(e) => ("temperror", Some(e)),
        DkimResult::None => ("none", None),
    };
    MethodReport { result: word.into(), reason: err.map(|e| e.to_string().to_ascii_lowercase()), props: Vec::new() }
}

fn timed_out(word: &str) -> MethodReport {
    MethodReport { result: word.into(), reason: Some("time-out".into()), props: Vec::new() }
}

impl SenderAuth {
    /// Sender authentication through the daemon's resolver (one cache for every DNS client).
    pub fn new(prog: &Program, hostname: &str, resolver: hickory_resolver::TokioResolver) -> SenderAuth {
        let auth = MessageAuthenticator(resolver);
        SenderAuth { auth, hostname: hostname.to_string(), lookup_timeout: prog.server.lookup_timeout }
    }

    pub async fn spf(&self, st: &mut AuthState, ip: IpAddr, helo: &str, sender: &str) -> &'static str {
        if st.spf.is_none() {
            let check = async {
                if sender.is_empty() {
                    // The null sender: check the HELO identity (RFC 7208 2.3).
                    self.auth.verify_spf(SpfParameters::verify_ehlo(ip, helo, &self.hostname)).await
                } else {
                    self.auth.verify_spf(SpfParameters::verify_mail_from(ip, helo, &self.hostname, sender)).await
                }
            };
            let out = match tokio::time::timeout(self.lookup_timeout, check).await {
                Ok(out) => out,
                Err(_) => {
                    let domain = sender.rsplit_once('@').map(|(_, d)| d).unwrap_or(helo);
                    SpfOutput::new(domain.to_string()).with_result(SpfResult::TempError)
                }
            };
            st.spf = Some(out);
        }
        st.spf.as_ref().map(|o| spf_word(o.result())).unwrap_or("none")
    }

    /// DKIM and DMARC over the message (and SPF, which DMARC needs), as the engine's
    /// report: the engine derives the words the policy reads and writes the
    /// Authentication-Results field from it.
    pub async fn content(
        &self,
        st: &mut AuthState,
        ip: IpAddr,
        helo: &str,
        sender: &str,
        message: &[u8],
    ) -> ContentReport {
        self.spf(st, ip, helo, sender).await;
        // A parser panic on a hostile message is that message's problem, not the session's.
        let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| AuthenticatedMessage::parse(message)))
            .ok()
            .flatten();
        let Some(msg) = parsed else {
            return ContentReport {
                dkim: vec![MethodReport::word("permerror")],
                dmarc: MethodReport::word("permerror"),
                dmarc_policy: String::new(),
            };
        };
        let Some(spf) = st.spf.clone() else {
            return ContentReport {
                dkim: vec![MethodReport::word("temperror")],
                dmarc: MethodReport::word("temperror"),
                dmarc_policy: String::new(),
            };
        };
        // One deadline for DKIM and DMARC together: `lookup_timeout` from now.
        let deadline = tokio::time::Instant::now() + self.lookup_timeout;
        let Ok(dkim) = tokio::time::timeout_at(deadline, self.auth.verify_dkim(&msg)).await else {
            return ContentReport {
                dkim: vec![timed_out("temperror")],
                dmarc: timed_out("temperror"),
                dmarc_policy: String::new(),
            };
        };
        let reports: Vec<MethodReport> = dkim
            .iter()
            .map(|d| {
                let mut r = dkim_report(d.result());
                if let Some(sig) = d.signature() {
                    if sig.i.is_empty() {
                        r.props.push(("header.d".into(), sig.d.clone()));
                    } else {
                        r.props.push(("header.i".into(), sig.i.clone()));
                    }
                    r.props.push(("header.s".into(), sig.s.clone()));
                    if let Some(b) = sig.b.get(..6) {
                        r.props.push(("header.b".into(), base64::engine::general_purpose::STANDARD.encode(b)));
                    }
                }
                r
            })
            .collect();
        let mail_from_domain = sender.rsplit_once('@').map(|(_, d)| d.to_string()).unwrap_or_else(|| helo.to_string());
        let params = DmarcParameters::new(&msg, &dkim, &mail_from_domain, &spf);
        let Ok(dmarc) = tokio::time::timeout_at(deadline, self.auth.verify_dmarc(params)).await else {
            return ContentReport { dkim: reports, dmarc: timed_out("temperror"), dmarc_policy: String::new() };
        };
        // RFC 7489: with a published record, DMARC passes when an aligned identifier
        // passes and fails otherwise; without one there is no result.
        let record = dmarc.policy() != mail_auth::dmarc::Policy::Unspecified;
        let parts = [dmarc.dkim_result(), dmarc.spf_result()];
        let dmarc_w = if parts.iter().any(|r| matches!(r, DmarcResult::Pass)) {
            "pass"
        } else if parts.iter().any(|r| matches!(r, DmarcResult::TempError(_))) {
            "temperror"
        } else if parts.iter().any(|r| matches!(r, DmarcResult::PermError(_))) {
            "permerror"
        } else if record || parts.iter().any(|r| matches!(r, DmarcResult::Fail(_))) {
            "fail"
        } else {
            "none"
        };
        let policy = match dmarc.policy() {
            mail_auth::dmarc::Policy::None => "none",
            mail_auth::dmarc::Policy::Quarantine => "quarantine",
            mail_auth::dmarc::Policy::Reject => "reject",
            mail_auth::dmarc::Policy::Unspecified => "",
        };
        let mut d = MethodReport::word(dmarc_w);
        if !dmarc.domain().is_empty() {
            d.props.push(("header.from".into(), dmarc.domain().to_string()));
        }
        ContentReport { dkim: reports, dmarc: d, dmarc_policy: policy.to_string() }
    }
}

/// `mailc test`'s DKIM signer ([`mailpolicy_engine::transcript::run::DkimSign`]): the
/// daemon's own, so a transcript shows the signature the daemon adds.
pub fn transcript_dkim(
    prog: &Program,
    secrets: &dyn Fn(&str) -> Option<String>,
    message: &[u8],
    domain: &str,
) -> Result<String, mailpolicy_engine::transcript::run::DkimError> {
    use mailpolicy_engine::transcript::run::DkimError;
    match Signer::from_program(prog, secrets).map_err(DkimError::Key)? {
        Some(signer) => signer.sign(message, domain).map_err(DkimError::Sign),
        None => Err(DkimError::Key("the server has no dkim_key and dkim_selector".into())),
    }
}

/// DKIM signing of outgoing mail (B7): the key is a PEM PKCS#8 private key, RSA or Ed25519.
pub struct Signer {
    /// The signing domain (d=); None: the envelope sender's domain.
    pub domain: Option<String>,
    selector: String,
    /// The PKCS#8 key, parsed into one signer per signing domain on first use.
    der: Vec<u8>,
    built: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<Built>>>,
}

enum Built {
    Rsa(DkimSigner<RsaKey<Sha256>, Done>),
    Ed25519(DkimSigner<Ed25519Key, Done>),
}

const SIGNED_HEADERS: [&str; 8] = ["From", "To", "Cc", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type"];

/// What a mailing list copy's signature covers besides [`SIGNED_HEADERS`]: the fields the
/// list adds, List-Unsubscribe and List-Unsubscribe-Post among them (RFC 8058 section 4).
const LIST_SIGNED_HEADERS: [&str; 12] = [
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-Subscribe",
];

impl Signer {
    /// From the server settings; None when DKIM signing is not configured.
    pub fn from_program(prog: &Program, secrets: &dyn Fn(&str) -> Option<String>) -> Result<Option<Signer>, String> {
        let (Some(id), Some(sel)) = (prog.server.dkim_key, &prog.server.dkim_selector) else {
            return Ok(None);
        };
        let name = prog.secrets.get(id.index()).map(|s| s.name.clone()).unwrap_or_default();
        let pem = secrets(&name).ok_or_else(|| format!("dkim_key: secret {name} has no value"))?;
        let domain = prog.server.dkim_domain.as_ref().map(|d| d.to_ascii_lowercase());
        let der = pkcs8(&pem)?;
        // Refuse a key that is neither RSA nor Ed25519 at start-up, not at the first message.
        parse_key(&der)?;
        Ok(Some(Signer { domain, selector: sel.clone(), der, built: Default::default() }))
    }

    /// `DKIM-Signature: ...\r\n` for the message, `d=domain` (the engine chose it:
    /// `conn::Sign`).
    pub fn sign(&self, message: &[u8], domain: &str) -> Result<String, String> {
        self.sign_with(message, domain, &SIGNED_HEADERS, "")
    }

    /// The signature of a mailing list copy of `list_domain` (spec/language.md 4.9), made
    /// after the list's header fields were added and covering them; None when the signer is
    /// not for that domain.
    pub fn sign_list(&self, message: &[u8], list_domain: &str) -> Result<Option<String>, String> {
        if !self.covers(&format!("list@{list_domain}")) {
            return Ok(None);
        }
        let domain = self.domain.clone().unwrap_or_else(|| list_domain.to_ascii_lowercase());
        self.sign_with(message, &domain, &LIST_SIGNED_HEADERS, "list:").map(Some)
    }

    fn sign_with(&self, message: &[u8], domain: &str, headers: &[&str], kind: &str) -> Result<String, String> {
        let built = {
            let mut cache = self.built.lock().map_err(|_| "signer cache poisoned".to_string())?;
            let key = format!("{kind}{domain}");
            match cache.get(&key) {
                Some(b) => b.clone(),
                None => {
                    let h = headers.to_vec();
                    let b = std::sync::Arc::new(match parse_key(&self.der)? {
                        RawKey::Rsa(k) => {
                            Built::Rsa(DkimSigner::from_key(k).domain(domain).selector(&self.selector).headers(h))
                        }
                        RawKey::Ed25519(k) => {
                            Built::Ed25519(DkimSigner::from_key(k).domain(domain).selector(&self.selector).headers(h))
                        }
                    });
                    cache.insert(key, b.clone());
                    b
                }
            }
        };
        let sig = match &*built {
            Built::Rsa(s) => s.sign(message),
            Built::Ed25519(s) => s.sign(message),
        };
        sig.map(|s| s.to_header()).map_err(|e| e.to_string())
    }

    /// Sign mail whose envelope sender is in the signing domain or below it (any sender
    /// with a domain when no `dkim_domain` is set).
    pub fn covers(&self, sender: &str) -> bool {
        mailpolicy_engine::conn::dkim_domain_for(self.domain.as_deref(), sender).is_some()
    }
}

enum RawKey {
    Rsa(RsaKey<Sha256>),
    Ed25519(Ed25519Key),
}

fn pkcs8(pem: &str) -> Result<Vec<u8>, String> {
    let der = rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| format!("dkim_key: {e}"))?
        .ok_or("dkim_key: no PEM private key")?;
    let rustls::pki_types::PrivateKeyDer::Pkcs8(p8) = der else {
        return Err("dkim_key: the key must be PKCS#8 (openssl pkcs8 -topk8 -nocrypt)".into());
    };
    Ok(p8.secret_pkcs8_der().to_vec())
}

fn parse_key(der: &[u8]) -> Result<RawKey, String> {
    if let Ok(k) = RsaKey::<Sha256>::from_pkcs8_der(der) {
        return Ok(RawKey::Rsa(k));
    }
    // Strict PKCS#8 v2 first; `openssl genpkey -algorithm ed25519` writes v1 (no public key).
    Ed25519Key::from_pkcs8_der(der)
        .or_else(|_| Ed25519Key::from_pkcs8_maybe_unchecked_der(der))
        .map(RawKey::Ed25519)
        .map_err(|e| format!("dkim_key: neither RSA nor Ed25519: {e}"))
}
#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 20.6: a name server that never answers costs at most `lookup_timeout` per
    /// check, and the result is temperror.
    #[tokio::test]
    async fn an_unanswered_query_ends_at_the_lookup_timeout() {
        // A UDP socket and a TCP listener that take queries and never answer.
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        let _tcp = std::net::TcpListener::bind(("127.0.0.1", port)).ok();
        let policy = format!("require [\"spf\", \"dkim\", \"dmarc\"];\nserver {{ dns_server \"127.0.0.1:{port}\"; dns_timeout 1s; lookup_timeout 2s; }}\non data {{ if spf :is \"fail\" or dkim :is \"fail\" or dmarc :is \"fail\" {{ reject; }} }}\n");
        let c = mailpolicy_lang::compile("p.mailpolicy", &mailpolicy_lang::MemLoader::single("p.mailpolicy", &policy));
        let prog = c.program.expect("policy compiles");
        let auth = SenderAuth::new(&prog, "mx.test", crate::transport::mx::policy_resolver(&prog).expect("resolver"));
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let mut st = AuthState::default();
        let start = std::time::Instant::now();
        let spf = auth.spf(&mut st, ip, "client.slow.test", "alice@slow.test").await;
        let spf_took = start.elapsed();
        let body = b"From: alice@slow.test\r\nSubject: s\r\n\r\nbody\r\n";
        let key = Ed25519Key::from_pkcs8_der(&Ed25519Key::generate_pkcs8().expect("key")).expect("key");
        let sig =
            DkimSigner::from_key(key).domain("slow.test").selector("sel").headers(["From"]).sign(body).expect("sign");
        let mut signed = sig.to_header().into_bytes();
        signed.extend_from_slice(body);
        let start = std::time::Instant::now();
        let c = auth.content(&mut st, ip, "client.slow.test", "alice@slow.test", &signed).await;
        let content_took = start.elapsed();
        let dkim = c.dkim.first().map(|d| d.result.as_str());
        assert_eq!((spf, dkim, c.dmarc.result.as_str()), ("temperror", Some("temperror"), "temperror"));
        // The bound under test is the policy's own: 2 s per check (plus scheduling slack),
        // where the library's defaults took 15 s.
        assert!(spf_took < std::time::Duration::from_secs(4), "SPF took {spf_took:?}");
        assert!(content_took < std::time::Duration::from_secs(4), "DKIM and DMARC took {content_took:?}");
        drop(udp);
    }
}
