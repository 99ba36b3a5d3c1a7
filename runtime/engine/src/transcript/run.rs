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

    fn item(&mut self, item: &Item) {
        match item {
            Item::Policy(_) => {}
            Item::Client(a) => self.client = *a,
            Item::ClientName(n) => self.client_name = n.clone(),
            Item::ClientPtr(n) => self.client_ptr = n.clone(),
            Item::Listener(l) => {
                if self.prog.listener(l).is_none() {
                    self.fail(format!("the policy declares no listener `{l}`"));
                }
                self.listener = Some(l.clone());
            }
            Item::Local(a) => self.local = *a,
            Item::ImplicitTls => self.implicit_tls = true,
            Item::ClientCert(fp) => {
                let bytes: Vec<u8> = fp.split(':').filter_map(|h| u8::from_str_radix(h, 16).ok()).collect();
                if bytes.len() == 32 {
                    self.client_cert = Some(bytes);
                } else {
                    self.client_cert = Some(fp.as_bytes().to_vec());
                }
            }
            Item::Clock(t) => self.now = *t,
            Item::DiskFree(n) => {
                self.disk_free = Some(*n);
                if let Some(c) = self.conn.as_mut() {
                    c.set_free_space(Some(*n));
                }
            }
            Item::Dns { name, rtype, answer } => {
                self.dns.insert((name.clone(), rtype.clone()), answer.clone());
            }
            Item::Table { table, row } => {
                if self.prog.table_by_name(table).is_none() {
                    self.fail(format!("the policy declares no table `{table}`"));
                }
                self.rows.entry(table.clone()).or_default().push(row.clone());
            }
            Item::Credentials { user, password } => self.credentials.push((user.clone(), password.clone())),
            Item::Callahead { address, code, text } => {
                self.callahead.insert(address.to_ascii_lowercase(), Some((*code, text.clone())));
            }
            Item::CallaheadError { address } => {
                self.callahead.insert(address.to_ascii_lowercase(), None);
            }
            Item::AuthResult { check, result } => {
                self.auth_results.insert(check.clone(), result.clone());
            }
            Item::Score { scanner, score } => {
                self.scores.insert(scanner.clone(), *score);
            }
            Item::Milter { milter, stage, rcpt, answer } => {
                if !self.prog.scanners.iter().any(|s| s.kind == "milter" && s.name == *milter) {
                    self.fail(format!("the policy declares no milter `{milter}`"));
                }
                self.milters.push((milter.clone(), stage.clone(), rcpt.clone(), answer.clone()));
            }
            Item::Secret { name, value } => {
                self.secrets.insert(name.clone(), value.clone());
            }
            Item::ProxyFilter(answer) => self.proxy_answers.push_back(answer.clone()),
            Item::Count { counter, key, n } => {
                for _ in 0..(*n).min(1_000_000) {
                    self.rates.record(counter, key, self.now);
                }
            }
            Item::Concurrent { key, n } => {
                self.concurrent.insert(key.clone(), *n);
            }
            Item::Send(bytes) => {
                self.ensure_session();
                self.pump();
                let Some(conn) = self.conn.as_mut() else {
                    return;
                };
                if conn.is_closed() {
                    let shown = String::from_utf8_lossy(bytes).trim_end().to_string();
                    self.fail(format!("the server closed the connection before the client sent `{shown}`"));
                    return;
                }
                conn.handle_input(bytes, Time(self.now));
                // The transcript's queue keeps messages in memory: the spill joins them.
                if let Some((seq, b)) = conn.take_spill() {
                    if self.spill.0 != seq {
                        self.spill = (seq, Vec::new());
                    }
                    self.spill.1.extend_from_slice(&b);
                }
                self.sent_at = self.now;
                self.pump();
            }
            Item::Expect(pattern) => {
                self.ensure_session();
                match self.next_reply() {
                    Some(r) => {
                        let last = r.lines.last().cloned().unwrap_or_default();
                        let normal = normalize(&last);
                        if !glob(pattern, &normal) {
                            self.fail(format!(
                                "expected reply `{pattern}`\n           got      `{}`",
                                r.lines.join("\\r\\n")
                            ));
                        }
                        self.last = Some(r);
                    }
                    None => {
                        let closed = self.conn.as_ref().is_some_and(|c| c.is_closed());
                        self.fail(format!(
                            "expected reply `{pattern}`, but the server sent nothing{}",
                            if closed { " (the connection is closed)" } else { "" }
                        ));
                    }
                }
            }
            Item::ReplyHas(p) | Item::ReplyLacks(p) => {
                let has = matches!(item, Item::ReplyHas(_));
                let Some(r) = &self.last else {
                    self.fail("no reply to look at yet");
                    return;
                };
                let found = r.lines.iter().any(|l| glob(p, &normalize(l)));
                if found != has {
                    let lines = r.lines.join("\\r\\n");
                    self.fail(format!(
                        "the last reply {} a line matching `{p}`: {lines}",
                        if has { "has no" } else { "has" }
                    ));
                }
            }
            Item::By(want) => {
                let got = match self.last.as_ref().map(|r| r.verdict) {
                    None => {
                        self.fail("`by:` needs a reply before it");
                        return;
                    }
                    Some(None) => {
                        self.fail(format!(
                            "expected the reply to be decided by {want}, but the engine answered it without the policy"
                        ));
                        return;
                    }
                    Some(Some(v)) => v,
                };
                let desc = match got {
                    Some(loc) => self.prog.describe_loc(loc),
                    None => "default".to_string(),
                };
                let ok = if want == "default" {
                    got.is_none()
                } else if want.contains(':') {
                    desc.ends_with(want.as_str())
                } else {
                    desc.rsplit(':').next() == Some(want.as_str())
                };
                if !ok {
                    self.fail(format!("expected the reply to be decided by {want}, it was decided by {desc}"));
                }
            }
            Item::Wait(ms) => {
                // Between connections (before the first line of a session, or after
                // `reconnect`) the client just waits: the clock moves, nobody connects.
                if self.conn.is_some() {
                    self.advance(self.now + ms);
                } else {
                    self.now += ms;
                }
            }
            Item::Elapsed(ms) => {
                let got = self.now.saturating_sub(self.sent_at);
                if got != *ms {
                    self.fail(format!("expected {ms}ms to have passed since the client last sent, {got}ms did"));
                }
            }
            Item::NoReply => {
                self.ensure_session();
                self.pump();
                if let Some(r) = self.replies.front() {
                    let lines = r.lines.join("\\r\\n");
                    self.fail(format!("expected no reply yet, the server sent `{lines}`"));
                }
            }
            Item::Reconnect => self.end_session(),
            Item::Closed => {
                self.pump();
                if !self.conn.as_ref().is_some_and(|c| c.is_closed()) {
                    self.fail("expected the server to have closed the connection; it is open");
                }
            }
            Item::Proxied(n) => {
                self.pump();
                if self.proxied.len() != *n {
                    self.fail(format!(
                        "expected {n} message(s) handed to the proxy filter, found {}",
                        self.proxied.len()
                    ));
                }
            }
            Item::Queued(n) => {
                self.pump();
                if self.queued.len() != *n {
                    self.fail(format!("expected {n} queued message(s), found {}", self.queued.len()));
                }
            }
            Item::QueuedTo(want) => {
                let Some(m) = self.last_msg() else { return };
                let mut got: Vec<String> = m.recipients.iter().map(|r| r.address.to_ascii_lowercase()).collect();
                let mut want: Vec<String> = want.iter().map(|w| w.to_ascii_lowercase()).collect();
                got.sort();
                want.sort();
                if got != want {
                    self.fail(format!(
                        "expected the message queued to [{}], it was queued to [{}]",
                        want.join(", "),
                        got.join(", ")
                    ));
                }
            }
            Item::QueuedFrom(want) => {
                let Some(m) = self.last_msg() else { return };
                let want_s = if want == "<>" { "" } else { want.as_str() };
                if !glob(want_s, &m.sender) {
                    let s = m.sender.clone();
                    self.fail(format!("expected the envelope sender `{want}`, found `{s}`"));
                }
            }
            Item::Header { name, pattern } => {
                let Some(m) = self.last_msg() else { return };
                let facts = MessageFacts::parse(&m.data);
                let values = facts.header(name);
                if !values.iter().any(|v| glob(pattern, v)) {
                    self.fail(format!("expected a header `{name}: {pattern}` in the queued message; found {values:?}"));
                }
            }
            Item::NoHeader(name) => {
                let Some(m) = self.last_msg() else { return };
                let values = MessageFacts::parse(&m.data).header(name);
                if !values.is_empty() {
                    self.fail(format!("expected no `{name}` header in the queued message; found {values:?}"));
                }
            }
            Item::Body(pattern) => {
                let Some(m) = self.last_msg() else { return };
                let end = crate::headers::header_end(&m.data);
                let body = String::from_utf8_lossy(m.data.get(end..).unwrap_or_default()).into_owned();
                if !body.lines().any(|l| glob(pattern, l.trim_end_matches('\r'))) {
                    self.fail(format!("expected a body line `{pattern}` in the queued message; its body is {body:?}"));
                }
            }
            Item::Notify { address, values } => {
                let Some(m) = self.last_msg() else { return };
                match m.recipients.iter().find(|r| r.address.eq_ignore_ascii_case(address)) {
                    Some(r) => {
                        if &r.notify != values {
                            let got = r.notify.join(",");
                            self.fail(format!(
                                "expected NOTIFY={} for {address}, stored NOTIFY={}",
                                values.join(","),
                                if got.is_empty() { "(none)".into() } else { got }
                            ));
                        }
                    }
                    None => self.fail(format!("{address} is not a recipient of the queued message")),
                }
            }
            Item::Ret(p) | Item::Envid(p) => {
                let Some(m) = self.last_msg() else { return };
                let (what, got) =
                    if matches!(item, Item::Ret(_)) { ("RET", m.ret.clone()) } else { ("ENVID", m.envid.clone()) };
                let ok = if p == "<none>" { got.is_empty() } else { glob(p, &got) };
                if !ok {
                    self.fail(format!(
                        "expected {what} `{p}` stored with the message, found `{}`",
                        if got.is_empty() { "<none>" } else { got.as_str() }
                    ));
                }
            }
            Item::Orcpt { address, pattern } => {
                let Some(m) = self.last_msg() else { return };
                match m.recipients.iter().find(|r| r.address.eq_ignore_ascii_case(address)) {
                    Some(r) => {
                        let ok = if pattern == "<none>" { r.orcpt.is_empty() } else { glob(pattern, &r.orcpt) };
                        if !ok {
                            let got = r.orcpt.clone();
                            self.fail(format!("expected ORCPT `{pattern}` for {address}, stored `{got}`"));
                        }
                    }
                    None => self.fail(format!("{address} is not a recipient of the queued message")),
                }
            }
            Item::Held(p) => {
                let Some(m) = self.last_msg() else { return };
                match (&m.hold, p) {
                    (None, _) => self.fail("expected the message to be held (quarantined); it was not"),
                    (Some(r), Some(p)) if !glob(p, r) => {
                        let r = r.clone();
                        self.fail(format!("expected the hold reason `{p}`, found `{r}`"))
                    }
                    _ => {}
                }
            }
            Item::NotHeld => {
                let Some(m) = self.last_msg() else { return };
                if let Some(r) = m.hold.clone() {
                    self.fail(format!("expected the message not to be held; it was held: {r}"));
                }
            }
            Item::Archived(f) => {
                let Some(m) = self.last_msg() else { return };
                if !m.archive.iter().any(|a| glob(f, a)) {
                    let a = m.archive.clone();
                    self.fail(format!("expected an archive copy to `{f}`; archives: {a:?}"));
                }
            }
            Item::BatvSigned(want) => {
                let Some(m) = self.last_msg() else { return };
                if m.batv_sign != *want {
                    self.fail(format!("expected batv signing {}", if *want { "on" } else { "off" }));
                }
            }
            Item::Route { address, pattern } => {
                let got = self.queue_stage(Stage::Route, address, "failure");
                if let Some(got) = got {
                    if !glob(pattern, &got) {
                        self.fail(format!("route for {address}: expected `{pattern}`, got `{got}`"));
                    }
                }
            }
            Item::Bounce { address, kind, pattern } => {
                let got = self.queue_stage(Stage::Bounce, address, kind);
                if let Some(got) = got {
                    if !glob(pattern, &got) {
                        self.fail(format!("bounce to {address}: expected `{pattern}`, got `{got}`"));
                    }
                }
            }
            Item::Log(p) => {
                self.pump();
                if !self.logs.iter().any(|l| glob(p, l)) {
                    let logs = self.logs.clone();
                    self.fail(format!("expected a log line `{p}`; logged: {logs:?}"));
                }
            }
            Item::Alert(p) => {
                self.pump();
                if !self.alerts.iter().any(|l| glob(p, l)) {
                    let a = self.alerts.clone();
                    self.fail(format!("expected an alert `{p}`; alerts: {a:?}"));
                }
            }
            Item::AlertMails(n) => {
                self.pump();
                if self.alert_mails.len() != *n {
                    let a = self.alert_mails.clone();
                    self.fail(format!("expected {n} alert mails, {} were sent: {a:?}", a.len()));
                }
            }
            Item::Filter(want) => {
                let Some(m) = self.last_msg() else { return };
                let got = m.filter.as_ref().map(|t| t.to_string());
                let ok = match (want, &got) {
                    (None, None) => true,
                    (Some(p), Some(g)) => glob(p, g),
                    _ => false,
                };
                if !ok {
                    let w = want.clone().unwrap_or_else(|| "no".into());
                    let g = got.unwrap_or_else(|| "no content filter".into());
                    self.fail(format!("expected filter `{w}`, got `{g}`"));
                }
            }
        }
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

    fn pump(&mut self) {
        for _ in 0..100_000 {
            self.drain();
            let now = Time(self.now);
            let Some(need) = self.conn.as_mut().and_then(|c| c.poll_need(now)) else {
                break;
            };
            match need {
                Need::Policy(req) => {
                    let prog = self.prog.clone();
                    let ans = self.answer(&prog, &req);
                    self.log.push(format!("  lookup {} -> {ans}", req.describe(&prog)));
                    if let Some(c) = self.conn.as_mut() {
                        c.answer(req, ans);
                    }
                }
                Need::AuthStep { mechanism, data } => self.sasl_step(&mechanism, data),
                Need::FailedLogins { key, window_ms } => {
                    let n =
                        self.rates.count(mailpolicy_lang::ir::Counter::AuthFailures.name(), &key, window_ms, self.now);
                    self.log.push(format!("  failed logins by {key} -> {n}"));
                    if let Some(c) = self.conn.as_mut() {
                        c.failed_logins(n, now);
                    }
                }
                Need::LoginKnown { login, ip, window_ms } => {
                    let t = self.now;
                    let known = self
                        .logins
                        .get(&login)
                        .is_some_and(|v| v.iter().any(|(a, at)| *a == ip && t.saturating_sub(*at) <= window_ms));
                    self.log.push(format!("  login {login} known from {ip} -> {known}"));
                    if let Some(c) = self.conn.as_mut() {
                        c.login_known(known, now);
                    }
                }
                Need::SenderAuth(q) => {
                    let report = self.sender_auth(&q);
                    self.log.push(format!("  {:?} check -> {report:?}", q.kind));
                    if let Some(c) = self.conn.as_mut() {
                        c.sender_auth_checked(report);
                    }
                }
                Need::StartTls => {
                    let info = self.tls_info();
                    if let Some(c) = self.conn.as_mut() {
                        c.tls_established(info, now);
                    }
                }
                Need::Sign(sign) => {
                    let field = self.sign(&sign);
                    if let Some(c) = self.conn.as_mut() {
                        c.signed(field.as_deref());
                    }
                }
                Need::Queue(mut msg) => {
                    if msg.tail > 0 {
                        msg.data.extend_from_slice(&std::mem::take(&mut self.spill).1);
                        msg.tail = 0;
                    }
                    self.queued.push(msg);
                    let id = format!("{:010X}", self.queued.len());
                    if let Some(c) = self.conn.as_mut() {
                        c.queued(&id, now);
                        c.set_next_queue_id(format!("{:010X}", self.queued.len() + 1));
                    }
                }
                Need::ProxyFilter(mut call) => {
                    if call.message.tail > 0 {
                        call.message.data.extend_from_slice(&std::mem::take(&mut self.spill).1);
                        call.message.tail = 0;
                    }
                    let answer = match self.proxy_answers.len() {
                        0 => None,
                        1 => self.proxy_answers.front().cloned(),
                        _ => self.proxy_answers.pop_front(),
                    };
                    let answer = answer.unwrap_or_else(|| {
                        self.fail(format!(
                            "a message went to the proxy filter {} and the case gives no `proxy-filter:` answer",
                            call.address
                        ));
                        crate::before_queue::FilterOutcome::Failed("no `proxy-filter:` answer".into())
                    });
                    self.proxied.push(call.message);
                    if let Some(c) = self.conn.as_mut() {
                        c.proxied(&answer, now);
                    }
                }
                Need::Milter(call) => {
                    let answers = self.milter_answers(&call);
                    if let Some(c) = self.conn.as_mut() {
                        c.milter_replied(answers, now);
                    }
                }
                Need::Note(n) => self.note(n),
            }
        }
        self.drain();
    }

    /// The milters' answers to a stage from the case's `milter NAME:` lines (a milter
    /// with no line for the stage continues), consulted in order as the daemon does.
    fn milter_answers(&mut self, call: &crate::conn::MilterCall) -> Vec<(String, crate::conn::MilterAnswer)> {
        use super::MilterFixture as F;
        let rcpt = match &call.step {
            crate::milter::Step::Rcpt(a) => a.first().map(|a| a.trim_matches(['<', '>']).to_ascii_lowercase()),
            _ => None,
        };
        let names: Vec<String> =
            self.prog.scanners.iter().filter(|s| s.kind == "milter").map(|s| s.name.clone()).collect();
        let mut out = Vec::new();
        for name in names {
            let mut outcome = crate::milter::MilterReply::default();
            let mut error = None;
            for (m, stage, r, answer) in &self.milters {
                if *m != name || stage != call.stage.name() || r.as_ref().is_some_and(|r| Some(r) != rcpt.as_ref()) {
                    continue;
                }
                match answer {
                    F::Verdict(v) => outcome.verdict = v.clone(),
                    F::Modification(x) => outcome.modifications.push(x.clone()),
                    F::Error(e) => error = Some(e.clone()),
                }
            }
            let answer = match error {
                Some(e) => Err(e),
                None => Ok(outcome),
            };
            let stop = self.conn.as_ref().is_some_and(|c| c.milter_stops(&name, &answer));
            out.push((name, answer));
            if stop {
                break;
            }
        }
        out
    }

    /// SPF, DKIM and DMARC from the case's `auth` fixtures (`none` for a check without
    /// one): one DKIM signature with the `dkim` result unless it is `none`, the DMARC
    /// result for the domain of the message's From.
    fn sender_auth(&self, q: &crate::conn::AuthQuery) -> crate::conn::AuthReport {
        use crate::conn::{AuthKind, AuthReport, ContentReport, MethodReport};
        let fixture = |k: &str| self.auth_results.get(k).cloned().unwrap_or_else(|| "none".into());
        match q.kind {
            AuthKind::Spf => AuthReport::Spf(fixture("spf")),
            AuthKind::Content => {
                let dkim = fixture("dkim");
                let from = self
                    .conn
                    .as_ref()
                    .and_then(|c| c.facts().message.as_ref())
                    .and_then(|m| m.header("from").first().cloned())
                    .unwrap_or_default();
                let domain = from.rsplit_once('@').map(|(_, d)| d.trim_end_matches(['>', ' ']).to_string());
                let mut dmarc = MethodReport::word(&fixture("dmarc"));
                dmarc.props.extend(domain.map(|d| ("header.from".to_string(), d)));
                AuthReport::Content(ContentReport {
                    dkim: if dkim == "none" { Vec::new() } else { vec![MethodReport::word(&dkim)] },
                    dmarc,
                    dmarc_policy: self.auth_results.get("dmarc-policy").cloned().unwrap_or_default(),
                })
            }
        }
    }

    /// The DKIM signature the daemon would add (B7), made with the `dkim_key` secret
    /// fixture by the host's signer.
    fn sign(&mut self, sign: &crate::conn::Sign) -> Option<String> {
        let Some(dkim) = self.dkim else {
            self.fail("the policy signs with DKIM and this host of the engine has no DKIM signer (mailc test has one)");
            return None;
        };
        // The whole message: the part in memory and what was spilled after it.
        let mut signed = Vec::new();
        if let Some((head, tail)) = self.conn.as_ref().and_then(|c| c.sealing_message()) {
            signed.extend_from_slice(head);
            if tail > 0 {
                signed.extend_from_slice(&self.spill.1);
            }
        }
        let secrets = self.secrets.clone();
        match dkim(&self.prog, &|n| secrets.get(n).cloned(), &signed, &sign.domain) {
            Ok(h) => Some(h),
            Err(DkimError::Sign(e)) => {
                self.fail(format!("DKIM signing failed: {e}"));
                None
            }
            Err(DkimError::Key(e)) => {
                self.fail(format!(
                    "the policy signs with DKIM and the case has no usable key: {e} (give it as `secret NAME: PEM`, `\\n` for newlines)"
                ));
                None
            }
        }
    }

    fn note(&mut self, n: Note) {
        match n {
            Note::Verdict { stage, outcome, rule, trace } => {
                self.verdict_traces.push(VerdictTrace { stage, outcome: outcome.clone(), rule, trace });
                let at = rule.map(|r| self.prog.describe_loc(r)).unwrap_or_else(|| "end of stage".into());
                self.log.push(format!("  {}: {outcome} ({at})", stage.name()));
                self.verdicts.push_back(rule);
            }
            Note::Log(l) => self.logs.push(l),
            Note::Alert { to, text, every_ms } => {
                // An alert mail goes out at most once per `:every` for the same address and
                // text, on the virtual clock, as the daemon sends them.
                let key = (to.to_ascii_lowercase(), text.clone());
                if !self.alerts_sent.get(&key).is_some_and(|t| self.now.saturating_sub(*t) < every_ms) {
                    self.alerts_sent.insert(key, self.now);
                    self.alert_mails.push(format!("{to}: {text}"));
                }
                self.alerts.push(format!("{to}: {text}"));
            }
            Note::Count { counter, keys } => {
                for k in keys {
                    self.rates.record(counter.name(), &k, self.now);
                }
            }
            Note::Login { mechanism, login, ok, throttled } => {
                let who = login.clone().unwrap_or_default();
                let how = match (ok, throttled) {
                    (true, _) => "authenticated".to_string(),
                    (false, "") => "failed".to_string(),
                    (false, t) => format!("refused ({t} throttle)"),
                };
                self.log.push(format!("  auth {mechanism} {who}: {how}"));
                if let (true, Some(l)) = (ok, login) {
                    let v = self.logins.entry(l).or_default();
                    v.retain(|(a, _)| *a != self.client.ip());
                    v.push((self.client.ip(), self.now));
                }
            }
        }
    }

    fn sasl_step(&mut self, mechanism: &str, data: Option<Vec<u8>>) {
        let now = Time(self.now);
        let check = |creds: &[(String, String)], u: &str, p: &str| creds.iter().any(|(cu, cp)| cu == u && cp == p);
        let outcome = match (mechanism, &self.sasl, data) {
            ("PLAIN", _, None) => {
                if let Some(c) = self.conn.as_mut() {
                    c.auth_continue(b"", now);
                }
                return;
            }
            ("PLAIN", _, Some(d)) => {
                let parts: Vec<&[u8]> = d.split(|b| *b == 0).collect();
                match parts.as_slice() {
                    [_authz, user, pass] => {
                        let (u, p) =
                            (String::from_utf8_lossy(user).to_string(), String::from_utf8_lossy(pass).to_string());
                        if check(&self.credentials, &u, &p) {
                            SaslResult::Success { user: u }
                        } else {
                            SaslResult::Failure { login: Some(u) }
                        }
                    }
                    _ => SaslResult::Failure { login: None },
                }
            }
            ("LOGIN", Sasl::None, None) => {
                self.sasl = Sasl::LoginWantUser;
                if let Some(c) = self.conn.as_mut() {
                    c.auth_continue(b"Username:", now);
                }
                return;
            }
            ("LOGIN", Sasl::None | Sasl::LoginWantUser, Some(u)) => {
                self.sasl = Sasl::LoginWantPass(String::from_utf8_lossy(&u).to_string());
                if let Some(c) = self.conn.as_mut() {
                    c.auth_continue(b"Password:", now);
                }
                return;
            }
            ("LOGIN", Sasl::LoginWantPass(u), Some(p)) => {
                let u = u.clone();
                if check(&self.credentials, &u, &String::from_utf8_lossy(&p)) {
                    SaslResult::Success { user: u }
                } else {
                    SaslResult::Failure { login: Some(u) }
                }
            }
            _ => SaslResult::Failure { login: None },
        };
        self.sasl = Sasl::None;
        if let Some(c) = self.conn.as_mut() {
            c.sasl_done(mechanism, outcome, now);
        }
    }

    /// Run a queue-side stage for `address` of the last queued message (route), or for a
    /// DSN to `address` (bounce), and describe the outcome.
    fn queue_stage(&mut self, stage: Stage, address: &str, kind: &str) -> Option<String> {
        let prog = self.prog.clone();
        // The facts as the daemon's queue manager builds them (`record::stage_facts`).
        let queue_id = format!("{:010X}", self.queued.len());
        let at = InQueue { queue_id: &queue_id, now_ms: self.now, arrived_ms: self.now };
        let (facts, state) = match stage {
            Stage::Route => {
                let m = self.last_msg()?;
                let Some(r) = m.recipients.iter().find(|r| r.address.eq_ignore_ascii_case(address)).cloned() else {
                    self.fail(format!("{address} is not a recipient of the queued message"));
                    return None;
                };
                stage_facts(&prog, &m, QueueStage::Route(&r), at)
            }
            _ => {
                // A DSN about the last message queued; with none, about a message of this
                // session so far (`bounce:` needs no queued message).
                self.pump();
                let m = match self.queued.last() {
                    Some(m) => m.clone(),
                    None => QueuedMessage {
                        client_ip: self.client.ip().to_string(),
                        session: self.conn.as_ref().map(|c| c.session_record()).unwrap_or_default(),
                        ..QueuedMessage::default()
                    },
                };
                stage_facts(&prog, &m, QueueStage::Bounce { to: address, kind, reason: "test" }, at)
            }
        };
        let mut state = state;
        if stage == Stage::Route {
            // As the queue manager routes: rewritten recipients anew, soft_bounce applied.
            let mut run = crate::routing::RouteRun::new(&prog, facts, state);
            for _ in 0..10_000 {
                match run.step(&prog) {
                    Step::Need(req) => {
                        let a = self.answer(&prog, &req);
                        run.answer(req, a);
                    }
                    Step::Done(v) => return Some(describe(stage, &v)),
                }
            }
            self.fail("the stage did not finish");
            return None;
        }
        let mut run = Run::new(&prog, stage);
        for _ in 0..10_000 {
            match run.step(&prog, &facts, &mut state) {
                Step::Need(req) => {
                    let a = self.answer(&prog, &req);
                    run.answer(req, a);
                }
                Step::Done(v) => return Some(describe(stage, &v)),
            }
        }
        self.fail("the stage did not finish");
        None
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
pub fn describe(stage: Stage, v: &eval::Verdict) -> String {
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
        (Outcome::Reject(r), _) => format!("reject {r}"),
        (Outcome::Tempfail(r), _) => format!("tempfail {r}"),
    };
    parts.push(outcome);
    parts.join("; ")
}
