//! The open-relay proof (B1, R14, R15): a symbolic run of the `connect`, `helo`, `mail`
//! and `rcpt` programs of one listener for a client that is not authenticated, not in
//! `networks`, and sends to a domain that is not local. Everything that client controls
//! (HELO, sender, its reverse name, the recipient's local part and domain, DNS about its
//! own names, STARTTLS, the time it connects) is a free choice; tables and lists the admin
//! keeps are fixed but unknown. Every path through the programs is followed: a test whose
//! result the attacker (or an unknown table) decides forks the path. A path that ends in
//! a 250 to RCPT is then *solved*: concrete values are searched, among candidates built
//! from the policy's own literals, that make every test on the path come out as assumed.
//! A solved path is a relay, with a witness that becomes a transcript.
//!
//! The assumptions are listed in spec/language.md, section 16.1.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use crate::ir::*;

/// Work units per listener before the proof gives up (reported, never silently): one per instruction followed, plus the size of every branch
/// copied. A fraction of a second and a few megabytes at most.
const PATH_BUDGET: usize = 1_000_000;
/// Candidate assignments tried per path.
const SOLVE_BUDGET: usize = 200_000;

/// The domain a counterexample relays to: owned by the attacker, named by no policy.
pub const TARGET: &str = "relay-target.test";
const ATTACKER: &str = "attacker.test";

/// One way through the policy for a listener.
#[derive(Clone, Debug)]
pub struct Relay {
    pub listener: Option<String>,
    /// Each decision on the path: the rule and what happened there.
    pub chain: Vec<(LocId, String)>,
    /// The rule that let the recipient through (the accept, or the access / stop / end).
    pub decided_by: Option<LocId>,
    /// Why: "accepted by `accept`", ...
    pub why: String,
    /// When no rule decided: the setting to blame (`networks`, `warn_only`).
    pub setting: Option<&'static str>,
    /// The counterexample transcript (one case, without a `policy:` line).
    pub transcript: String,
    /// The recipient the witness relays to.
    pub recipient: String,
}

pub enum Verdict {
    Safe,
    Open(Box<Relay>),
    /// The budget ran out: the policy could not be proven either way.
    Unknown(Option<String>),
    /// The listener needs AUTH before MAIL: no unauthenticated client gets that far.
    AuthRequired,
}

/// Prove each listener (the server defaults when there is none).
pub fn prove(prog: &Program) -> Vec<(Option<String>, Verdict)> {
    let mut out = Vec::new();
    if prog.listeners.is_empty() {
        out.push((None, prove_listener(prog, None)));
    } else {
        for l in &prog.listeners {
            out.push((l.name.clone(), prove_listener(prog, Some(l))));
        }
    }
    out
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum TlsOpt {
    Off,
    Starttls,
    Required,
    Implicit,
}

struct Ctx<'a> {
    prog: &'a Program,
    listener: Option<String>,
    ip: IpAddr,
    local_ip: String,
    local_port: u16,
    trusted: bool,
    warn_only: bool,
    tls: TlsOpt,
    local_domains: Vec<String>,
    /// Domain names the policy names (two labels or more): not the attacker's.
    named: Vec<String>,
}

fn word(s: &Settings, name: &str) -> Option<String> {
    match s.option(name) {
        Some(OptValue::Word(w)) | Some(OptValue::Str(w)) => Some(w.to_ascii_lowercase()),
        _ => None,
    }
}

fn all_nets(prog: &Program) -> Vec<Cidr> {
    let mut nets: Vec<Cidr> = prog.lists.iter().flat_map(|l| l.nets.clone()).collect();
    for e in &prog.exprs {
        if let Expr::In { set: SetRef::Nets(n), .. } = e {
            nets.extend(n.iter().copied());
        }
    }
    nets
}

/// A network narrow enough to be a deliberate trust declaration (not "the Internet").
fn narrow(c: &Cidr) -> bool {
    if c.addr.is_ipv4() {
        c.prefix >= 8
    } else {
        c.prefix >= 16
    }
}

/// The attacker's address: outside every narrow network the policy names.
pub fn attacker_ip(prog: &Program) -> IpAddr {
    let nets = all_nets(prog);
    let cands = ["198.51.100.23", "203.0.113.77", "192.0.2.200", "100.64.7.7", "185.199.108.9", "45.33.32.156"];
    for c in cands {
        let ip: IpAddr = c.parse().expect("literal address");
        if !nets.iter().filter(|n| narrow(n)).any(|n| n.contains(ip)) {
            return ip;
        }
    }
    "45.33.32.156".parse().expect("literal address")
}

fn local_domains(prog: &Program) -> Vec<String> {
    match prog.server.option("local_domains") {
        Some(OptValue::ListRef(id)) => prog.lists.get(id.index()).map(|l| l.items.clone()).unwrap_or_default(),
        _ => {
            let host = word(&prog.server, "hostname").unwrap_or_else(|| "mx.test".into());
            vec![host, "localhost".into()]
        }
    }
}

fn named_domains(prog: &Program) -> Vec<String> {
    let mut out = Vec::new();
    let mut add = |s: &str| {
        let d = s.trim().trim_start_matches(['@', '.', '*']).trim_end_matches('.').to_ascii_lowercase();
        let d = match d.rsplit_once('@') {
            Some((_, d)) => d.to_string(),
            None => d,
        };
        if d.contains('.') && !d.contains(' ') && d.split('.').all(|l| !l.is_empty()) && d.parse::<IpAddr>().is_err() {
            out.push(d);
        }
    };
    for s in &prog.strings {
        add(s);
    }
    for l in &prog.lists {
        for i in &l.items {
            add(i);
        }
    }
    out.sort();
    out.dedup();
    out
}

fn prove_listener(prog: &Program, l: Option<&Settings>) -> Verdict {
    let empty = Settings::default();
    let s = l.unwrap_or(&empty);
    let protocol = word(s, "protocol").unwrap_or_else(|| "smtp".into());
    // As the runtime's config: submission and submissions default to `auth required`.
    let auth = word(s, "auth").unwrap_or_else(|| if protocol == "smtp" { "none" } else { "required" }.into());
    if auth == "required" {
        return Verdict::AuthRequired;
    }
    let tls = if protocol == "submissions" {
        TlsOpt::Implicit
    } else {
        match word(s, "tls").as_deref() {
            Some("none") => TlsOpt::Off,
            Some("required") => TlsOpt::Required,
            _ => TlsOpt::Starttls,
        }
    };
    let (local_ip, local_port) = match s.option("address") {
        Some(OptValue::Str(a)) => match a.rsplit_once(':') {
            Some((h, p)) => (h.trim_matches(['[', ']']).to_string(), p.parse().unwrap_or(25)),
            None => (a.clone(), 25),
        },
        _ => ("127.0.0.1".into(), 2525),
    };
    let ip = attacker_ip(prog);
    let trusted = match prog.server.option("networks") {
        Some(OptValue::ListRef(id)) => {
            prog.lists.get(id.index()).is_some_and(|l| l.nets.iter().any(|n| n.contains(ip)))
        }
        _ => ip.is_loopback(),
    };
    let warn_only = matches!(prog.server.option("warn_only"), Some(OptValue::Bool(true)));
    let cx = Ctx {
        prog,
        listener: s.name.clone(),
        ip,
        local_ip: if local_ip == "0.0.0.0" || local_ip == "::" { "192.0.2.25".into() } else { local_ip },
        local_port,
        trusted,
        warn_only,
        tls,
        local_domains: local_domains(prog),
        named: named_domains(prog),
    };
    cx.explore()
}

// ---- paths ----------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum AccessPick {
    NoMatch,
    Ok,
    Relay,
}

#[derive(Clone, Debug)]
struct Path {
    vars: Vec<Option<Template>>,
    assume: Vec<(ExprId, bool, Vec<Option<Template>>)>,
    chain: Vec<(LocId, String)>,
    relay_session: bool,
    relay_tx: bool,
    /// `access` verdicts chosen for the attacker: (stage, table, pick).
    access: Vec<(Stage, TableId, AccessPick)>,
    /// Tables the path looked into (counterexamples give them rows).
    tables: Vec<TableId>,
    /// The `access` rule whose RELAY opened the built-in relay rule.
    granted_by: Option<LocId>,
}

impl Path {
    fn assumed(&self, id: ExprId) -> Option<bool> {
        self.assume.iter().find(|(e, _, _)| *e == id).map(|(_, b, _)| *b)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum End {
    Default,
    Accept,
    Refused,
    Discard,
}

/// Attacker-chosen values.
#[derive(Clone, Debug)]
struct Asg {
    helo: String,
    ehlo: bool,
    name: String,
    ptr: String,
    sender: String,
    local: String,
    domain: String,
    source_route: bool,
    tls: bool,
    hour: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
enum Subj {
    Helo,
    Ehlo,
    Name,
    Ptr,
    Sender,
    Local,
    Domain,
    Route,
    Tls,
    Hour,
}

/// Answers the outside world gives on a path: boolean tests and looked-up values.
#[derive(Clone, Debug, Default)]
struct Orc {
    bools: BTreeMap<String, bool>,
    values: BTreeMap<String, String>,
}

#[derive(Clone, Debug)]
enum V {
    B(bool),
    S(String),
    L(Vec<String>),
    Ip(IpAddr),
    N(f64),
}

impl V {
    fn strings(&self) -> Vec<String> {
        match self {
            V::B(b) => vec![b.to_string()],
            V::S(s) => vec![s.clone()],
            V::L(l) => l.clone(),
            V::Ip(ip) => vec![ip.to_string()],
            V::N(n) => vec![if n.fract() == 0.0 { format!("{}", *n as i64) } else { n.to_string() }],
        }
    }
    fn render(&self) -> String {
        match self {
            V::L(l) => l.join(", "),
            o => o.strings().concat(),
        }
    }
}

use crate::address::{domain_matches, is_fqdn, split};

fn is_subject(f: Fact) -> Option<Subj> {
    use Fact::*;
    Some(match f {
        HeloName => Subj::Helo,
        HeloExtended => Subj::Ehlo,
        ClientName | ClientFcrdns => Subj::Name,
        ClientPtr => Subj::Ptr,
        Sender | SenderLocal | SenderDomain => Subj::Sender,
        RecipientLocal | RecipientDetail => Subj::Local,
        RecipientDomain => Subj::Domain,
        Recipient | RecipientRouting => Subj::Route,
        Tls | TlsVersion | TlsCipher => Subj::Tls,
        TimeHour => Subj::Hour,
        _ => return None,
    })
}

fn is_oracle_fact(f: Fact) -> bool {
    matches!(f, Fact::Spf | Fact::Dkim | Fact::Dmarc | Fact::DmarcPolicy)
}

/// Keys the attacker chooses fresh: an exact-key table cannot hold them.
fn fresh_key(v: &Val) -> bool {
    matches!(v, Val::Fact(Fact::Recipient) | Val::Fact(Fact::RecipientDomain) | Val::Fact(Fact::ClientIp))
}

impl Ctx<'_> {
    fn table_kind(&self, t: TableId) -> &str {
        self.prog.tables.get(t.index()).map(|r| r.kind.as_str()).unwrap_or("")
    }
    fn table_name(&self, t: TableId) -> String {
        self.prog.tables.get(t.index()).map(|r| r.name.clone()).unwrap_or_default()
    }
    fn pattern_table(&self, t: TableId) -> bool {
        matches!(self.table_kind(t), "regexp" | "pcre")
    }

    // ---- exploration --------------------------------------------------------------

    fn explore(&self) -> Verdict {
        let start = Path {
            vars: vec![None; self.prog.vars.len()],
            assume: Vec::new(),
            chain: Vec::new(),
            relay_session: false,
            relay_tx: false,
            access: Vec::new(),
            tables: Vec::new(),
            granted_by: None,
        };
        let mut budget = PATH_BUDGET;
        let mut frontier = vec![start];
        for stage in [Stage::Connect, Stage::Helo, Stage::Mail, Stage::Rcpt] {
            let mut next = Vec::new();
            for p in frontier {
                for (p, end, at) in self.run_stage(stage, p, &mut budget) {
                    let (end, at) = match end {
                        End::Refused if self.warn_only => (End::Default, None),
                        e => (e, at),
                    };
                    if stage != Stage::Rcpt {
                        if matches!(end, End::Default | End::Accept) {
                            next.push(p);
                        }
                        continue;
                    }
                    let why = match end {
                        End::Accept => match at {
                            Some(_) if p.access.iter().any(|a| a.0 == Stage::Rcpt && a.2 != AccessPick::NoMatch) => {
                                "an `access` table entry `To:USER@ OK` (the attacker picks USER) accepts it".to_string()
                            }
                            _ => "the policy accepts it with `accept`".to_string(),
                        },
                        End::Default if self.trusted => format!(
                            "the stage falls off its end and the attacker's address {} is inside `networks`",
                            self.ip
                        ),
                        End::Default if p.relay_session || p.relay_tx => {
                            "the stage falls off its end after an `access` table said RELAY for an attacker-chosen key"
                                .to_string()
                        }
                        _ => continue,
                    };
                    let at = match end {
                        End::Default if !self.trusted => p.granted_by,
                        End::Default => None,
                        _ => at,
                    };
                    if let Some((asg, orc)) = self.solve(&p) {
                        let transcript = self.transcript(&p, &asg, &orc);
                        return Verdict::Open(Box::new(Relay {
                            listener: self.listener.clone(),
                            chain: p.chain.clone(),
                            decided_by: at,
                            why,
                            setting: if self.trusted { Some("networks") } else { None },
                            transcript,
                            recipient: format!("{}@{}", asg.local, asg.domain),
                        }));
                    }
                }
                if budget == 0 {
                    return Verdict::Unknown(self.listener.clone());
                }
            }
            frontier = next;
        }
        Verdict::Safe
    }

    /// Run one stage from the start on one path; every end reached, with the rule that made it.
    fn run_stage(&self, stage: Stage, p: Path, budget: &mut usize) -> Vec<(Path, End, Option<LocId>)> {
        let code = self.prog.stage(stage);
        let mut work = vec![(0usize, p)];
        let mut out = Vec::new();
        while let Some((mut pc, mut p)) = work.pop() {
            loop {
                // Every step costs one unit, so time is bounded whatever the policy.
                if *budget == 0 {
                    return out;
                }
                *budget -= 1;
                let Some(instr) = code.get(pc) else {
                    out.push((p, End::Default, None));
                    break;
                };
                match instr {
                    Instr::Jump(t) => pc = *t as usize,
                    Instr::If { cond, else_pc, loc } => match self.tri(*cond, &p) {
                        Ok(b) => {
                            p.chain.push((*loc, format!("{b}")));
                            pc = if b { pc + 1 } else { *else_pc as usize };
                        }
                        Err(leaf) => {
                            // A branch costs its copy's size, so memory is bounded too: a
                            // policy of thousands of attacker-decided rules exhausts the
                            // budget (reported as unproven) instead of the machine.
                            let cost = p.chain.len() + p.assume.len() + p.vars.len() + 1;
                            if *budget <= cost {
                                *budget = 0;
                                return out;
                            }
                            *budget -= cost;
                            let mut q = p.clone();
                            q.assume.push((leaf, false, q.vars.clone()));
                            self.note_tables(leaf, &mut q);
                            work.push((pc, q));
                            p.assume.push((leaf, true, p.vars.clone()));
                            self.note_tables(leaf, &mut p);
                        }
                    },
                    Instr::Do { action, loc } => match action {
                        Action::Accept => {
                            p.chain.push((*loc, "accept".into()));
                            out.push((p, End::Accept, Some(*loc)));
                            break;
                        }
                        Action::Reject(_) | Action::Tempfail(_) | Action::RejectCallahead => {
                            p.chain.push((*loc, "refuse".into()));
                            out.push((p, End::Refused, Some(*loc)));
                            break;
                        }
                        Action::Discard => {
                            out.push((p, End::Discard, Some(*loc)));
                            break;
                        }
                        Action::Stop => {
                            p.chain.push((*loc, "stop".into()));
                            out.push((p, End::Default, Some(*loc)));
                            break;
                        }
                        Action::Deliver(_) => {
                            out.push((p, End::Default, Some(*loc)));
                            break;
                        }
                        Action::Set { var, value } => {
                            let t = match value {
                                Some(t) => self.flatten(t, &p.vars),
                                None => Template(vec![]),
                            };
                            if let Some(slot) = p.vars.get_mut(var.index()) {
                                *slot = Some(t);
                            }
                            p.chain.push((*loc, "set".into()));
                            pc += 1;
                        }
                        Action::Unset(var) => {
                            if let Some(slot) = p.vars.get_mut(var.index()) {
                                *slot = None;
                            }
                            pc += 1;
                        }
                        Action::Access(t) if matches!(stage, Stage::Mail | Stage::Rcpt) => {
                            // From: keys are the attacker's sender; To: keys include `USER@`,
                            // whose USER the attacker picks. The file may hold any of them.
                            if !p.tables.contains(t) {
                                p.tables.push(*t);
                            }
                            for pick in [AccessPick::Ok, AccessPick::Relay] {
                                let mut q = p.clone();
                                q.access.push((stage, *t, pick));
                                let w = if pick == AccessPick::Ok { "OK" } else { "RELAY" };
                                q.chain.push((*loc, format!("access says {w}")));
                                if pick == AccessPick::Relay && stage == Stage::Mail {
                                    q.relay_tx = true;
                                    q.granted_by = Some(*loc);
                                }
                                out.push((q, End::Accept, Some(*loc)));
                            }
                            p.access.push((stage, *t, AccessPick::NoMatch));
                            pc += 1;
                        }
                        _ => pc += 1,
                    },
                }
            }
        }
        out
    }

    fn note_tables(&self, leaf: ExprId, p: &mut Path) {
        let mut ts = Vec::new();
        self.tables_of(leaf, &mut ts);
        for t in ts {
            if !p.tables.contains(&t) {
                p.tables.push(t);
            }
        }
    }

    fn tables_of(&self, id: ExprId, out: &mut Vec<TableId>) {
        fn val(v: &Val, out: &mut Vec<TableId>) {
            if let Val::Lookup { table, key } = v {
                out.push(*table);
                val(key, out);
            }
        }
        match self.prog.expr(id) {
            Expr::In { lhs, set } => {
                val(lhs, out);
                if let SetRef::Table(t) = set {
                    out.push(*t);
                }
            }
            Expr::Match { lhs, .. }
            | Expr::Pattern { lhs, .. }
            | Expr::Cmp { lhs, .. }
            | Expr::IsNull(lhs)
            | Expr::Truth(lhs)
            | Expr::Fqdn(lhs)
            | Expr::Resolvable(lhs) => val(lhs, out),
            Expr::LoginMismatch(t) => out.push(*t),
            _ => {}
        }
    }

    /// Replace `${var.X}` by the variable's own template (variables hold templates).
    fn flatten(&self, t: &Template, vars: &[Option<Template>]) -> Template {
        let mut parts = Vec::new();
        for p in &t.0 {
            match p {
                Part::Val(Val::Var(id)) => {
                    if let Some(Some(inner)) = vars.get(id.index()) {
                        parts.extend(inner.0.iter().cloned());
                    }
                }
                other => parts.push(other.clone()),
            }
        }
        Template(parts)
    }

    /// Three-valued evaluation: the value, or the first leaf the attacker decides.
    fn tri(&self, id: ExprId, p: &Path) -> Result<bool, ExprId> {
        match self.prog.expr(id) {
            Expr::Const(b) => Ok(*b),
            Expr::Not(i) => self.tri(*i, p).map(|b| !b),
            Expr::All(ids) => {
                for i in ids {
                    if !self.tri(*i, p)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            Expr::Any(ids) => {
                for i in ids {
                    if self.tri(*i, p)? {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
            leaf => {
                if let Some(b) = p.assumed(id) {
                    return Ok(b);
                }
                if self.leaf_free(leaf, &p.vars) {
                    return Err(id);
                }
                let mut orc = Orc::default();
                Ok(self.leaf(leaf, &self.default_asg(), &p.vars, &mut orc, None))
            }
        }
    }

    fn val_free(&self, v: &Val, vars: &[Option<Template>]) -> bool {
        match v {
            Val::Fact(f) => is_subject(*f).is_some() || is_oracle_fact(*f),
            Val::Var(id) => match vars.get(id.index()) {
                Some(Some(t)) => t.0.iter().any(|p| match p {
                    Part::Val(v) => self.val_free(v, vars),
                    Part::Lit(_) => false,
                }),
                _ => false,
            },
            Val::Lookup { .. } => true,
            _ => false,
        }
    }

    fn leaf_free(&self, e: &Expr, vars: &[Option<Template>]) -> bool {
        let tpl_free = |ts: &[Template]| {
            ts.iter().any(|t| {
                t.0.iter().any(|p| match p {
                    Part::Val(v) => self.val_free(v, vars),
                    Part::Lit(_) => false,
                })
            })
        };
        match e {
            Expr::Match { lhs, rhs, .. } => self.val_free(lhs, vars) || tpl_free(rhs),
            Expr::Pattern { lhs, .. }
            | Expr::Cmp { lhs, .. }
            | Expr::IsNull(lhs)
            | Expr::Truth(lhs)
            | Expr::Fqdn(lhs) => self.val_free(lhs, vars),
            Expr::In { lhs, set } => self.val_free(lhs, vars) || matches!(set, SetRef::Table(_)),
            Expr::Dnsbl { .. } | Expr::Rhsbl { .. } | Expr::Resolvable(_) | Expr::Callahead | Expr::Greylist { .. } => {
                true
            }
            _ => false,
        }
    }

    fn default_asg(&self) -> Asg {
        Asg {
            helo: ATTACKER.into(),
            ehlo: true,
            name: "unknown".into(),
            ptr: String::new(),
            sender: format!("user@{ATTACKER}"),
            local: "victim".into(),
            domain: TARGET.into(),
            source_route: false,
            tls: self.tls == TlsOpt::Implicit || self.tls == TlsOpt::Required,
            hour: 0,
        }
    }

    // ---- concrete evaluation --------------------------------------------------------

    fn fact(&self, f: Fact, a: &Asg, orc: &Orc) -> V {
        use Fact::*;
        let s = |x: &str| V::S(x.to_string());
        let rcpt = format!("{}@{}", a.local, a.domain);
        match f {
            True => V::B(true),
            False => V::B(false),
            ClientIp => V::Ip(self.ip),
            ClientPort => V::N(40000.0),
            ClientName => s(&a.name),
            ClientPtr => s(&a.ptr),
            ClientFcrdns => V::B(a.name != "unknown"),
            LocalIp => V::Ip(self.local_ip.parse().unwrap_or(self.ip)),
            LocalPort => V::N(self.local_port as f64),
            Listener => s(self.listener.as_deref().unwrap_or("")),
            Tls => V::B(a.tls),
            TlsVersion => s(if a.tls { "TLSv1.3" } else { "" }),
            HeloName => s(&a.helo),
            HeloExtended => V::B(a.ehlo),
            Sender => s(&a.sender),
            SenderLocal => s(split(&a.sender).0),
            SenderDomain => V::S(split(&a.sender).1),
            MailBody => s("7BIT"),
            Recipient => V::S(rcpt),
            RecipientLocal => s(&a.local),
            RecipientDomain => s(&a.domain),
            RecipientDetail => s(a.local.split_once('+').map(|x| x.1).unwrap_or("")),
            RecipientIsLocal => V::B(false),
            RecipientRouting => V::B(a.source_route || a.local.contains(['%', '!', '@'])),
            DsnNotify | Recipients | AttachmentNames | AttachmentTypes => V::L(vec![]),
            Spf | Dkim | Dmarc | DmarcPolicy => {
                V::S(orc.values.get(&format!("auth:{}", f.info().name)).cloned().unwrap_or_else(|| "none".into()))
            }
            TimeHour => V::N(a.hour as f64),
            other => match other.info().ty {
                Ty::Bool => V::B(false),
                Ty::Num | Ty::Size | Ty::Duration => V::N(0.0),
                Ty::List => V::L(vec![]),
                Ty::Ip => V::Ip(self.ip),
                Ty::Str => s(""),
            },
        }
    }

    fn val(&self, v: &Val, a: &Asg, vars: &[Option<Template>], orc: &Orc) -> V {
        match v {
            Val::Fact(f) => self.fact(*f, a, orc),
            Val::Var(id) => V::S(match vars.get(id.index()) {
                Some(Some(t)) => self.render(t, a, vars, orc),
                _ => String::new(),
            }),
            Val::Header(_) => V::L(vec![]),
            Val::Lookup { table, key } => {
                let k = self.val(key, a, vars, orc).render().to_ascii_lowercase();
                V::S(orc.values.get(&format!("lookup:{}:{k}", table.0)).cloned().unwrap_or_default())
            }
            Val::Rate { .. } | Val::Concurrent { .. } => V::N(1.0),
            Val::Score(_) => V::N(0.0),
            Val::Lit(s) => V::S(self.prog.str(*s).to_string()),
        }
    }

    fn render(&self, t: &Template, a: &Asg, vars: &[Option<Template>], orc: &Orc) -> String {
        let mut out = String::new();
        for p in &t.0 {
            match p {
                Part::Lit(s) => out.push_str(self.prog.str(*s)),
                Part::Val(v) => out.push_str(&self.val(v, a, vars, orc).render()),
            }
        }
        out
    }

    /// The oracle key and candidate values of the looked-up value a leaf compares, if any.
    fn value_oracle(&self, e: &Expr, a: &Asg, vars: &[Option<Template>], orc: &Orc) -> Option<(String, Vec<String>)> {
        let lhs = match e {
            Expr::Match { lhs, .. }
            | Expr::Pattern { lhs, .. }
            | Expr::Cmp { lhs, .. }
            | Expr::IsNull(lhs)
            | Expr::In { lhs, .. } => lhs,
            _ => return None,
        };
        let mut cands = vec![String::new()];
        cands.extend(self.leaf_literals(e, vars));
        match lhs {
            Val::Lookup { table, key } => {
                let k = self.val(key, a, vars, orc).render().to_ascii_lowercase();
                if fresh_key(key) && !self.pattern_table(*table) {
                    return Some((format!("lookup:{}:{k}", table.0), vec![String::new()]));
                }
                Some((format!("lookup:{}:{k}", table.0), cands))
            }
            Val::Fact(f) if is_oracle_fact(*f) => {
                for w in
                    ["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror", "quarantine", "reject"]
                {
                    cands.push(w.into());
                }
                Some((format!("auth:{}", f.info().name), cands))
            }
            _ => None,
        }
    }

    /// Does the leaf come out as `want` (or, with `want` None, what is it) under `a`?
    /// Oracles not yet fixed in `orc` are fixed to give `want`.
    fn leaf(&self, e: &Expr, a: &Asg, vars: &[Option<Template>], orc: &mut Orc, want: Option<bool>) -> bool {
        if let Some(w) = want {
            if let Some((key, cands)) = self.value_oracle(e, a, vars, orc) {
                if !orc.values.contains_key(&key) {
                    for c in cands {
                        orc.values.insert(key.clone(), c);
                        if self.leaf_plain(e, a, vars, orc) == w {
                            return true;
                        }
                    }
                    orc.values.remove(&key);
                    return false;
                }
            }
            if let Some(key) = self.bool_oracle(e, a, vars, orc) {
                return match orc.bools.get(&key) {
                    Some(b) => *b == w,
                    None => {
                        orc.bools.insert(key, w);
                        true
                    }
                };
            }
            return self.leaf_plain(e, a, vars, orc) == w;
        }
        self.leaf_plain(e, a, vars, orc)
    }

    /// Tests the outside world answers yes or no: the key naming the question.
    fn bool_oracle(&self, e: &Expr, a: &Asg, vars: &[Option<Template>], orc: &Orc) -> Option<String> {
        Some(match e {
            Expr::Dnsbl { zone, .. } => format!("dnsbl:{}", self.prog.str(*zone)),
            Expr::Rhsbl { zone, domain, .. } => {
                let d = self.val(domain, a, vars, orc).render().to_ascii_lowercase();
                if d.is_empty() {
                    return None;
                }
                format!("rhsbl:{}:{d}", self.prog.str(*zone))
            }
            Expr::Resolvable(v) => {
                let d = self.val(v, a, vars, orc).render().trim_end_matches('.').to_ascii_lowercase();
                if d.is_empty() {
                    return None;
                }
                format!("resolvable:{d}")
            }
            Expr::Callahead => "callahead".into(),
            Expr::Greylist { .. } => "greylist".into(),
            Expr::In { lhs, set: SetRef::Table(t) } => {
                if fresh_key(lhs) && !self.pattern_table(*t) {
                    return None;
                }
                let k = self.val(lhs, a, vars, orc).strings().first().cloned().unwrap_or_default();
                format!("in:{}:{}", t.0, k.to_ascii_lowercase())
            }
            _ => return None,
        })
    }

    fn leaf_plain(&self, e: &Expr, a: &Asg, vars: &[Option<Template>], orc: &Orc) -> bool {
        match e {
            Expr::Const(b) => *b,
            Expr::Truth(v) => matches!(self.val(v, a, vars, orc), V::B(true)),
            Expr::Match { lhs, op, rhs } => {
                let l = self.val(lhs, a, vars, orc).strings();
                let pats: Vec<String> = rhs.iter().map(|t| self.render(t, a, vars, orc)).collect();
                l.iter().any(|x| {
                    pats.iter().any(|p| match op {
                        MatchOp::Is => x.eq_ignore_ascii_case(p),
                        MatchOp::Contains => x.to_ascii_lowercase().contains(&p.to_ascii_lowercase()),
                    })
                })
            }
            Expr::Pattern { lhs, pats } => {
                let l = self.val(lhs, a, vars, orc).strings();
                l.iter().any(|x| {
                    pats.iter().any(|p| self.prog.patterns.get(p.index()).is_some_and(|p| p.regex.is_match(x)))
                })
            }
            Expr::In { lhs, set } => {
                let l = self.val(lhs, a, vars, orc);
                match set {
                    SetRef::Nets(nets) => match l {
                        V::Ip(ip) => nets.iter().any(|n| n.contains(ip)),
                        o => o
                            .strings()
                            .iter()
                            .filter_map(|s| s.parse().ok())
                            .any(|ip| nets.iter().any(|n| n.contains(ip))),
                    },
                    SetRef::Strings(items) => {
                        l.strings().iter().any(|x| items.iter().any(|i| x.eq_ignore_ascii_case(self.prog.str(*i))))
                    }
                    SetRef::List(id) => {
                        let Some(list) = self.prog.lists.get(id.index()) else {
                            return false;
                        };
                        match (list.kind, l) {
                            (ListKind::Cidr, V::Ip(ip)) => list.nets.iter().any(|n| n.contains(ip)),
                            (ListKind::Cidr, o) => o
                                .strings()
                                .iter()
                                .filter_map(|s| s.parse().ok())
                                .any(|ip| list.nets.iter().any(|n| n.contains(ip))),
                            (ListKind::Domains, o) => {
                                o.strings().iter().any(|x| list.items.iter().any(|p| domain_matches(p, x)))
                            }
                            (ListKind::Strings, o) => {
                                o.strings().iter().any(|x| list.items.iter().any(|i| x.eq_ignore_ascii_case(i)))
                            }
                        }
                    }
                    SetRef::Table(_) => match self.bool_oracle(e, a, vars, orc) {
                        Some(k) => orc.bools.get(&k).copied().unwrap_or(false),
                        None => false,
                    },
                }
            }
            Expr::Cmp { lhs, op, rhs } => {
                let n = match self.val(lhs, a, vars, orc) {
                    V::N(n) => n,
                    V::S(s) => s.trim().parse().unwrap_or(0.0),
                    _ => 0.0,
                };
                match op {
                    CmpOp::Eq => n == *rhs,
                    CmpOp::Ne => n != *rhs,
                    CmpOp::Lt => n < *rhs,
                    CmpOp::Le => n <= *rhs,
                    CmpOp::Gt => n > *rhs,
                    CmpOp::Ge => n >= *rhs,
                }
            }
            Expr::IsNull(v) => match self.val(v, a, vars, orc) {
                V::S(s) => s.is_empty(),
                V::L(l) => l.is_empty(),
                _ => false,
            },
            Expr::Flag(id) => vars.get(id.index()).is_some_and(|v| v.is_some()),
            Expr::Fqdn(v) => is_fqdn(&self.val(v, a, vars, orc).render()),
            Expr::BatvValid | Expr::LoginMismatch(_) => false,
            other => match self.bool_oracle(other, a, vars, orc) {
                Some(k) => orc.bools.get(&k).copied().unwrap_or(false),
                None => false,
            },
        }
    }

    // ---- solving --------------------------------------------------------------------

    fn subjects_of_val(&self, v: &Val, vars: &[Option<Template>], out: &mut HashSet<Subj>) {
        match v {
            Val::Fact(f) => {
                if let Some(s) = is_subject(*f) {
                    out.insert(s);
                    if s == Subj::Route {
                        out.insert(Subj::Local);
                        out.insert(Subj::Domain);
                    }
                }
            }
            Val::Var(id) => {
                if let Some(Some(t)) = vars.get(id.index()) {
                    self.subjects_of_tpl(t, vars, out);
                }
            }
            Val::Lookup { key, .. } => self.subjects_of_val(key, vars, out),
            _ => {}
        }
    }

    fn subjects_of_tpl(&self, t: &Template, vars: &[Option<Template>], out: &mut HashSet<Subj>) {
        for p in &t.0 {
            if let Part::Val(v) = p {
                self.subjects_of_val(v, vars, out);
            }
        }
    }

    fn subjects_of(&self, e: &Expr, vars: &[Option<Template>], out: &mut HashSet<Subj>) {
        match e {
            Expr::Match { lhs, rhs, .. } => {
                self.subjects_of_val(lhs, vars, out);
                for t in rhs {
                    self.subjects_of_tpl(t, vars, out);
                }
            }
            Expr::Pattern { lhs, .. }
            | Expr::Cmp { lhs, .. }
            | Expr::IsNull(lhs)
            | Expr::Truth(lhs)
            | Expr::Fqdn(lhs)
            | Expr::In { lhs, .. }
            | Expr::Resolvable(lhs)
            | Expr::Rhsbl { domain: lhs, .. } => self.subjects_of_val(lhs, vars, out),
            Expr::Callahead | Expr::Greylist { .. } => {
                out.insert(Subj::Local);
                out.insert(Subj::Domain);
            }
            _ => {}
        }
    }

    /// Strings a leaf compares with: list items, literals, samples of its patterns.
    fn leaf_literals(&self, e: &Expr, vars: &[Option<Template>]) -> Vec<String> {
        let mut out = Vec::new();
        let a = self.default_asg();
        let orc = Orc::default();
        match e {
            Expr::Match { rhs, .. } => {
                for t in rhs {
                    out.push(self.render(t, &a, vars, &orc));
                }
            }
            Expr::Pattern { pats, .. } => {
                for p in pats {
                    if let Some(p) = self.prog.patterns.get(p.index()) {
                        out.extend(samples(&p.source));
                    }
                }
            }
            Expr::In { set, .. } => match set {
                SetRef::Strings(items) => out.extend(items.iter().map(|s| self.prog.str(*s).to_string())),
                SetRef::List(id) => {
                    if let Some(l) = self.prog.lists.get(id.index()) {
                        for i in &l.items {
                            match i.strip_prefix('.') {
                                Some(sfx) => out.push(format!("sub.{sfx}")),
                                None => out.push(i.clone()),
                            }
                        }
                    }
                }
                _ => {}
            },
            _ => {}
        }
        out.retain(|s| s.len() < 200);
        out
    }

    fn ownable(&self, name: &str) -> bool {
        let n = name.trim_end_matches('.').to_ascii_lowercase();
        !self.named.iter().any(|d| n == *d || n.ends_with(&format!(".{d}")))
    }

    fn candidates(&self, s: Subj, lits: &[String]) -> Vec<Asg> {
        let base = self.default_asg();
        let mut out = Vec::new();
        let mut push = |f: &dyn Fn(&mut Asg)| {
            let mut a = base.clone();
            f(&mut a);
            out.push(a);
        };
        let strs: Vec<String> = {
            let mut v: Vec<String> = lits.iter().filter(|s| !s.is_empty()).cloned().collect();
            v.sort();
            v.dedup();
            v
        };
        let bare = |s: &str| s.trim_matches(['@', '.', '*']).to_string();
        let joined = strs.iter().map(|s| bare(s)).collect::<Vec<_>>().join("");
        match s {
            Subj::Helo | Subj::Ptr | Subj::Name => {
                let mut names = vec![format!("host.{ATTACKER}")];
                if s == Subj::Name {
                    names.push("unknown".into());
                } else {
                    names.push(String::new());
                }
                for l in &strs {
                    names.push(bare(l));
                    if l.starts_with('.') {
                        names.push(format!("host{l}"));
                    } else {
                        names.push(format!("host.{}", bare(l)));
                    }
                    names.push(format!("{}.{ATTACKER}", bare(l)));
                    names.push(format!("{}{ATTACKER}", l.trim_start_matches('*')));
                }
                if !joined.is_empty() {
                    names.push(format!("{joined}.{ATTACKER}"));
                }
                for n in names {
                    if s == Subj::Name && n != "unknown" && !(is_fqdn(&n) && self.ownable(&n)) {
                        continue;
                    }
                    match s {
                        Subj::Helo => push(&|a| a.helo = n.clone()),
                        Subj::Ptr => push(&|a| a.ptr = n.clone()),
                        _ => push(&|a| a.name = n.clone()),
                    }
                }
            }
            Subj::Sender => {
                let mut addrs = vec![format!("user@{ATTACKER}"), String::new()];
                for l in &strs {
                    let b = bare(l);
                    if l.contains('@') && !l.starts_with('@') && !l.ends_with('@') {
                        addrs.push(l.clone());
                    }
                    if l.ends_with('@') {
                        addrs.push(format!("{l}{ATTACKER}"));
                    }
                    if b.contains('.') {
                        addrs.push(format!("user@{b}"));
                        addrs.push(format!("user@sub.{b}"));
                    } else if !b.is_empty() {
                        addrs.push(format!("{b}@{ATTACKER}"));
                        addrs.push(format!("user@{b}.{ATTACKER}"));
                    }
                }
                for x in addrs {
                    if x.contains(' ') {
                        continue;
                    }
                    push(&|a| a.sender = x.clone());
                }
            }
            Subj::Local => {
                let mut locals = vec!["victim".to_string(), format!("victim%{TARGET}")];
                for l in &strs {
                    let b = l.trim_end_matches('@').to_string();
                    if !b.contains('@') && !b.is_empty() {
                        locals.push(b.clone());
                        locals.push(format!("victim%{b}"));
                    }
                }
                for x in locals {
                    if x.contains([' ', '<', '>', '"', '\\']) || x.starts_with('.') {
                        continue;
                    }
                    push(&|a| a.local = x.clone());
                }
            }
            Subj::Domain => {
                let mut doms = vec![TARGET.to_string()];
                for l in &strs {
                    let b = bare(l);
                    let b = match b.rsplit_once('@') {
                        Some((_, d)) => d.to_string(),
                        None => b,
                    };
                    if b.is_empty() {
                        continue;
                    }
                    doms.push(b.clone());
                    doms.push(format!("{b}.{TARGET}"));
                    doms.push(format!("{}.{b}", TARGET.split('.').next().unwrap_or("x")));
                }
                for d in doms {
                    if !is_fqdn(&d) || !self.ownable(&d) || self.local_domains.iter().any(|p| domain_matches(p, &d)) {
                        continue;
                    }
                    push(&|a| a.domain = d.clone());
                }
            }
            Subj::Route => {
                push(&|a| a.source_route = false);
                push(&|a| a.source_route = true);
            }
            Subj::Ehlo => {
                push(&|a| a.ehlo = true);
                push(&|a| a.ehlo = false);
            }
            Subj::Tls => match self.tls {
                TlsOpt::Off => push(&|a| a.tls = false),
                TlsOpt::Required | TlsOpt::Implicit => push(&|a| a.tls = true),
                TlsOpt::Starttls => {
                    push(&|a| a.tls = false);
                    push(&|a| a.tls = true);
                }
            },
            Subj::Hour => {
                for h in 0..24 {
                    push(&|a| a.hour = h);
                }
            }
        }
        out
    }

    fn merge(s: Subj, into: &mut Asg, from: &Asg) {
        match s {
            Subj::Helo => into.helo = from.helo.clone(),
            Subj::Ehlo => into.ehlo = from.ehlo,
            Subj::Name => into.name = from.name.clone(),
            Subj::Ptr => into.ptr = from.ptr.clone(),
            Subj::Sender => into.sender = from.sender.clone(),
            Subj::Local => into.local = from.local.clone(),
            Subj::Domain => into.domain = from.domain.clone(),
            Subj::Route => into.source_route = from.source_route,
            Subj::Tls => into.tls = from.tls,
            Subj::Hour => into.hour = from.hour,
        }
    }

    /// Find attacker values and outside answers that make every test on the path come
    /// out as assumed.
    fn solve(&self, p: &Path) -> Option<(Asg, Orc)> {
        let mut subjects = HashSet::new();
        let mut lits: HashMap<Subj, Vec<String>> = HashMap::new();
        for (id, _, vars) in &p.assume {
            let e = self.prog.expr(*id);
            let mut here = HashSet::new();
            self.subjects_of(e, vars, &mut here);
            let l = self.leaf_literals(e, vars);
            for s in &here {
                lits.entry(*s).or_default().extend(l.iter().cloned());
            }
            subjects.extend(here);
        }
        if p.access.iter().any(|a| a.2 != AccessPick::NoMatch) {
            subjects.insert(Subj::Sender);
        }
        let mut subjects: Vec<Subj> = subjects.into_iter().collect();
        subjects.sort();
        let cands: Vec<Vec<Asg>> =
            subjects.iter().map(|s| self.candidates(*s, lits.get(s).map(Vec::as_slice).unwrap_or(&[]))).collect();
        if cands.iter().any(Vec::is_empty) {
            return None;
        }
        let mut idx = vec![0usize; cands.len()];
        let mut tries = 0;
        loop {
            tries += 1;
            if tries > SOLVE_BUDGET {
                return None;
            }
            let mut a = self.default_asg();
            for (k, s) in subjects.iter().enumerate() {
                Self::merge(*s, &mut a, &cands[k][idx[k]]);
            }
            if let Some(orc) = self.check(p, &a) {
                return Some((a, orc));
            }
            // next combination
            let mut k = 0;
            loop {
                if k == idx.len() {
                    return None;
                }
                idx[k] += 1;
                if idx[k] < cands[k].len() {
                    break;
                }
                idx[k] = 0;
                k += 1;
            }
        }
    }

    fn check(&self, p: &Path, a: &Asg) -> Option<Orc> {
        if self.local_domains.iter().any(|d| domain_matches(d, &a.domain)) || a.domain.is_empty() {
            return None;
        }
        let mut orc = Orc::default();
        for (id, want, vars) in &p.assume {
            if !self.leaf(self.prog.expr(*id), a, vars, &mut orc, Some(*want)) {
                return None;
            }
        }
        Some(orc)
    }

    // ---- the counterexample -----------------------------------------------------------

    fn transcript(&self, p: &Path, a: &Asg, orc: &Orc) -> String {
        let mut t = String::new();
        let rcpt = format!("{}@{}", a.local, a.domain);
        let name = self.listener.as_deref().unwrap_or("the default listener");
        t.push_str(&format!(
            "# Written by `mailc check --emit-counterexample`: a client that is not\n# authenticated and not in `networks` relays to {rcpt} through {name}.\n"
        ));
        t.push_str(&format!("case: open relay through {name}\n"));
        if let Some(l) = &self.listener {
            t.push_str(&format!("listener: {l}\n"));
        }
        t.push_str(&format!("client: {}\n", self.ip));
        if a.name != "unknown" {
            t.push_str(&format!("client-name: {}\n", a.name));
        }
        if !a.ptr.is_empty() {
            t.push_str(&format!("client-ptr: {}\n", a.ptr));
        }
        if self.tls == TlsOpt::Implicit {
            t.push_str("tls: implicit\n");
        }
        t.push_str(&format!("clock: 2026-01-01T{:02}:00:00Z\n", a.hour));
        for (k, b) in &orc.bools {
            let (kind, rest) = k.split_once(':').unwrap_or((k, ""));
            match (kind, *b) {
                ("dnsbl", true) => {
                    let rev = reverse_ip(self.ip);
                    t.push_str(&format!("dns: {rev}.{rest} A 127.0.0.2\n"));
                }
                ("rhsbl", true) => {
                    let (zone, d) = rest.split_once(':').unwrap_or((rest, ""));
                    t.push_str(&format!("dns: {d}.{zone} A 127.0.0.2\n"));
                }
                ("resolvable", true) => t.push_str(&format!("dns: {rest} A 192.0.2.53\n")),
                ("callahead", b) => t.push_str(&format!(
                    "callahead: {rcpt} => {}\n",
                    if b { "250 2.1.5 Ok" } else { "550 5.1.1 No such user" }
                )),
                ("in", true) => {
                    let (tid, key) = rest.split_once(':').unwrap_or((rest, ""));
                    if let Ok(tid) = tid.parse::<u32>() {
                        t.push_str(&self.row(TableId(tid), key, "yes"));
                    }
                }
                _ => {}
            }
        }
        for (k, v) in &orc.values {
            if let Some(rest) = k.strip_prefix("lookup:") {
                let (tid, key) = rest.split_once(':').unwrap_or((rest, ""));
                if !v.is_empty() {
                    if let Ok(tid) = tid.parse::<u32>() {
                        t.push_str(&self.row(TableId(tid), key, v));
                    }
                }
            } else if let Some(f) = k.strip_prefix("auth:") {
                let line = match f {
                    "spf" => "spf",
                    "dkim" => "dkim",
                    "dmarc" => "dmarc",
                    _ => "dmarc-policy",
                };
                t.push_str(&format!("{line}: {v}\n"));
            }
        }
        for (stage, table, pick) in &p.access {
            let w = match pick {
                AccessPick::NoMatch => continue,
                AccessPick::Ok => "OK",
                AccessPick::Relay => "RELAY",
            };
            let key = match stage {
                Stage::Mail if a.sender.is_empty() => "from:<>".to_string(),
                Stage::Mail => format!("from:{}", a.sender.to_ascii_lowercase()),
                _ => format!("to:{}@", a.local.to_ascii_lowercase()),
            };
            t.push_str(&format!("table {}: {key} => {w}\n", self.table_name(*table)));
        }
        // Every table the path reads gets rows, so the case does not depend on files.
        for tid in &p.tables {
            let kind = self.table_kind(*tid);
            let dummy = match kind {
                "cidr" => format!("table {}: 192.0.2.255/32 => DUNNO\n", self.table_name(*tid)),
                "regexp" | "pcre" => {
                    format!("table {}: /^mailc-counterexample-unused$/ => DUNNO\n", self.table_name(*tid))
                }
                "list" => format!("table {}: mailc-counterexample.invalid\n", self.table_name(*tid)),
                _ => format!("table {}: mailc-counterexample.invalid => DUNNO\n", self.table_name(*tid)),
            };
            t.push_str(&dummy);
        }
        let greylisted = orc.bools.get("greylist") == Some(&false);
        let mut dialogue = String::new();
        let hello = if a.ehlo { "EHLO" } else { "HELO" };
        dialogue.push_str(&format!("S: 220 *\nC: {hello} {}\nS: 250 *\n", a.helo));
        if a.tls && self.tls != TlsOpt::Implicit {
            dialogue.push_str(&format!("C: STARTTLS\nS: 220 *\nC: {hello} {}\nS: 250 *\n", a.helo));
        }
        dialogue.push_str(&format!("C: MAIL FROM:<{}>\nS: 250 *\n", a.sender));
        let route = if a.source_route { format!("@hop.{ATTACKER}:") } else { String::new() };
        if greylisted {
            // The first attempt is greylisted; the retry after the delay passes.
            t.push_str(&dialogue);
            t.push_str(&format!("C: RCPT TO:<{route}{rcpt}>\nS: *\nreconnect\nwait: 1d\n"));
        }
        t.push_str(&dialogue);
        t.push_str(&format!("C: RCPT TO:<{route}{rcpt}>\nS: 250 *\n"));
        t
    }

    fn row(&self, t: TableId, key: &str, value: &str) -> String {
        if self.table_kind(t) == "list" {
            format!("table {}: {key}\n", self.table_name(t))
        } else {
            format!("table {}: {key} => {value}\n", self.table_name(t))
        }
    }
}

fn reverse_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut parts = Vec::new();
            for b in v6.octets().iter().rev() {
                parts.push(format!("{:x}", b & 0xf));
                parts.push(format!("{:x}", b >> 4));
            }
            parts.join(".")
        }
    }
}

/// Strings a regular expression (or a glob turned into one) matches, guessed from its
/// source: anchors dropped, `.*` as nothing, `.+`/`.` as one letter, escapes unescaped,
/// the first branch of each alternation.
pub fn samples(source: &str) -> Vec<String> {
    let s = source.trim_start_matches("(?i)");
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    let mut depth_skip = 0usize;
    while let Some(c) = chars.next() {
        if depth_skip > 0 {
            match c {
                '(' => depth_skip += 1,
                ')' => depth_skip -= 1,
                _ => {}
            }
            continue;
        }
        match c {
            '^' | '$' => {}
            '\\' => match chars.next() {
                Some('d') => out.push('1'),
                Some('w') => out.push('a'),
                Some('s') => out.push(' '),
                Some('b') | Some('A') | Some('z') => {}
                Some(n) => out.push(n),
                None => {}
            },
            '.' => match chars.peek() {
                Some('*') => {
                    chars.next();
                }
                Some('+') => {
                    chars.next();
                    out.push('a');
                }
                _ => out.push('a'),
            },
            '*' | '+' | '?' => {}
            '(' => {
                if chars.peek() == Some(&'?') {
                    while let Some(n) = chars.next() {
                        if n == ':' || n == ')' {
                            break;
                        }
                    }
                }
            }
            ')' => {}
            '|' => {
                // Keep the first branch: skip to the end of the group.
                depth_skip = 1;
            }
            '[' => {
                let mut first = None;
                for n in chars.by_ref() {
                    if n == ']' {
                        break;
                    }
                    if first.is_none() && n != '^' {
                        first = Some(n);
                    }
                }
                out.push(first.unwrap_or('a'));
            }
            '{' => {
                for n in chars.by_ref() {
                    if n == '}' {
                        break;
                    }
                }
            }
            c => out.push(c),
        }
    }
    vec![out]
}
