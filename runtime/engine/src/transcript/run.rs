//! Replaying a transcript case: the real engine and evaluator ([`Conn`]) driven with a
//! virtual clock, every request answered from the case's fixtures.
//!
//! What the harness itself provides, as the daemon would: file tables are read from the
//! files the policy names (unless the case gives rows for that table), rate counters and
//! the greylist are kept by the stdlib stores on the virtual clock, BATV is checked with
//! the keys of the case's `secret` fixture, SASL PLAIN and LOGIN are checked against
//! `credentials:` (SCRAM is exercised by the daemon's tests, not here).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mailpolicy_lang::ir::{LocId, Program, Stage, TransportKind};
use mailpolicy_lang::{compile, FsLoader};
use mailpolicy_stdlib::{greylist::Greylist, ratelimit::RateStore, tables::FileTable};

mod answers;
mod items;
mod needs;

use super::{glob, Case, DnsAnswer, Item, TableRow, TranscriptFile};
use crate::conn::{ClientInfo, Conn, Need, Note, QueuedMessage, SaslResult};
use crate::eval::{self, MessageFacts, Outcome, Run, Step};
use crate::record::{stage_facts, InQueue, QueueStage};
use crate::smtp::{PeerInfo, Time, TlsInfo};

/// 2026-01-01T00:00:00Z: the clock of a case that sets none.
pub const DEFAULT_CLOCK: u64 = 1_767_225_600_000;

/// The result of one case: no failures means it passed.
#[derive(Clone, Debug)]
pub struct CaseResult {
    pub name: String,
    pub line: usize,
    pub failures: Vec<String>,
    /// Verdicts and lookups, for `mailc explain`.
    pub log: Vec<String>,
    /// Each policy verdict in order, with the trace of its tests, lookups and actions.
    pub verdicts: Vec<VerdictTrace>,
}

/// One verdict of a case, as `mailc explain` shows it.
#[derive(Clone, Debug)]
pub struct VerdictTrace {
    pub stage: Stage,
    pub outcome: String,
    /// The rule that decided; None when the stage fell off its end.
    pub rule: Option<LocId>,
    pub trace: Vec<eval::Trace>,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Why a DKIM signature could not be made (B7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DkimError {
    /// The policy's `dkim_key` secret is missing or not a usable key.
    Key(String),
    /// The key is fine; signing this message failed.
    Sign(String),
}

/// DKIM signing as the daemon signs: the `DKIM-Signature` field, CRLF-terminated, of
/// `message` with the server's key and selector for `domain` (`Conn` decided to sign and
/// for which domain). The engine has no cryptography crate: the host that builds a
/// [`Runner`] gives it ([`Runner::with_dkim`]; `mailc` gives the daemon's mail-auth signer).
pub type DkimSign = fn(
    prog: &Program,
    secrets: &dyn Fn(&str) -> Option<String>,
    message: &[u8],
    domain: &str,
) -> Result<String, DkimError>;

/// Compiles each policy once and runs cases.
pub struct Runner {
    std_dir: Option<PathBuf>,
    policies: HashMap<PathBuf, Result<Arc<Program>, String>>,
    dkim: Option<DkimSign>,
}

impl Runner {
    pub fn new(std_dir: Option<PathBuf>) -> Runner {
        Runner { std_dir, policies: HashMap::new(), dkim: None }
    }

    /// Sign as the daemon does when a case's policy signs with DKIM; without a signer such
    /// a case fails with a line saying so.
    pub fn with_dkim(mut self, dkim: Option<DkimSign>) -> Runner {
        self.dkim = dkim;
        self
    }

    fn policy(&mut self, path: &Path) -> Result<Arc<Program>, String> {
        if let Some(p) = self.policies.get(path) {
            return p.clone();
        }
        let loader = FsLoader { std_dir: self.std_dir.clone() };
        let name = path.display().to_string();
        let c = compile(&name, &loader);
        let result = match c.program {
            Some(p) => Ok(Arc::new(p)),
            None => {
                let errs: Vec<String> =
                    c.diagnostics.iter().filter(|d| d.is_error()).map(|d| d.render_short(&c.sources)).collect();
                Err(format!("the policy does not compile:\n    {}", errs.join("\n    ")))
            }
        };
        self.policies.insert(path.to_path_buf(), result.clone());
        result
    }

    pub fn run_file(&mut self, file: &TranscriptFile) -> Vec<CaseResult> {
        file.cases.iter().map(|c| self.run_case(file, c)).collect()
    }

    pub fn run_case(&mut self, file: &TranscriptFile, case: &Case) -> CaseResult {
        let mut result = CaseResult {
            name: case.name.clone(),
            line: case.line,
            failures: Vec::new(),
            log: Vec::new(),
            verdicts: Vec::new(),
        };
        let policy = case
            .items
            .iter()
            .find_map(|(_, i)| if let Item::Policy(p) = i { Some(p.clone()) } else { None })
            .or_else(|| file.policy.clone());
        let Some(policy) = policy else {
            result.failures.push(format!("line {}: no `policy:` for this case or its file", case.line));
            return result;
        };
        let prog = match self.policy(&policy) {
            Ok(p) => p,
            Err(e) => {
                result.failures.push(format!("{}: {e}", policy.display()));
                return result;
            }
        };
        let mut run = CaseRun::new(prog, policy);
        run.dkim = self.dkim;
        for (line, item) in &case.items {
            run.line = *line;
            run.item(item);
            if run.failures.len() > 20 {
                break;
            }
        }
        run.end_session();
        result.failures = run.failures;
        result.log = run.log;
        result.verdicts = run.verdict_traces;
        result
    }
}

enum Sasl {
    None,
    LoginWantUser,
    LoginWantPass(String),
}

struct Reply {
    lines: Vec<String>,
    verdict: Option<Option<LocId>>,
}

struct CaseRun {
    prog: Arc<Program>,
    policy_path: PathBuf,
    line: usize,
    now: u64,
    client: SocketAddr,
    client_name: String,
    client_ptr: String,
    listener: Option<String>,
    local: SocketAddr,
    implicit_tls: bool,
    client_cert: Option<Vec<u8>>,
    /// `disk-free:` fixture: the spool's free space (None: plenty).
    disk_free: Option<u64>,
    /// Spilled bytes of the message being received (its number, the bytes).
    spill: (u64, Vec<u8>),
    dns: HashMap<(String, String), DnsAnswer>,
    rows: HashMap<String, Vec<TableRow>>,
    file_tables: HashMap<String, Result<FileTable, String>>,
    credentials: Vec<(String, String)>,
    callahead: HashMap<String, Option<(u16, String)>>,
    auth_results: HashMap<String, String>,
    /// Logins that authenticated, with the addresses and times (`Need::LoginKnown`).
    logins: HashMap<String, Vec<(std::net::IpAddr, u64)>>,
    /// Alert mails sent (after `:every`), and when each (address, text) last went out.
    alert_mails: Vec<String>,
    alerts_sent: HashMap<(String, String), u64>,
    scores: HashMap<String, f64>,
    /// `milter NAME:` lines: (milter, stage, recipient) and the answers, in order.
    milters: Vec<(String, String, Option<String>, super::MilterFixture)>,
    secrets: HashMap<String, String>,
    /// The host's DKIM signer ([`Runner::with_dkim`]).
    dkim: Option<DkimSign>,
    rates: RateStore,
    /// `concurrent:` fixtures: sessions open per key, this one included.
    concurrent: HashMap<String, u64>,
    greylist: Greylist,
    conn: Option<Conn>,
    session_keys: Vec<String>,
    sasl: Sasl,
    out: Vec<u8>,
    replies: VecDeque<Reply>,
    last: Option<Reply>,
    verdicts: VecDeque<Option<LocId>>,
    queued: Vec<QueuedMessage>,
    /// `proxy-filter:` answers not used yet (the last one repeats), and the messages
    /// handed to the before-queue filter.
    proxy_answers: std::collections::VecDeque<crate::before_queue::FilterOutcome>,
    proxied: Vec<QueuedMessage>,
    logs: Vec<String>,
    alerts: Vec<String>,
    failures: Vec<String>,
    log: Vec<String>,
    verdict_traces: Vec<VerdictTrace>,
    sessions: u32,
    /// Virtual time of the last `C:` line (or of the connection).
    sent_at: u64,
}

impl CaseRun {
    fn new(prog: Arc<Program>, policy_path: PathBuf) -> CaseRun {
        CaseRun {
            prog,
            policy_path,
            line: 0,
            now: DEFAULT_CLOCK,
            client: SocketAddr::from(([192, 0, 2, 1], 40000)),
            client_name: String::new(),
            client_ptr: String::new(),
            listener: None,
            local: SocketAddr::from(([127, 0, 0, 1], 25)),
            implicit_tls: false,
            client_cert: None,
            disk_free: None,
            spill: (0, Vec::new()),
            dns: HashMap::new(),
            rows: HashMap::new(),
            file_tables: HashMap::new(),
            credentials: Vec::new(),
            callahead: HashMap::new(),
            auth_results: HashMap::new(),
            logins: HashMap::new(),
            alert_mails: Vec::new(),
            alerts_sent: HashMap::new(),
            scores: HashMap::new(),
            milters: Vec::new(),
            secrets: HashMap::new(),
            dkim: None,
            rates: RateStore::default(),
            concurrent: HashMap::new(),
            greylist: Greylist::default(),
            conn: None,
            session_keys: Vec::new(),
            sasl: Sasl::None,
            out: Vec::new(),
            replies: VecDeque::new(),
            last: None,
            verdicts: VecDeque::new(),
            queued: Vec::new(),
            proxy_answers: Default::default(),
            proxied: Vec::new(),
            logs: Vec::new(),
            alerts: Vec::new(),
            failures: Vec::new(),
            log: Vec::new(),
            verdict_traces: Vec::new(),
            sessions: 0,
            sent_at: DEFAULT_CLOCK,
        }
    }

    fn fail(&mut self, msg: impl Into<String>) {
        let m = msg.into();
        self.failures.push(format!("line {}: {m}", self.line));
    }

    fn last_msg(&mut self) -> Option<QueuedMessage> {
        self.pump();
        let m = self.queued.last().cloned();
        if m.is_none() {
            self.fail("no message was queued");
        }
        m
    }

    // ---- the session ------------------------------------------------------------------

    fn ensure_session(&mut self) {
        if self.conn.is_some() {
            return;
        }
        self.sessions += 1;
        let listener = self.listener.clone();
        let mut config = crate::config::engine_config(&self.prog, listener.as_deref(), "mx.test", true);
        // SCRAM needs the daemon's SASL library; transcripts exercise PLAIN and LOGIN.
        config.auth_mechanisms.retain(|m| m == "PLAIN" || m == "LOGIN");
        let tls = self.implicit_tls.then(|| self.tls_info());
        let peer = PeerInfo { remote: Some(self.client), local: Some(self.local), tls };
        let client = ClientInfo {
            name: self.client_name.clone(),
            ptr: self.client_ptr.clone(),
            listener: listener.clone().unwrap_or_default(),
            session_id: format!("S{}", self.sessions),
        };
        let mut conn = Conn::new(self.prog.clone(), config, peer, client, Time(self.now));
        let (tls_req, auth_req) = crate::config::requirements(&self.prog, listener.as_deref());
        conn.set_requirements(tls_req, auth_req);
        conn.set_free_space(self.disk_free);
        // The id the next message gets, which milters see as `i` (as the daemon reserves it).
        conn.set_next_queue_id(format!("{:010X}", self.queued.len() + 1));
        self.session_keys = crate::eval::session_keys(self.client.ip());
        for k in &self.session_keys {
            self.rates.open(k);
        }
        self.conn = Some(conn);
        self.sent_at = self.now;
        self.out.clear();
        self.replies.clear();
        self.verdicts.clear();
        self.sasl = Sasl::None;
        self.pump();
    }

    fn end_session(&mut self) {
        if let Some(mut c) = self.conn.take() {
            c.handle_eof(Time(self.now));
            let _ = c.poll_need(Time(self.now));
            for k in &self.session_keys {
                self.rates.close(k);
            }
        }
        self.last = None;
    }

    fn tls_info(&self) -> TlsInfo {
        TlsInfo {
            version: "TLSv1.3".into(),
            cipher: "TLS13_AES_256_GCM_SHA384".into(),
            sni: None,
            peer_certificate: self.client_cert.clone(),
        }
    }

    /// Move the clock to `to`, firing the engine's timers on the way.
    fn advance(&mut self, to: u64) {
        for _ in 0..10_000 {
            self.pump();
            let Some(c) = self.conn.as_mut() else { break };
            match c.poll_timeout() {
                Some(t) if t.0 <= to => {
                    self.now = self.now.max(t.0);
                    c.handle_timeout(Time(self.now));
                }
                _ => break,
            }
        }
        self.now = self.now.max(to);
        if let Some(c) = self.conn.as_mut() {
            c.handle_timeout(Time(self.now));
        }
        self.pump();
    }

    /// The next complete reply, waiting on the virtual clock for held replies (tarpits,
    /// greet pause) as a client would.
    fn next_reply(&mut self) -> Option<Reply> {
        self.pump();
        for _ in 0..1000 {
            if let Some(r) = self.replies.pop_front() {
                return Some(r);
            }
            let t = self.conn.as_ref().and_then(|c| c.poll_timeout())?;
            // Clients wait up to five minutes for a reply (RFC 5321 4.5.3.2).
            if t.0 > self.now + 300_000 {
                return None;
            }
            self.advance(t.0.max(self.now));
        }
        None
    }

    fn drain(&mut self) {
        let Some(c) = self.conn.as_mut() else { return };
        while let Some(b) = c.poll_transmit() {
            self.out.extend_from_slice(&b);
        }
        // Split complete replies.
        let mut lines: Vec<String> = Vec::new();
        let mut consumed = 0;
        let mut start = 0;
        while let Some(pos) = self.out[start..].windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&self.out[start..start + pos]).to_string();
            start += pos + 2;
            let last = line.len() < 4 || line.as_bytes().get(3) == Some(&b' ');
            lines.push(line);
            if last {
                let verdict = self.verdicts.pop_front();
                self.replies.push_back(Reply { lines: std::mem::take(&mut lines), verdict });
                consumed = start;
            }
        }
        self.out.drain(..consumed);
    }
}

/// `250-PIPELINING` and `250 OK` both read as `250 ...`.
fn normalize(line: &str) -> String {
    if line.len() >= 4 && line.as_bytes()[3] == b'-' {
        format!("{} {}", &line[..3], &line[4..])
    } else {
        line.to_string()
    }
}

/// How `route:` and `bounce:` expectations see a queue-side verdict.
pub fn describe(stage: Stage, v: &eval::StageVerdict) -> String {
    let mut parts: Vec<String> = Vec::new();
    for e in &v.effects {
        match e {
            eval::Effect::RewriteRecipient(a) => parts.push(format!("rewrite recipient {a}")),
            eval::Effect::RewriteSender(a) => parts.push(format!("rewrite sender {a}")),
            eval::Effect::Redirect(a) => parts.push(format!("redirect {a}")),
            eval::Effect::Expand { members, owner } => parts.push(format!(
                "expand {}{}",
                members.join(", "),
                owner.as_ref().map(|o| format!(" owner {o}")).unwrap_or_default()
            )),
            eval::Effect::ExpandList(l) => parts.push(format!("expand list {l}")),
            eval::Effect::Masquerade(d) => parts.push(format!("masquerade {}", d.join(", "))),
            eval::Effect::Bcc(a) => parts.push(format!("bcc {a}")),
            eval::Effect::Archive(a) => parts.push(format!("archive {a}")),
            eval::Effect::Hold(r) => parts.push(format!("hold {r}")),
            eval::Effect::HeaderAdd { name, value } => parts.push(format!("header {name}: {value}")),
            _ => {}
        }
    }
    let outcome = match (&v.outcome, stage) {
        (Outcome::Deliver(t), _) => {
            let kind = match t.kind {
                TransportKind::Mx => "mx",
                TransportKind::Smtp => "smtp",
                TransportKind::Lmtp => "lmtp",
                TransportKind::Maildir => "maildir",
                TransportKind::Mbox => "mbox",
            };
            let mut s = format!("deliver {kind}");
            if let Some(d) = &t.dest {
                s.push(' ');
                s.push_str(d);
            }
            match t.tls {
                mailpolicy_lang::ir::TlsMode::Required => s.push_str(" tls required"),
                mailpolicy_lang::ir::TlsMode::Implicit => s.push_str(" tls implicit"),
                mailpolicy_lang::ir::TlsMode::Dane => s.push_str(" tls dane"),
                mailpolicy_lang::ir::TlsMode::Sts => s.push_str(" tls sts"),
                mailpolicy_lang::ir::TlsMode::May | mailpolicy_lang::ir::TlsMode::None => {}
            }
            if t.auth.is_some() {
                s.push_str(" auth");
            }
            s
        }
        (Outcome::Default | Outcome::Accept, Stage::Route) => "deliver mx".into(),
        (Outcome::Default | Outcome::Accept, _) => "send".into(),
        (Outcome::Discard, _) => "discard".into(),
        (Outcome::Reject(r), _) => format!("reject {}", r.line()),
        (Outcome::Tempfail(r), _) => format!("tempfail {}", r.line()),
    };
    parts.push(outcome);
    parts.join("; ")
}
