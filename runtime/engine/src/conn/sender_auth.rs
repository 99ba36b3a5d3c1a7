//! Sender authentication (SPF, DKIM, DMARC) as a connection sees it, and the seal of a
//! message (B7): what `Conn` asks the host ([`AuthQuery`]: the checks need DNS and
//! cryptography), what it keeps of the answers for the transaction (each check is asked
//! once per transaction, whatever the policy reads how often), the words the policy
//! reads, the `Authentication-Results` field (RFC 8601) written here from the host's
//! reports, and when the message is DKIM-signed and for which domain. Both hosts only
//! compute: the daemon with mail-auth, `mailc test` from its fixtures.

use std::net::IpAddr;

use mailpolicy_lang::ir::Program;

use super::{Conn, Need};
use crate::eval::{Answer, AuthCheck, Facts};

/// What [`Need::SenderAuth`] asks: one check for this transaction's client and sender.
/// Answer with [`Conn::sender_auth_checked`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthQuery {
    pub kind: AuthKind,
    /// The transaction the check belongs to: a host that keeps state between the checks
    /// of one transaction (the SPF result DMARC needs) drops it when this changes.
    pub transaction: u64,
    pub client_ip: IpAddr,
    pub helo: String,
    /// The envelope sender; empty for the null sender (SPF then checks the HELO name).
    pub sender: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthKind {
    /// SPF for the client address and the sender (or HELO name). Answer [`AuthReport::Spf`].
    Spf,
    /// DKIM and DMARC over the message being received ([`Conn::current_message`]); always
    /// asked after [`AuthKind::Spf`] in the same transaction. Answer [`AuthReport::Content`].
    Content,
}

/// The host's answer to an [`AuthQuery`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthReport {
    /// The SPF result word: pass, fail, softfail, neutral, none, temperror, permerror.
    Spf(String),
    Content(ContentReport),
}

/// DKIM and DMARC over one message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContentReport {
    /// One entry per DKIM signature verified (none: the message has no signature).
    pub dkim: Vec<MethodReport>,
    /// The DMARC result word (pass, fail, none, temperror, permerror), why, and the
    /// properties reported with it (`header.from`).
    pub dmarc: MethodReport,
    /// The published DMARC policy (none, quarantine, reject), empty without a record.
    pub dmarc_policy: String,
}

/// One method's result as `Authentication-Results` reports it: `RESULT (REASON) PROPS`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MethodReport {
    pub result: String,
    pub reason: Option<String>,
    /// `(ptype.property, value)`, e.g. `("header.d", "example.com")`.
    pub props: Vec<(String, String)>,
}

impl ContentReport {
    /// The `dkim` word the policy reads: any signature that passes wins; else the first
    /// one's result; none without a signature.
    pub fn dkim_word(&self) -> String {
        if self.dkim.iter().any(|d| result_word(&d.result) == "pass") {
            return "pass".into();
        }
        self.dkim.first().map(|d| result_word(&d.result)).unwrap_or_else(|| "none".into())
    }
}

impl MethodReport {
    pub fn word(result: &str) -> MethodReport {
        MethodReport { result: result.to_string(), ..MethodReport::default() }
    }
}

/// What the transaction has learnt so far.
#[derive(Clone, Debug, Default)]
pub(super) struct SenderAuth {
    /// Transactions ended on this connection ([`AuthQuery::transaction`]).
    transaction: u64,
    spf: Option<String>,
    content: Option<ContentReport>,
    /// The check the stage being evaluated waits for.
    waiting: Option<AuthCheck>,
}

const WORDS: [&str; 8] = ["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror", "policy"];

/// A result word as the policy reads it: lower case, one of RFC 8601's, else permerror.
fn result_word(w: &str) -> String {
    let w = w.trim().to_ascii_lowercase();
    if WORDS.contains(&w.as_str()) {
        w
    } else {
        "permerror".into()
    }
}

impl SenderAuth {
    pub(super) fn end_transaction(&mut self) {
        self.transaction += 1;
        self.spf = None;
        self.content = None;
        self.waiting = None;
    }

    pub(super) fn waiting(&self) -> bool {
        self.waiting.is_some()
    }

    /// Every word this transaction has, for the queued message's record.
    pub(super) fn words(&self) -> crate::eval::AuthWords {
        crate::eval::AuthWords {
            spf: self.answer(AuthCheck::Spf),
            dkim: self.answer(AuthCheck::Dkim),
            dmarc: self.answer(AuthCheck::Dmarc),
            dmarc_policy: self.answer(AuthCheck::DmarcPolicy),
        }
    }

    /// The word the policy reads for `check`, when this transaction has it.
    fn answer(&self, check: AuthCheck) -> Option<String> {
        match check {
            AuthCheck::Spf => self.spf.clone(),
            _ => {
                let c = self.content.as_ref()?;
                Some(match check {
                    AuthCheck::Dkim => c.dkim_word(),
                    AuthCheck::Dmarc => result_word(&c.dmarc.result),
                    _ => c.dmarc_policy.trim().to_ascii_lowercase(),
                })
            }
        }
    }

    /// The next question for `check`: SPF first (DMARC is computed over it), then the
    /// message's checks. None when the transaction already has the answer.
    fn query(&self, check: AuthCheck, facts: &Facts) -> Option<AuthQuery> {
        let kind = if self.spf.is_none() {
            AuthKind::Spf
        } else if check != AuthCheck::Spf && self.content.is_none() {
            AuthKind::Content
        } else {
            return None;
        };
        Some(AuthQuery {
            kind,
            transaction: self.transaction,
            client_ip: facts.client_ip,
            helo: facts.helo.as_ref().map(|h| h.0.clone()).unwrap_or_default(),
            sender: facts.sender.clone().unwrap_or_default(),
        })
    }

    /// The `Authentication-Results` field (with its CRLF) for what this transaction
    /// checked; None when the policy read no check.
    pub(super) fn header(&self, hostname: &str, facts: &Facts) -> Option<String> {
        let spf = self.spf.as_ref()?;
        let ip = facts.client_ip;
        let helo = clean_value(facts.helo.as_ref().map(|h| h.0.as_str()).unwrap_or(""));
        let sender = clean_value(facts.sender.as_deref().unwrap_or(""));
        let host = clean_value(hostname);
        let mut parts = vec![host.clone()];
        // The identity SPF checked: the sender's, or the HELO name's for the null sender.
        let (identity, prop) = if sender.is_empty() {
            (format!("postmaster@{helo}"), format!("smtp.helo={helo}"))
        } else {
            (sender.clone(), format!("smtp.mailfrom={sender}"))
        };
        let spf = result_word(spf);
        let why = match spf.as_str() {
            "pass" => format!("domain of {identity} designates {ip} as permitted sender"),
            "fail" => format!("domain of {identity} does not designate {ip} as permitted sender"),
            "softfail" => format!("domain of {identity} reports soft fail for {ip}"),
            "neutral" => format!("domain of {identity} reports neutral for {ip}"),
            "temperror" => format!("temporary dns error validating {identity}"),
            "permerror" => format!("unable to verify SPF record for {identity}"),
            _ => format!("no SPF records found for {identity}"),
        };
        parts.push(format!("spf={spf} ({host}: {why}) {prop}"));
        if let Some(c) = &self.content {
            if c.dkim.is_empty() {
                parts.push("dkim=none".into());
            }
            for d in &c.dkim {
                parts.push(method("dkim", d));
            }
            let mut dmarc = c.dmarc.clone();
            let policy = c.dmarc_policy.trim().to_ascii_lowercase();
            if !policy.is_empty() {
                dmarc.props.push(("policy.dmarc".into(), policy));
            }
            parts.push(method("dmarc", &dmarc));
        }
        Some(format!("Authentication-Results: {}\r\n", parts.join(";\r\n\t")))
    }
}

/// `dkim=fail (signature error) header.d=example.com header.s=sel`.
fn method(name: &str, m: &MethodReport) -> String {
    let mut s = format!("{name}={}", result_word(&m.result));
    if let Some(r) = m.reason.as_deref().map(clean_comment).filter(|r| !r.is_empty()) {
        s.push_str(&format!(" ({r})"));
    }
    for (k, v) in &m.props {
        let (k, v) = (clean_value(k), clean_value(v));
        if !k.is_empty() && !v.is_empty() {
            s.push_str(&format!(" {k}={v}"));
        }
    }
    s
}

/// A value of the field as one token: no white space, control character, `;` or comment.
fn clean_value(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_graphic() && !matches!(c, ';' | '(' | ')' | '"' | '\\')).collect()
}

/// A comment's text: printable ASCII, no parentheses.
fn clean_comment(s: &str) -> String {
    s.chars().filter(|c| (c.is_ascii_graphic() || *c == ' ') && !matches!(c, '(' | ')' | '\\')).collect()
}

/// Does `dkim_domain` (None: any domain) cover the sender's domain: the domain itself or
/// one below it. The domain to sign for (d=) is then the `dkim_domain`, else the sender's.
pub fn dkim_domain_for(dkim_domain: Option<&str>, sender: &str) -> Option<String> {
    let d = sender.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase()).unwrap_or_default();
    match dkim_domain.map(str::to_ascii_lowercase) {
        Some(dom) if d == dom || d.ends_with(&format!(".{dom}")) => Some(dom),
        Some(_) => None,
        None => (!d.is_empty()).then_some(d),
    }
}

/// The domain a message of `sender` is signed for, when the server signs (`dkim_key` and
/// `dkim_selector` set) and `dkim_domain` covers the sender.
pub(super) fn signing_domain(prog: &Program, sender: &str) -> Option<String> {
    if prog.server.dkim_key.is_none() || prog.server.dkim_selector.is_none() {
        return None;
    }
    dkim_domain_for(prog.server.dkim_domain.as_deref(), sender)
}

impl Conn {
    /// The evaluator asked for `check`: the answer this transaction already has, or the
    /// host's check to make first (the stage then waits for [`Conn::sender_auth_checked`]).
    pub(super) fn sender_auth_request(&mut self, check: AuthCheck) -> Option<Answer> {
        if let Some(w) = self.sender_auth.answer(check) {
            return Some(Answer::Value(Some(w)));
        }
        let q = self.sender_auth.query(check, &self.facts)?;
        self.sender_auth.waiting = Some(check);
        self.notes.push_back(Need::SenderAuth(q));
        None
    }

    /// Answer [`Need::SenderAuth`]. A report that does not match the question asked is
    /// ignored (the stage goes on waiting).
    pub fn sender_auth_checked(&mut self, report: AuthReport) {
        let Some(check) = self.sender_auth.waiting else { return };
        match report {
            AuthReport::Spf(w) => self.sender_auth.spf = Some(result_word(&w)),
            AuthReport::Content(c) if self.sender_auth.spf.is_some() => self.sender_auth.content = Some(c),
            AuthReport::Content(_) => return,
        }
        if let Some(w) = self.sender_auth.answer(check) {
            self.sender_auth.waiting = None;
            if let super::HostWait::Stage { run, .. } = &mut self.pending {
                run.answer_sender_auth(check, Answer::Value(Some(w)));
            }
        } else if let Some(q) = self.sender_auth.query(check, &self.facts) {
            self.notes.push_back(Need::SenderAuth(q));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signing_domain_covers_the_domain_and_below_it() {
        assert_eq!(dkim_domain_for(Some("Example.com"), "a@example.com").as_deref(), Some("example.com"));
        assert_eq!(dkim_domain_for(Some("example.com"), "a@mail.example.com").as_deref(), Some("example.com"));
        assert_eq!(dkim_domain_for(Some("example.com"), "a@badexample.com"), None);
        assert_eq!(dkim_domain_for(None, "a@Other.org").as_deref(), Some("other.org"));
        assert_eq!(dkim_domain_for(None, ""), None);
    }

    #[test]
    fn the_field_reports_each_check_once_in_order() {
        let mut a = SenderAuth { spf: Some("pass".into()), ..SenderAuth::default() };
        let facts = Facts {
            client_ip: "192.0.2.1".parse().unwrap(),
            sender: Some("alice@good.example".into()),
            helo: Some(("client.good.example".into(), true)),
            ..Facts::default()
        };
        a.content = Some(ContentReport {
            dkim: vec![MethodReport {
                result: "pass".into(),
                reason: None,
                props: vec![("header.d".into(), "good.example".into()), ("header.s".into(), "sel; x".into())],
            }],
            dmarc: MethodReport {
                result: "PASS".into(),
                reason: None,
                props: vec![("header.from".into(), "good.example".into())],
            },
            dmarc_policy: "reject".into(),
        });
        assert_eq!(
            a.header("mx.test", &facts).unwrap(),
            "Authentication-Results: mx.test;\r\n\tspf=pass (mx.test: domain of alice@good.example designates 192.0.2.1 as permitted sender) smtp.mailfrom=alice@good.example;\r\n\tdkim=pass header.d=good.example header.s=selx;\r\n\tdmarc=pass header.from=good.example policy.dmarc=reject\r\n"
        );
        assert_eq!(a.answer(AuthCheck::Dmarc).as_deref(), Some("pass"));
        assert_eq!(a.answer(AuthCheck::DmarcPolicy).as_deref(), Some("reject"));
    }
}
