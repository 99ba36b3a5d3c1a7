//! The open-relay proof (B1, R14, R15; spec/language.md section 16.1).
//!
//! The question, for each listener: can a client that is not authenticated, connecting
//! from an address the policy does not trust, make the server send a message it wrote to
//! a foreign address it chose? The proof over-approximates every session such a client
//! can have (any number of commands, any values, every answer the world can give about
//! its own names, any count and any greylisting state) and every way the queue can send
//! the message on (the recipient, `redirect`, `bcc`, rewrites, expansions, alerts). Each
//! way that ends with a foreign address chosen by the client is decided exactly for
//! strings (automata), addresses (interval sets) and numbers; one that is possible is a
//! finding with a counterexample transcript, and one the proof cannot decide is an error
//! too. Only a listener with no such way is *proven*.
//!
//! - [`auto`]: automata over bytes, views of an address, product search;
//! - [`sets`]: address and number sets;
//! - [`sym`]: symbols, atoms, constraints and their satisfiability;
//! - [`term`]: symbolic strings and yes/no formulas;
//! - [`explore`]: one stage program run symbolically, with joins; [`facts`] the values of
//!   facts, variables and templates on a path; [`compare`] tests as atoms; [`access`]
//!   access tables;
//! - [`session`]: a whole session, the gaps between the commands that matter, and the
//!   queue side;
//! - [`witness`]: the counterexample transcript.

pub mod access;
pub mod auto;
pub mod compare;
pub mod explore;
pub mod facts;
pub mod session;
pub mod sets;
pub mod sym;
pub mod term;
pub mod witness;

use std::net::IpAddr;

use crate::ir::*;
use crate::settings::{Auth, ClientCerts, Listener, Protocol, Tls};
pub use crate::tables::Rows as Known;
use sets::IpSet;
use sym::{AtomKind, Conj, LangSpec, Lit, Origin, SymKind, View, World};

/// The domain a counterexample relays to: owned by the attacker, named by no policy.
pub const TARGET: &str = "relay-target.test";

/// One way a listener relays.
#[derive(Clone, Debug)]
pub struct Relay {
    pub listener: Option<String>,
    /// Each decision on the path: the rule and what happened there.
    pub chain: Vec<(LocId, String)>,
    /// The rule that let the recipient through (or sent the copy), if one did.
    pub decided_by: Option<LocId>,
    /// Why: "the policy accepts it with `accept`", ...
    pub why: String,
    /// When no rule decided: the setting to blame (`networks`, `warn_only`).
    pub setting: Option<&'static str>,
    /// Counterexample transcripts (one case each, without a `policy:` line), best first.
    pub transcripts: Vec<String>,
    /// The address the witness relays to.
    pub recipient: String,
}

pub enum Verdict {
    /// No client outside the trusted networks can relay.
    Safe,
    Open(Box<Relay>),
    /// A way to relay could not be ruled out, and no counterexample was found: an error.
    Undecided {
        listener: Option<String>,
        why: String,
        chain: Vec<(LocId, String)>,
    },
    /// The listener needs AUTH before MAIL: no unauthenticated client gets that far.
    AuthRequired,
    /// The listener is bound to loopback addresses only: no outside client reaches it.
    LoopbackOnly,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TlsOpt {
    Off,
    Starttls,
    Required,
    Implicit,
}

/// What a listener lets a client do.
#[derive(Clone, Debug)]
pub struct ListenerModel {
    pub name: Option<String>,
    pub local_ip: IpSet,
    pub local_port: u16,
    pub tls: TlsOpt,
    pub auth_offered: bool,
    /// AUTH is offered only under TLS (no `auth_without_tls`).
    pub auth_needs_tls: bool,
    pub mechanisms: Vec<String>,
    /// Client certificates are asked for and any public CA's will do (no `client_ca`).
    pub public_client_certs: bool,
    pub hard_error_limit: u32,
    pub max_recipients: u32,
    /// Addresses a client of this listener can have.
    pub reachable: IpSet,
}

/// Symbols that stay the same for a whole session.
#[derive(Clone, Debug, Default)]
pub struct SessionSyms {
    pub client_ip: sym::SymId,
    pub client_port: sym::SymId,
    pub client_name: sym::SymId,
    pub client_ptr: sym::SymId,
    pub local_ip: sym::SymId,
    pub session_id: sym::SymId,
    pub client_cert: sym::SymId,
    pub fingerprint: sym::SymId,
}

/// The proof for one listener.
pub struct Prover<'p> {
    pub prog: &'p Program,
    pub w: World,
    pub work: usize,
    pub widened: bool,
    pub session: SessionSyms,
    pub listener: ListenerModel,
    /// Pattern of the local domains; of the local and relay domains.
    pub local_domains: Vec<String>,
    pub relay_domains: Vec<String>,
    /// Local and relay domains that are someone's own (not public suffixes).
    pub owned_domains: Vec<String>,
    pub networks: IpSet,
    pub max_message_size: i64,
    pub data_run: u32,
    /// The file tables' contents where they could be read (None: unknown), borrowed:
    /// a table of a million rows is not copied per listener or per test.
    pub tables: &'p [Option<Known>],
    pub helo_lang: LangSpec,
    pub sender_lang: LangSpec,
    pub rcpt_lang: LangSpec,
    pub xtext_lang: LangSpec,
    /// What holds of every session before any command (the client's name, certificate).
    pub root: Conj,
    pub warn_only: bool,
    pub gap_shapes: Vec<session::GapShape>,
    /// What the outside-world symbols stand for (for the counterexample's fixtures).
    pub meanings: Vec<(sym::SymId, witness::Meaning)>,
}

/// A network narrow enough to be a deliberate trust declaration (not "the Internet").
pub fn narrow(c: &Cidr) -> bool {
    if c.addr.is_ipv4() {
        c.prefix >= 8
    } else {
        c.prefix >= 16
    }
}

/// The server's trusted networks (`networks`, default loopback).
pub fn networks(prog: &Program) -> Vec<Cidr> {
    match prog.server.networks {
        Some(id) => prog.lists.get(id.index()).map(|l| l.nets.clone()).unwrap_or_default(),
        None => vec![
            Cidr { addr: IpAddr::from([127, 0, 0, 0]), prefix: 8 },
            Cidr { addr: "::1".parse().unwrap_or(IpAddr::from([0u16; 8])), prefix: 128 },
        ],
    }
}

/// Every network the policy and its tables name.
fn named_networks(prog: &Program, tables: &[Option<Known>]) -> Vec<Cidr> {
    let mut nets: Vec<Cidr> = prog.lists.iter().flat_map(|l| l.nets.clone()).collect();
    for e in &prog.exprs {
        if let Expr::In { set: SetRef::Nets(n), .. } = e {
            nets.extend(n.iter().copied());
        }
    }
    nets.extend(networks(prog));
    for t in tables.iter().flatten() {
        match t {
            Known::Cidr(rows) => nets.extend(rows.iter().map(|(c, _)| *c)),
            Known::Keys(rows) => {
                for (k, _) in rows.iter() {
                    let bare = k.strip_prefix("connect:").unwrap_or(k);
                    if let Ok(ip) = bare.parse::<IpAddr>() {
                        nets.push(Cidr { addr: ip, prefix: if ip.is_ipv4() { 32 } else { 128 } });
                    } else if let Some(set) = access::access_ip_key(bare) {
                        for (a, b) in &set.v4.r {
                            let width = 32 - (b - a).checked_add(1).map(|n| n.trailing_zeros()).unwrap_or(32);
                            nets.push(Cidr { addr: IpAddr::from(std::net::Ipv4Addr::from(*a)), prefix: width as u8 });
                        }
                        for (a, b) in &set.v6.r {
                            let width = 128 - (b - a).checked_add(1).map(|n| n.trailing_zeros()).unwrap_or(128);
                            nets.push(Cidr { addr: IpAddr::from(std::net::Ipv6Addr::from(*a)), prefix: width as u8 });
                        }
                    }
                }
            }
            Known::Patterns(_) => {}
        }
    }
    nets
}

/// Is `d` a public suffix (`com`, `co.uk`): a domain under which anyone can register?
pub fn public_suffix(d: &str) -> bool {
    let d = d.trim_start_matches('.').trim_end_matches('.').to_ascii_lowercase();
    if d.is_empty() {
        return true;
    }
    match psl::suffix(d.as_bytes()) {
        Some(s) => s.is_known() && s.as_bytes() == d.as_bytes(),
        None => false,
    }
}

/// The registrable domains (`example.co.uk` of `mx.example.co.uk`) named in a text (a
/// pattern's escapes undone): a client cannot have a forward-confirmed name under them.
pub fn registrable_names(text: &str) -> Vec<String> {
    let mut t = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.peek() {
                Some('x') => {
                    chars.next();
                    let h: String = chars.by_ref().take(2).collect();
                    match u8::from_str_radix(&h, 16) {
                        Ok(b) if b.is_ascii() => t.push(b as char),
                        _ => t.push(' '),
                    }
                }
                Some('.') => {
                    chars.next();
                    t.push('.');
                }
                _ => t.push(' '),
            }
        } else {
            t.push(c);
        }
    }
    let mut out = Vec::new();
    for tok in t.split(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '-')) {
        let tok = tok.trim_matches('.').to_ascii_lowercase();
        if !tok.contains('.') || tok.parse::<IpAddr>().is_ok() || public_suffix(&tok) {
            continue;
        }
        if let Some(d) = psl::domain(tok.as_bytes()) {
            if let Ok(s) = std::str::from_utf8(d.as_bytes()) {
                out.push(s.to_string());
            }
        }
    }
    out
}

fn list_items(prog: &Program, list: Option<ListId>) -> Option<Vec<String>> {
    list.and_then(|id| prog.lists.get(id.index()).map(|l| l.items.clone()))
}

/// The server's local domains (the runtime's `conn::local_domains`).
pub fn local_domains(prog: &Program) -> Vec<String> {
    list_items(prog, prog.server.local_domains).unwrap_or_else(|| {
        let host = prog.server.hostname.as_deref().map(str::to_ascii_lowercase).unwrap_or_else(|| "mx.test".into());
        vec![host, "localhost".into()]
    })
}

pub fn relay_domains(prog: &Program) -> Vec<String> {
    list_items(prog, prog.server.relay_domains).unwrap_or_default()
}

// Address syntax the SMTP engine accepts (runtime/engine/src/smtp/address.rs), as the display
// form the policy sees: dot-string or quoted local part, domain or address literal.
const ATEXT: &str = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]|[^\x00-\x7f]";
const QUOTED: &str = r#""(?:[ !#-\[\]-~]|[^\x00-\x7f]|\\["\\])*""#;
const LABEL: &str = r"[A-Za-z0-9\x{80}-\x{10FFFF}](?:[A-Za-z0-9\x{80}-\x{10FFFF}\-]*[A-Za-z0-9\x{80}-\x{10FFFF}])?";
const LITERAL: &str = r"\[[!-Z^-~]+\]";

fn address_pattern() -> String {
    format!("(?:(?:{ATEXT})+(?:\\.(?:{ATEXT})+)*|{QUOTED})@(?:{LABEL}(?:\\.{LABEL})*|{LITERAL})")
}

/// A language of this module's own, in the regex crate's Unicode syntax (case as written).
fn policy_lang(p: String) -> LangSpec {
    LangSpec {
        pattern: p,
        syntax: auto::Syntax::Table { case_insensitive: false },
        view: View::Whole,
        prefix: Vec::new(),
        suffix: Vec::new(),
        fast: None,
    }
}

impl<'p> Prover<'p> {
    pub fn new(prog: &'p Program, l: Option<&Listener>, tables: &'p [Option<Known>]) -> Prover<'p> {
        let s = l.unwrap_or_else(|| crate::settings::default_listener());
        let auth = s.auth();
        let tls = if s.protocol == Protocol::Submissions {
            TlsOpt::Implicit
        } else {
            match s.tls() {
                Tls::None => TlsOpt::Off,
                Tls::Required => TlsOpt::Required,
                Tls::Starttls => TlsOpt::Starttls,
            }
        };
        let (bind, local_port): (Option<IpAddr>, u16) = match &s.address {
            Some(a) => match a.rsplit_once(':') {
                Some((h, p)) => (h.trim_matches(['[', ']']).parse().ok(), p.parse().unwrap_or(25)),
                None => (a.parse().ok(), 25),
            },
            _ => (None, 2525),
        };
        // Who can connect: a listener bound to one address family takes that family only
        // ([::] takes both); the default listener is assumed reachable from anywhere.
        let reachable = match bind {
            None => IpSet::full(),
            Some(IpAddr::V4(a)) if a.is_unspecified() => IpSet { v4: sets::Ranges::full(), v6: sets::Ranges::empty() },
            Some(ip) if ip.is_unspecified() => IpSet::full(),
            Some(ip) if ip.is_loopback() => {
                IpSet::of_cidr(&Cidr { addr: ip, prefix: if ip.is_ipv4() { 8 } else { 128 } })
            }
            Some(IpAddr::V4(_)) => IpSet { v4: sets::Ranges::full(), v6: sets::Ranges::empty() },
            Some(IpAddr::V6(_)) => IpSet::full(),
        };
        let local_ip = match bind {
            Some(ip) if !ip.is_unspecified() => IpSet::single(ip),
            _ => IpSet::full(),
        };
        let mechanisms = s.auth_mechanisms.clone();
        let listener = ListenerModel {
            name: l.map(|l| l.name.clone()),
            local_ip,
            local_port,
            tls,
            auth_offered: auth != Auth::None,
            auth_needs_tls: !s.auth_without_tls,
            mechanisms,
            public_client_certs: s.client_certs != ClientCerts::None && s.client_ca.is_none(),
            hard_error_limit: s.hard_error_limit.max(1) as u32,
            max_recipients: s.max_recipients(&prog.server).max(1) as u32,
            reachable,
        };
        let nets = networks(prog);
        let mut trusted = IpSet::empty();
        for c in named_networks(prog, tables) {
            if narrow(&c) {
                trusted = trusted.union(&IpSet::of_cidr(&c));
            }
        }
        let attacker_ips = listener.reachable.minus(&trusted);
        // The relay rule lets every listed domain through, as the runtime does; but a public
        // suffix is no one's own domain, so mail to a name under it is foreign all the same.
        let local = local_domains(prog);
        let mut relay = local.clone();
        relay.extend(relay_domains(prog));
        let owned: Vec<String> = relay.iter().filter(|d| !public_suffix(d)).cloned().collect();
        let mut w = World::default();
        for p in &prog.patterns {
            w.policy_regexes.insert(p.source.clone(), p.regex.clone());
        }
        let session = SessionSyms {
            client_ip: w.sym(Origin::ClientIp, SymKind::Ip(attacker_ips), true),
            client_port: w.sym(Origin::ClientPort, SymKind::Num(sets::NumSet::range(1, 65535)), true),
            client_name: w.sym(
                Origin::ClientName,
                SymKind::Str(Some(LangSpec::bytes(
                    format!("(?:\\A(?:unknown)\\z)|(?:{})", explore::FQDN_SHAPE),
                    View::Whole,
                ))),
                true,
            ),
            client_ptr: w.sym(Origin::ClientPtr, SymKind::Str(None), true),
            local_ip: w.sym(Origin::LocalIp, SymKind::Ip(listener.local_ip.clone()), false),
            session_id: w.sym(Origin::SessionId, SymKind::Str(None), false),
            client_cert: w.sym(Origin::ClientCert, SymKind::Bool, true),
            fingerprint: w.sym(
                Origin::Fingerprint,
                SymKind::Str(Some(policy_lang(r"\A(?:(?:[0-9A-F]{2}:){31}[0-9A-F]{2})?\z".into()))),
                true,
            ),
        };
        // The client's forward-confirmed name is "unknown" or a name in a zone it owns (the
        // solver keeps it out of the domains its tests name: `World::fresh`); nobody
        // chooses a certificate's fingerprint.
        let root = Conj::top();
        w.fresh_name = Some(session.client_name);
        w.fresh_fingerprint = Some(session.fingerprint);
        let _ = (Lit::Or(Vec::new()), AtomKind::True);
        let max_message_size = s.max_message_size(&prog.server) as i64;
        let addr = address_pattern();
        Prover {
            prog,
            w,
            work: 0,
            widened: false,
            session,
            listener,
            local_domains: local,
            relay_domains: relay,
            owned_domains: owned,
            networks: IpSet::of_cidrs(&nets),
            max_message_size,
            data_run: session::RUN_DATA,
            tables,
            helo_lang: policy_lang(r"\A[^\x00-\x20\x7f\x{80}-\x{9f}]+\z".into()),
            sender_lang: policy_lang(format!("\\A(?:{addr})?\\z")),
            rcpt_lang: policy_lang(format!("\\A{addr}\\z")),
            xtext_lang: LangSpec::bytes(String::new(), View::Whole),
            root,
            warn_only: prog.server.warn_only,
            gap_shapes: Vec::new(),
            meanings: Vec::new(),
        }
    }

    fn prove(&mut self) -> Verdict {
        let s = self.listener.clone();
        if s.reachable
            .minus(&IpSet::of_cidrs(&[
                Cidr { addr: IpAddr::from([127, 0, 0, 0]), prefix: 8 },
                Cidr { addr: "::1".parse().unwrap_or(IpAddr::from([0u16; 8])), prefix: 128 },
            ]))
            .is_empty()
        {
            return Verdict::LoopbackOnly;
        }
        self.compute_gaps();
        let ends = self.final_paths();
        let mut undecided: Option<(String, Vec<(LocId, String)>)> = None;
        let mut found: Vec<(session::RelayEnd, sym::Model)> = Vec::new();
        for e in ends {
            match self.w.solve(&e.path.cons) {
                Ok(m) => {
                    found.push((e, m));
                    if found.len() >= 4 {
                        break;
                    }
                }
                Err(None) => {}
                Err(Some(why)) => {
                    if undecided.is_none() {
                        let mut chain = e.session_trace.clone();
                        chain.extend(e.route_trace.iter().cloned());
                        undecided = Some((why, chain));
                    }
                }
            }
        }
        if !found.is_empty() {
            let mut transcripts = Vec::new();
            let mut first: Option<Relay> = None;
            for (e, m) in &found {
                let (t, rcpt) = self.transcript(e, m);
                transcripts.push(t);
                if first.is_none() {
                    let mut chain = e.session_trace.clone();
                    chain.extend(e.route_trace.iter().cloned());
                    let trusted_by_networks = matches!(e.rcpt_end, Some(explore::End::Default)) && !e.path.grant && {
                        let ip = m.values.get(&self.session.client_ip);
                        matches!(ip, Some(sym::Value::Ip(a)) if self.networks.contains(*a))
                    };
                    let why = if trusted_by_networks {
                        "the stage falls off its end and the attacker's address is inside `networks`".to_string()
                    } else if e.via == "the recipient" {
                        e.why.clone()
                    } else {
                        format!("{} sends a copy to an address the client chose ({})", e.via, e.why)
                    };
                    first = Some(Relay {
                        listener: s.name.clone(),
                        chain,
                        decided_by: e.decided_by,
                        why: format!("{why}; the queue delivers it by {}", e.transport),
                        setting: if trusted_by_networks {
                            Some("networks")
                        } else if self.warn_only {
                            Some("warn_only")
                        } else {
                            None
                        },
                        transcripts: Vec::new(),
                        recipient: rcpt,
                    });
                }
            }
            let mut r = first.expect("found is not empty");
            r.transcripts = transcripts;
            return Verdict::Open(Box::new(r));
        }
        if let Some((why, chain)) = undecided {
            return Verdict::Undecided { listener: s.name.clone(), why, chain };
        }
        Verdict::Safe
    }
}

/// Prove each listener (the server's defaults when there is none).
pub fn prove(prog: &Program, tables: &[Option<Known>]) -> Vec<(Option<String>, Verdict)> {
    let mut out = Vec::new();
    let listeners: Vec<Option<&Listener>> =
        if prog.listeners.is_empty() { vec![None] } else { prog.listeners.iter().map(Some).collect() };
    for l in listeners {
        let name = l.map(|l| l.name.clone());
        let s = l.unwrap_or_else(|| crate::settings::default_listener());
        if s.auth() == Auth::Required {
            out.push((name, Verdict::AuthRequired));
            continue;
        }
        let mut p = Prover::new(prog, l, tables);
        out.push((name, p.prove()));
    }
    out
}

/// An address of an outside client: outside every network the policy trusts (for the
/// backscatter lint, which asks what an outside client's recipients meet).
pub fn attacker_ip(prog: &Program) -> IpAddr {
    let mut trusted = IpSet::empty();
    for c in named_networks(prog, &[]) {
        if narrow(&c) {
            trusted = trusted.union(&IpSet::of_cidr(&c));
        }
    }
    IpSet::full().minus(&trusted).pick().unwrap_or(IpAddr::from([198, 51, 100, 23]))
}
