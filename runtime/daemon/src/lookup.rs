//! How the daemon answers the evaluator's requests: DNS through hickory-resolver, file
//! tables re-read when they change, rate counters, concurrent counts, the greylist and
//! call-ahead answers from the state store (`state.rs`: in memory, or shared in Redis),
//! BATV with the policy's keys. Every network lookup has a time-out; a failure is an error answer,
//! which the evaluator turns into a 4xx unless the policy chose to fail open.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::proto::{NoRecords, ProtoErrorKind};
use hickory_resolver::TokioResolver;
use mailpolicy_lang::ir::{Program, Resource, TransportKind};
use mailpolicy_lang::resources::{Options, TableOptions};

use super::ldap::LdapTable;
use super::sql::{ListStatement, SqlTable};
use mailpolicy_stdlib::{batv, tables::FileTable};

use crate::eval::{Answer, Request, RrType};

struct Loaded {
    /// The source's and its compiled table's modification times (`compiled::stamp`).
    modified: super::compiled::Stamp,
    checked: std::time::Instant,
    table: Result<FileTable, String>,
}

/// The answers of [`Lookups::dns`], each until its own TTL ends (a positive answer until
/// the resolver's `valid_until`, a negative one for the remaining negative TTL the
/// resolver's cache reports, never longer than that cache keeps it): a DNSBL or RHSBL test
/// repeated for every message from the same client or sender domain costs a hash lookup,
/// not a name parse and a cache query in the resolver. Timeouts and errors are not kept.
#[derive(Default)]
struct DnsMemo {
    /// One map per record type, by the name as asked.
    by_type: [HashMap<String, (Answer, Instant)>; 5],
}

/// At most this many memoised answers per record type. A full map drops its expired
/// answers, and all of them when more than half are still live (so each answer costs at
/// most one more step of such a sweep, whatever the traffic).
const DNS_MEMO_MAX: usize = 4096;

impl DnsMemo {
    fn slot(rtype: RrType) -> usize {
        match rtype {
            RrType::A => 0,
            RrType::Aaaa => 1,
            RrType::Mx => 2,
            RrType::Txt => 3,
            RrType::Ptr => 4,
        }
    }

    fn get(&self, name: &str, rtype: RrType, now: Instant) -> Option<Answer> {
        let (answer, until) = self.by_type.get(Self::slot(rtype))?.get(name)?;
        (now < *until).then(|| answer.clone())
    }

    fn put(&mut self, name: &str, rtype: RrType, answer: Answer, until: Instant, now: Instant) {
        if until <= now {
            return;
        }
        let Some(map) = self.by_type.get_mut(Self::slot(rtype)) else { return };
        if map.len() >= DNS_MEMO_MAX {
            map.retain(|_, (_, u)| *u > now);
            if map.len() > DNS_MEMO_MAX / 2 {
                map.clear();
            }
        }
        map.insert(name.to_string(), (answer, until));
    }
}

/// The daemon's answers to evaluator requests. Shared by every session.
pub struct Lookups {
    resolver: TokioResolver,
    dns_memo: Mutex<DnsMemo>,
    dns_timeout: Duration,
    lookup_timeout: Duration,
    policy_dir: PathBuf,
    tables: Mutex<HashMap<String, Loaded>>,
    /// Rate windows, concurrent counts, greylist triplets, call-ahead answers, alert windows.
    pub state: super::state::StateStore,
    /// Resolved secret values by name.
    secrets: HashMap<String, String>,
    hostname: String,
    local_domains: Vec<String>,
    mx_resolver: std::sync::Arc<dyn crate::transport::mx::Resolver>,
    callahead_sessions: std::sync::Arc<crate::transport::driver::ConnectionCache>,
    /// SPF, DKIM, DMARC (R25, B7).
    pub sender_auth: super::auth::SenderAuth,
    /// DKIM signing of our users' mail, when configured.
    pub signer: Option<super::auth::Signer>,
    /// Connections of SQL tables.
    sql: super::sql::Pool,
    /// Bound connections of LDAP tables.
    ldap: super::ldap::Pool,
    /// The policy and the file tables' contents its open-relay proof used.
    proven: Option<(Program, Mutex<crate::proven::Proven>)>,
}

/// Read every declared secret (environment variable or file). A missing secret is an
/// error at start-up, not at the first message.
pub fn resolve_secrets(prog: &Program, policy_dir: &Path) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    for s in &prog.secrets {
        let src = s.source.clone().unwrap_or_default();
        let value = match s.kind.as_str() {
            "env" => {
                std::env::var(&src).map_err(|_| format!("secret {}: environment variable {src} is not set", s.name))?
            }
            _ => {
                let path = policy_dir.join(&src);
                std::fs::read_to_string(&path)
                    .map_err(|e| format!("secret {}: {}: {e}", s.name, path.display()))?
                    .trim_end_matches(['\r', '\n'])
                    .to_string()
            }
        };
        out.insert(s.name.clone(), value);
    }
    Ok(out)
}

impl Lookups {
    /// The daemon's next-hop resolver (the one resolver of [`Lookups::new`]).
    pub fn mx_resolver(&self) -> std::sync::Arc<dyn crate::transport::mx::Resolver> {
        self.mx_resolver.clone()
    }

    /// `proven`: the file tables' contents the policy's open-relay proof read (from
    /// [`crate::load_policy`]); None reads them now.
    pub fn new(prog: &Program, policy_dir: &Path, proven: Option<crate::proven::Proven>) -> Result<Lookups, String> {
        let secrets = resolve_secrets(prog, policy_dir)?;
        let signer = super::auth::Signer::from_program(prog, &|name: &str| secrets.get(name).cloned())?;
        let hostname = crate::config::hostname(prog, None, &super::machine_hostname());
        let state_password = prog
            .server
            .state_password
            .and_then(|id| prog.secrets.get(id.index()))
            .and_then(|s| secrets.get(&s.name).cloned());
        let dns_timeout = prog.server.dns_timeout;
        // One resolver and one cache for every DNS client of the daemon: policy lookups
        // (DNSBLs, ...), SPF/DKIM/DMARC, call-ahead and the queue manager's MX lookups.
        let resolver = crate::transport::mx::policy_resolver(prog)?;
        let mx_resolver: std::sync::Arc<dyn crate::transport::mx::Resolver> =
            std::sync::Arc::new(crate::transport::mx::HickoryResolver::from_resolver(resolver.clone()));
        let sender_auth = super::auth::SenderAuth::new(prog, &hostname, resolver.clone());
        // The open-relay proof read the file tables; a change to one is proven again before
        // it is used (B1: no table edit turns the server into an open relay unchecked).
        let proven = proven.unwrap_or_else(|| crate::proven::Proven::read(prog, policy_dir));
        let proven = Some((prog.clone(), Mutex::new(proven)));
        Ok(Lookups {
            resolver,
            dns_memo: Mutex::new(DnsMemo::default()),
            dns_timeout,
            lookup_timeout: prog.server.lookup_timeout,
            policy_dir: policy_dir.to_path_buf(),
            tables: Mutex::new(HashMap::new()),
            state: super::state::StateStore::new(prog, &hostname, state_password.as_deref())?,
            secrets: secrets.clone(),
            proven,
            local_domains: crate::conn::local_domains(prog, &hostname),
            hostname,
            mx_resolver,
            callahead_sessions: std::sync::Arc::new(crate::transport::driver::ConnectionCache::new(
                Duration::from_secs(30),
            )),
            sender_auth,
            signer,
            sql: super::sql::Pool::new(policy_dir),
            ldap: super::ldap::Pool::default(),
        })
    }

    /// A mailing list's statement on its SQL subscribers table (`members`, `insert`, `delete`).
    pub async fn sql_statement(
        &self,
        prog: &Program,
        t: SqlTable<'_>,
        statement: ListStatement<'_>,
    ) -> Result<Vec<String>, String> {
        self.sql.statement(prog, t, statement, &self.secrets).await
    }

    /// A mailing list's subscribers on its `ldap` table: the group entry's attribute values.
    pub async fn ldap_members(&self, prog: &Program, t: LdapTable<'_>) -> Result<Vec<String>, String> {
        self.ldap.members(prog, t, &self.secrets).await
    }

    /// Add or remove a mailing list's subscriber on its `ldap` table; true when it changed.
    pub async fn ldap_change(
        &self,
        prog: &Program,
        t: LdapTable<'_>,
        add: bool,
        address: &str,
    ) -> Result<bool, String> {
        self.ldap.change(prog, t, add, address, &self.secrets).await
    }

    pub fn secret(&self, name: &str) -> Option<&str> {
        self.secrets.get(name).map(String::as_str)
    }

    pub async fn answer(&self, prog: &Program, req: &Request, now_ms: u64) -> Answer {
        // Lookup latency by back end (the `lookup_duration_seconds` histogram); counters,
        // greylisting and BATV are in memory and not timed.
        let backend = match req {
            Request::Lookup { table, .. } => match prog.tables.get(table.index()).map(|t| &t.options) {
                Some(Options::Ldap(..)) => Some("ldap"),
                Some(Options::Sql(..)) => Some("sql"),
                _ => Some("table"),
            },
            Request::Dns { .. } => Some("dns"),
            Request::Callahead { .. } => Some("callahead"),
            _ => None,
        };
        let started = std::time::Instant::now();
        let a = self.answer_untimed(prog, req, now_ms).await;
        if let Some(b) = backend {
            crate::metrics::get().lookup(b, started.elapsed());
        }
        a
    }

    /// The answer to `req` when it is at hand without waiting (a rate counter in memory, a
    /// DNS answer still in [`DnsMemo`]), timed as [`Lookups::answer`] times it; None when
    /// it takes [`Lookups::answer`]. Saves a session the future and its allocation for the
    /// many counters and DNSBL tests of a large policy.
    pub fn answer_now(&self, req: &Request, now_ms: u64) -> Option<Answer> {
        match req {
            Request::Rate { counter, key, window_ms } => self.state.rate_now(counter.name(), key, *window_ms, now_ms),
            Request::Dns { name, rtype } => {
                let started = Instant::now();
                let a = self.dns_memo.lock().ok().and_then(|m| m.get(name, *rtype, started))?;
                crate::metrics::get().lookup("dns", started.elapsed());
                Some(a)
            }
            _ => None,
        }
    }

    async fn answer_untimed(&self, prog: &Program, req: &Request, now_ms: u64) -> Answer {
        match req {
            Request::Lookup { table, key } => match prog.tables.get(table.index()) {
                Some(t) => {
                    if let Some(l) = LdapTable::of(t, self.lookup_timeout, Options::ldap) {
                        self.ldap.lookup(prog, l, key, &self.secrets).await
                    } else if let Some(s) = SqlTable::of(t, self.lookup_timeout, Options::sql) {
                        self.sql.lookup(prog, s, key, &self.secrets).await
                    } else {
                        self.table(t, key).await
                    }
                }
                None => Answer::Error("no such table".into()),
            },
            Request::Dns { name, rtype } => self.dns(name, *rtype).await,
            Request::Rate { counter, key, window_ms } => self.state.rate(counter.name(), key, *window_ms, now_ms).await,
            Request::Concurrent { key } => self.state.concurrent(key).await,
            Request::Greylist { client, sender, recipient, delay_ms, expire_ms } => {
                self.state.greylist(client, sender, recipient, now_ms, *delay_ms, *expire_ms).await
            }
            Request::BatvValid { address } => {
                let Some(keys) = self.batv_keys(prog) else { return Answer::Error("server has no batv_keys".into()) };
                let lifetime = batv_lifetime_days(prog);
                Answer::Bool(matches!(batv::verify(address, &keys, now_ms, lifetime), batv::Check::Valid(_)))
            }
            // Sender authentication, content scanning and call-ahead are answered by the
            // standard-library back ends; until this build has them they fail, which the
            // evaluator reports as temperror / a temporary failure, never as a pass.
            // The session answers these itself: they need the message and the session.
            // Never asked of this host: in a session `Conn` answers it, and the queue-side
            // stages read the results kept in the message's record (`Facts::recorded_auth`).
            // The session answers scans itself: it has the message.
            Request::Scan { .. } => Answer::Error("a scan needs the message; the session answers it".into()),
            Request::Callahead { recipient, sender } => self.callahead(prog, recipient, sender, now_ms).await,
        }
    }

    /// Call-ahead (R27): route the recipient with the policy's route stage and ask that
    /// next hop (MAIL FROM, RCPT TO, RSET; sessions are reused through the connection
    /// cache). Answers are cached: accepted for an hour, refused for ten minutes, temporary
    /// failures not at all.
    async fn callahead(&self, prog: &Program, recipient: &str, sender: &str, now_ms: u64) -> Answer {
        if let Some((code, text)) = self.state.callahead_get(recipient, now_ms).await {
            return Answer::Reply { code, text };
        }
        // The route stage's facts as the queue manager builds them, for a message not yet sent.
        use crate::record::{stage_facts, InQueue, QueueStage, QueuedMessage};
        let probe = QueuedMessage::probe(sender, recipient, self.local_domains.clone());
        let rcpt = probe.recipients.first().cloned().unwrap_or_default();
        let (facts, mut state) =
            stage_facts(prog, &probe, QueueStage::Probe(&rcpt), InQueue { now_ms, ..InQueue::default() });
        let v =
            Box::pin(super::route::run_stage(prog, self, mailpolicy_lang::ir::Stage::Route, &facts, &mut state)).await;
        let dest = match &v.outcome {
            crate::eval::Outcome::Deliver(t) if matches!(t.kind, TransportKind::Smtp | TransportKind::Lmtp) => {
                t.dest.clone().unwrap_or_default()
            }
            crate::eval::Outcome::Deliver(t) if t.kind == TransportKind::Mx => {
                mailpolicy_stdlib::address::split(recipient).1
            }
            crate::eval::Outcome::Default | crate::eval::Outcome::Accept => {
                mailpolicy_stdlib::address::split(recipient).1
            }
            _ => return Answer::Error("the route stage gives no SMTP next hop to ask".into()),
        };
        let Some(dest) = crate::transport::mx::Destination::parse(&dest) else {
            return Answer::Error(format!("cannot call ahead to \"{dest}\""));
        };
        let from = if sender.is_empty() {
            crate::smtp::ReversePath::Null
        } else {
            crate::smtp::parse_reverse_path(&format!("<{sender}>"), true).unwrap_or(crate::smtp::ReversePath::Null)
        };
        let Ok(to) = crate::smtp::parse_forward_path(&format!("<{recipient}>"), true) else {
            return Answer::Reply { code: 553, text: "5.1.3 Bad recipient address syntax".into() };
        };
        let mut opts = crate::transport::driver::DeliveryOptions::new(self.hostname.clone(), self.mx_resolver.clone());
        opts.cache = Some(self.callahead_sessions.clone());
        opts.timeouts = crate::transport::driver::Timeouts::all(self.lookup_timeout);
        let reply = match tokio::time::timeout(
            self.lookup_timeout * 2,
            crate::transport::driver::call_ahead(&dest, &from, &to, &opts),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => return Answer::Timeout,
        };
        let text = match reply.enhanced {
            Some((a, b, c)) => format!("{a}.{b}.{c} {}", reply.text),
            None => reply.text.clone(),
        };
        let ttl = match reply.code {
            200..=299 => 3_600_000,
            500..=599 => 600_000,
            _ => 0,
        };
        if ttl > 0 {
            self.state.callahead_put(recipient, reply.code, &text, now_ms, ttl).await;
        }
        Answer::Reply { code: reply.code, text }
    }

    pub fn batv_keys(&self, prog: &Program) -> Option<Vec<(u8, Vec<u8>)>> {
        let id = prog.server.batv_keys?;
        let name = &prog.secrets.get(id.index())?.name;
        Some(batv::parse_keys(self.secrets.get(name)?))
    }

    async fn table(&self, t: &Resource, key: &str) -> Answer {
        self.table_sync(t, key)
    }

    /// File tables are in memory (re-read when the file changes), so a lookup never blocks
    /// on the network.
    pub fn table_sync(&self, t: &Resource, key: &str) -> Answer {
        match t.kind.as_str() {
            "list" | "map" | "access" | "cidr" | "regexp" | "pcre" => {}
            other => {
                return Answer::Error(format!("{other} tables are not available in this build (table {})", t.name))
            }
        }
        let Some(source) = &t.source else { return Answer::Error(format!("table {} has no file", t.name)) };
        let path = self.policy_dir.join(source);
        let reload = t.options.table().is_none_or(|o| o.reload);
        let Ok(mut tables) = self.tables.lock() else { return Answer::Error("table cache poisoned".into()) };
        let stale = match tables.get(&t.name) {
            None => true,
            Some(l) if reload && l.checked.elapsed() >= Duration::from_secs(1) => {
                super::compiled::stamp(&path) != l.modified
            }
            Some(_) => false,
        };
        if stale {
            let modified = super::compiled::stamp(&path);
            // Contents are used unproven only when they are what the proof read: the file
            // has not changed since the check (a table loaded again has changed).
            let prove = tables.contains_key(&t.name) || !self.proven_unchanged(t, &path);
            // A compiled table standing for the source (`mailc table compile`) is used as it
            // is; the source's text is still read when it must be proven.
            let (text, table) = match self.compiled(t, &path) {
                Some(table) => {
                    let text = if prove { std::fs::read_to_string(&path).ok().map(Ok) } else { None };
                    (text, Ok(table))
                }
                None => {
                    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()));
                    let table = text.clone().and_then(|text| {
                        FileTable::parse(&t.kind, &text).map_err(|e| format!("{}: {e}", path.display()))
                    });
                    (Some(text), table)
                }
            };
            let refused = match (&text, prove) {
                (Some(Ok(text)), true) => self.reprove(t, text),
                _ => None,
            };
            match refused {
                Some(why) => match tables.get_mut(&t.name) {
                    Some(l) => {
                        eprintln!(
                            "mailc serve: table {} changed but its new contents are refused, the previous ones stay: {why}",
                            t.name
                        );
                        l.modified = modified;
                        l.checked = std::time::Instant::now();
                    }
                    None => {
                        // Changed since the check, before its first use: nothing proven to
                        // keep, so lookups fail (4xx) until the file is mended.
                        let e = format!("table {}: its contents are refused: {why}", t.name);
                        eprintln!("mailc serve: {e}");
                        tables.insert(
                            t.name.clone(),
                            Loaded { modified, checked: std::time::Instant::now(), table: Err(e) },
                        );
                    }
                },
                None => {
                    tables.insert(t.name.clone(), Loaded { modified, checked: std::time::Instant::now(), table });
                }
            }
        } else if let Some(l) = tables.get_mut(&t.name) {
            if l.checked.elapsed() >= Duration::from_secs(1) {
                l.checked = std::time::Instant::now();
            }
        }
        match tables.get(&t.name).map(|l| &l.table) {
            Some(Ok(ft)) => Answer::Value(ft.lookup(key)),
            Some(Err(e)) => Answer::Error(e.clone()),
            None => Answer::Error("table not loaded".into()),
        }
    }

    /// The compiled form of a file table, when it may stand for the source (see
    /// [`super::compiled`]); says why once when one exists and may not.
    fn compiled(&self, t: &Resource, path: &Path) -> Option<FileTable> {
        use super::compiled::Compiled;
        match super::compiled::load(&t.kind, path) {
            Compiled::Absent => None,
            Compiled::Use(table) => Some(table),
            Compiled::Alone(table) => {
                // With no source, nothing says the proof saw these contents: only a table the
                // proof did not read (it was not there at check time) may be one alone.
                let read = self.proven.as_ref().is_some_and(|(prog, proven)| {
                    let idx = prog.tables.iter().position(|x| x.name == t.name);
                    let read = proven.lock().map(|p| idx.and_then(|i| p.rows.get(i)).is_some_and(Option::is_some));
                    read.unwrap_or(true)
                });
                if read {
                    eprintln!(
                        "mailc serve: table {}: {} has no source beside it any more; the proof read that source, so the compiled table is not used",
                        t.name,
                        path.display()
                    );
                    None
                } else {
                    Some(table)
                }
            }
            Compiled::Stale(why) => {
                eprintln!("mailc serve: table {}: the compiled table is not used, the source is read: {why}", t.name);
                None
            }
        }
    }

    /// Prove the policy again with a table's new contents: why they open a relay, if they do.
    fn reprove(&self, t: &Resource, text: &str) -> Option<String> {
        let (prog, proven) = self.proven.as_ref()?;
        let idx = prog.tables.iter().position(|x| x.name == t.name)?;
        let new = mailpolicy_lang::tables::parse_rows(&t.kind, text).ok();
        let mut proven = proven.lock().ok()?;
        if proven.rows.get(idx) == Some(&new) {
            return None;
        }
        // Proven with the new contents in place (no copy of the other tables' rows); put
        // back when refused.
        let old = std::mem::replace(proven.rows.get_mut(idx)?, new);
        let refused = mailpolicy_lang::analysis::relay::prove(prog, &proven.rows).into_iter().find_map(|(l, v)| {
            let who = l.map(|n| format!("listener {n}")).unwrap_or_else(|| "the default listener".into());
            match v {
                mailpolicy_lang::analysis::relay::Verdict::Open(r) => {
                    Some(format!("with them {who} would relay to <{}>: {}", r.recipient, r.why))
                }
                mailpolicy_lang::analysis::relay::Verdict::Undecided { why, .. } => {
                    Some(format!("with them {who} could not be proven not to relay: {why}"))
                }
                _ => None,
            }
        });
        if refused.is_some() {
            if let Some(slot) = proven.rows.get_mut(idx) {
                *slot = old;
            }
        }
        refused
    }

    /// Whether table `t`'s file still holds what the open-relay proof read.
    fn proven_unchanged(&self, t: &Resource, path: &Path) -> bool {
        let Some((prog, proven)) = self.proven.as_ref() else { return true };
        let Some(idx) = prog.tables.iter().position(|x| x.name == t.name) else { return true };
        proven.lock().map(|p| p.unchanged(idx, path)).unwrap_or(false)
    }

    /// One DNS query; NXDOMAIN and "no records" are answers, everything else an error.
    pub async fn dns(&self, name: &str, rtype: RrType) -> Answer {
        let now = Instant::now();
        if let Some(a) = self.dns_memo.lock().ok().and_then(|m| m.get(name, rtype, now)) {
            return a;
        }
        let (answer, until) = self.dns_uncached(name, rtype).await;
        if let (Some(until), Ok(mut m)) = (until, self.dns_memo.lock()) {
            m.put(name, rtype, answer.clone(), until, Instant::now());
        }
        answer
    }

    /// One query through the resolver (and its cache): the answer, and until when it may be
    /// kept (None: not at all).
    async fn dns_uncached(&self, name: &str, rtype: RrType) -> (Answer, Option<Instant>) {
        let rt = match rtype {
            RrType::A => RecordType::A,
            RrType::Aaaa => RecordType::AAAA,
            RrType::Mx => RecordType::MX,
            RrType::Txt => RecordType::TXT,
            RrType::Ptr => RecordType::PTR,
        };
        let fqdn = if name.ends_with('.') { name.to_string() } else { format!("{name}.") };
        // Taken before the query: a negative TTL counted from here ends no later than the
        // resolver's cache entry, which starts when the answer arrives.
        let asked = Instant::now();
        let q = tokio::time::timeout(self.dns_timeout, self.resolver.lookup(fqdn.as_str(), rt)).await;
        match q {
            Err(_) => (Answer::Timeout, None),
            Ok(Ok(lookup)) => {
                let mut out = Vec::new();
                for r in lookup.iter() {
                    match r {
                        RData::A(a) => out.push(a.0.to_string()),
                        RData::AAAA(a) => out.push(a.0.to_string()),
                        RData::MX(mx) => {
                            out.push(format!("{} {}", mx.preference(), mx.exchange().to_utf8().trim_end_matches('.')))
                        }
                        RData::TXT(t) => out.push(
                            t.txt_data().iter().map(|d| String::from_utf8_lossy(d).to_string()).collect::<String>(),
                        ),
                        RData::PTR(p) => out.push(p.0.to_utf8().trim_end_matches('.').to_string()),
                        _ => {}
                    }
                }
                let until = Some(lookup.valid_until());
                if out.is_empty() {
                    (Answer::NxDomain, until)
                } else {
                    (Answer::Records(out), until)
                }
            }
            Ok(Err(e)) => match e.kind() {
                ProtoErrorKind::NoRecordsFound(NoRecords { response_code, negative_ttl, .. })
                    if *response_code == ResponseCode::NXDomain || *response_code == ResponseCode::NoError =>
                {
                    // The resolver's cache reports the whole seconds it still keeps the
                    // answer (a fresh answer: its whole clamped TTL), so this never outlives it.
                    (Answer::NxDomain, negative_ttl.map(|t| asked + Duration::from_secs(u64::from(t))))
                }
                ProtoErrorKind::Timeout => (Answer::Timeout, None),
                _ => (Answer::Error(e.to_string()), None),
            },
        }
    }

    /// Forward-confirmed reverse DNS of a client: (verified name or "unknown", PTR name).
    pub async fn reverse(&self, ip: std::net::IpAddr) -> (String, String) {
        let Some(rev) = crate::eval::reverse_ip(ip) else { return ("unknown".into(), String::new()) };
        let zone = if ip.is_ipv4() { "in-addr.arpa" } else { "ip6.arpa" };
        let ptr = match self.dns(&format!("{rev}.{zone}"), RrType::Ptr).await {
            Answer::Records(r) => r.into_iter().next().unwrap_or_default(),
            _ => return ("unknown".into(), String::new()),
        };
        let rt = if ip.is_ipv4() { RrType::A } else { RrType::Aaaa };
        let confirmed = match self.dns(&ptr, rt).await {
            Answer::Records(r) => r.iter().any(|a| a.parse::<std::net::IpAddr>().ok() == Some(ip)),
            _ => false,
        };
        (if confirmed { ptr.to_ascii_lowercase() } else { "unknown".into() }, ptr)
    }

    pub fn lookup_timeout(&self) -> Duration {
        self.lookup_timeout
    }
}

/// A network table (`ldap`, `sql`) as its pool uses it: its name, its kind's options, its
/// time-out (the table's `timeout`, else the server's `lookup_timeout`).
pub struct NetTable<'a, O> {
    pub name: &'a str,
    pub opts: &'a O,
    pub timeout: Duration,
}

// Copy whatever `O` is: only references and a duration are copied.
impl<O> Clone for NetTable<'_, O> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<O> Copy for NetTable<'_, O> {}

impl<'a, O> NetTable<'a, O> {
    /// `t` if `kind` (`Options::ldap`, `Options::sql`) finds its options, its time-out
    /// resolved against the server's `default`.
    pub fn of(
        t: &'a Resource,
        default: Duration,
        kind: fn(&'a Options) -> Option<(&'a TableOptions, &'a O)>,
    ) -> Option<NetTable<'a, O>> {
        let (common, opts) = kind(&t.options)?;
        Some(NetTable { name: &t.name, opts, timeout: common.timeout_or(default) })
    }
}

pub fn batv_lifetime_days(prog: &Program) -> u64 {
    prog.server.batv_lifetime_days()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// R17/R28: a file table is re-read when the file changes, without a restart.
    #[tokio::test]
    async fn file_tables_reload_when_the_file_changes() {
        let dir = std::env::temp_dir().join(format!("mp-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("users"), "alice@example.com one\n").unwrap();
        let policy = "list local = domains [\"example.com\"];\nserver { local_domains local; }\ntable users = map \"users\";\non rcpt { if recipient in users { accept; } }\n";
        let c = mailpolicy_lang::compile("p.mailpolicy", &mailpolicy_lang::MemLoader::single("p.mailpolicy", policy));
        let prog = c.program.expect("compiles");
        let l = Lookups::new(&prog, &dir, None).expect("lookups");
        let t = &prog.tables[0];
        assert_eq!(l.table_sync(t, "alice@example.com"), Answer::Value(Some("one".into())));
        assert_eq!(l.table_sync(t, "bob@example.com"), Answer::Value(None));
        // A new file (new mtime) with other contents; changes are noticed within a second.
        std::thread::sleep(Duration::from_millis(1100));
        std::fs::write(dir.join("users.new"), "bob@example.com two\n").unwrap();
        std::fs::rename(dir.join("users.new"), dir.join("users")).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(l.table_sync(t, "bob@example.com"), Answer::Value(Some("two".into())));
        assert_eq!(l.table_sync(t, "alice@example.com"), Answer::Value(None));
        // A file that disappears is an error (4xx), never an empty table.
        std::fs::remove_file(dir.join("users")).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        assert!(matches!(l.table_sync(t, "bob@example.com"), Answer::Error(_)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// B1: a table edited after the daemon's check but before its first lookup is proven
    /// then (nothing was loaded before it, so lookups fail until the file is mended); a file
    /// untouched since the check is used without a second proof.
    #[tokio::test]
    async fn a_table_changed_before_its_first_use_is_proven_then() {
        let dir = std::env::temp_dir().join(format!("mp-first-use-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("trusted.cidr"), "192.0.2.0/24 OK\n").unwrap();
        std::fs::write(dir.join("other.cidr"), "192.0.2.0/24 OK\n").unwrap();
        let policy = "list local = domains [\"example.com\"];\nserver { local_domains local; }\ntable trusted = cidr \"trusted.cidr\";\ntable other = cidr \"other.cidr\";\non rcpt { if client.ip in trusted or client.ip in other { accept; } }\n";
        let c = mailpolicy_lang::compile("p.mailpolicy", &mailpolicy_lang::MemLoader::single("p.mailpolicy", policy));
        let prog = c.program.expect("compiles");
        let rows = mailpolicy_lang::analysis::read_tables(&prog, &dir, &mailpolicy_lang::FsLoader { std_dir: None });
        // As if the check had run well after the files were written.
        let began = std::time::SystemTime::now() + Duration::from_secs(60);
        let proven = crate::proven::Proven::after_check(&prog, &dir, rows, began);
        let l = Lookups::new(&prog, &dir, Some(proven)).expect("lookups");
        std::fs::write(dir.join("trusted.new"), "192.0.2.0/24 OK\n0.0.0.0/1 OK\n").unwrap();
        std::fs::rename(dir.join("trusted.new"), dir.join("trusted.cidr")).unwrap();
        let (trusted, other) = (&prog.tables[0], &prog.tables[1]);
        assert!(matches!(l.table_sync(trusted, "45.33.32.156"), Answer::Error(e) if e.contains("refused")));
        assert!(matches!(l.table_sync(trusted, "192.0.2.7"), Answer::Error(_)), "no unproven contents used");
        assert_eq!(l.table_sync(other, "192.0.2.7"), Answer::Value(Some("OK".into())));
        // Mended: taken once proven.
        std::thread::sleep(Duration::from_millis(1100));
        std::fs::write(dir.join("trusted.new"), "198.51.100.0/24 OK\n").unwrap();
        std::fs::rename(dir.join("trusted.new"), dir.join("trusted.cidr")).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(l.table_sync(trusted, "198.51.100.9"), Answer::Value(Some("OK".into())));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// B1: a table the open-relay proof read is proven again when its file changes; new
    /// contents that would open a relay are refused and the previous ones stay.
    #[tokio::test]
    async fn a_table_change_that_opens_a_relay_is_refused() {
        let dir = std::env::temp_dir().join(format!("mp-reprove-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("trusted.cidr"), "192.0.2.0/24 OK\n").unwrap();
        let policy = "list local = domains [\"example.com\"];\nserver { local_domains local; }\ntable trusted = cidr \"trusted.cidr\";\non rcpt { if client.ip in trusted { accept; } }\n";
        let c = mailpolicy_lang::compile("p.mailpolicy", &mailpolicy_lang::MemLoader::single("p.mailpolicy", policy));
        let prog = c.program.expect("compiles");
        let l = Lookups::new(&prog, &dir, None).expect("lookups");
        let t = &prog.tables[0];
        assert_eq!(l.table_sync(t, "192.0.2.7"), Answer::Value(Some("OK".into())));
        // A typo that trusts half the Internet: refused, the old networks stay.
        std::thread::sleep(Duration::from_millis(1100));
        std::fs::write(dir.join("trusted.new"), "192.0.2.0/24 OK\n0.0.0.0/1 OK\n").unwrap();
        std::fs::rename(dir.join("trusted.new"), dir.join("trusted.cidr")).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(l.table_sync(t, "45.33.32.156"), Answer::Value(None), "the wide network was taken");
        assert_eq!(l.table_sync(t, "192.0.2.7"), Answer::Value(Some("OK".into())));
        // A harmless change is taken.
        std::thread::sleep(Duration::from_millis(1100));
        std::fs::write(dir.join("trusted.new"), "198.51.100.0/24 OK\n").unwrap();
        std::fs::rename(dir.join("trusted.new"), dir.join("trusted.cidr")).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(l.table_sync(t, "198.51.100.9"), Answer::Value(Some("OK".into())));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A memoised DNS answer is given until its own expiry and never after; answers of one
    /// name under another type are apart; a full memo drops the expired answers first.
    #[test]
    fn dns_memo_keeps_answers_until_their_expiry() {
        let mut m = DnsMemo::default();
        let t0 = Instant::now();
        let until = t0 + Duration::from_secs(300);
        m.put("2.0.0.127.bl.test", RrType::A, Answer::Records(vec!["127.0.0.2".into()]), until, t0);
        m.put("1.0.0.127.bl.test", RrType::A, Answer::NxDomain, t0 + Duration::from_secs(60), t0);
        assert_eq!(m.get("2.0.0.127.bl.test", RrType::A, t0), Some(Answer::Records(vec!["127.0.0.2".into()])));
        assert_eq!(m.get("2.0.0.127.bl.test", RrType::Txt, t0), None);
        assert_eq!(m.get("1.0.0.127.bl.test", RrType::A, t0 + Duration::from_secs(59)), Some(Answer::NxDomain));
        assert_eq!(m.get("1.0.0.127.bl.test", RrType::A, t0 + Duration::from_secs(60)), None);
        assert_eq!(m.get("2.0.0.127.bl.test", RrType::A, until), None);
        // An answer already expired is not kept.
        m.put("x.test", RrType::Mx, Answer::NxDomain, t0, t0);
        assert_eq!(m.get("x.test", RrType::Mx, t0), None);
        // A full map: its expired answers go, the live ones stay; other types are untouched.
        let soon = t0 + Duration::from_secs(1);
        for i in 0..DNS_MEMO_MAX - 10 {
            m.put(&format!("{i}.old.test"), RrType::Txt, Answer::NxDomain, soon, t0);
        }
        for i in 0..10 {
            m.put(&format!("{i}.live.test"), RrType::Txt, Answer::NxDomain, until, t0);
        }
        let later = t0 + Duration::from_secs(2);
        m.put("new.test", RrType::Txt, Answer::NxDomain, until, later);
        assert_eq!(m.by_type[DnsMemo::slot(RrType::Txt)].len(), 11);
        assert_eq!(m.get("9.live.test", RrType::Txt, later), Some(Answer::NxDomain));
        assert_eq!(m.get("new.test", RrType::Txt, later), Some(Answer::NxDomain));
        assert_eq!(m.get("2.0.0.127.bl.test", RrType::A, later), Some(Answer::Records(vec!["127.0.0.2".into()])));
        // Full of live answers: the map starts again, bounded.
        for i in 0..=DNS_MEMO_MAX {
            m.put(&format!("{i}.many.test"), RrType::Ptr, Answer::NxDomain, until, t0);
        }
        assert!(m.by_type[DnsMemo::slot(RrType::Ptr)].len() <= DNS_MEMO_MAX);
        assert_eq!(m.get(&format!("{DNS_MEMO_MAX}.many.test"), RrType::Ptr, t0), Some(Answer::NxDomain));
    }
}
