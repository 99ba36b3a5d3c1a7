//! What a fact, a variable, a lookup or a template is on a path: symbolic values.

use super::explore::*;
use super::sym::{AtomKind, LangSpec, Origin, SymId, SymKind, View};
use super::term::{IpV, ListV, NumV, Part, Term, B, V};
use super::witness::Meaning;
use super::{Known, Prover};
use crate::ir::*;

impl Prover<'_> {
    pub(super) fn fact(&mut self, env: &Env, p: &Path, f: Fact) -> V {
        use Fact::*;
        let run = env.run;
        let lit = |s: &str| V::Str(Term::lit(s));
        match f {
            True => V::Bool(B::Const(true)),
            False => V::Bool(B::Const(false)),
            ClientIp => V::Ip(IpV::Sym(self.session.client_ip)),
            ClientPort => V::Num(NumV::Sym(self.session.client_port)),
            ClientName => V::Str(Term::sym(self.session.client_name, View::Whole)),
            ClientPtr => V::Str(Term::sym(self.session.client_ptr, View::Whole)),
            ClientNetwork => {
                V::Str(Term::sym(self.str_sym(Origin::Fact { run, fact: "client.network" }, None, true), View::Whole))
            }
            ClientFcrdns => {
                let a = self.w.atom(self.session.client_name, AtomKind::Lang(LangSpec::exact(&["unknown"])));
                V::Bool(B::Lit(a, false))
            }
            LocalIp => V::Ip(IpV::Sym(self.session.local_ip)),
            LocalPort => V::Num(NumV::Const(self.listener.local_port as i64)),
            Listener => lit(self.listener.name.as_deref().unwrap_or("")),
            SessionId => V::Str(Term::sym(self.session.session_id, View::Whole)),
            SessionErrors => {
                let hi = self.listener.hard_error_limit.saturating_sub(1) as i64;
                V::Num(NumV::Sym(self.num_sym(Origin::Fact { run, fact: "session.errors" }, 0, hi)))
            }
            Tls => V::Bool(B::Const(p.tls)),
            TlsVersion | TlsCipher if !p.tls => lit(""),
            TlsVersion => {
                let base = LangSpec::exact(&["TLSv1.2", "TLSv1.3"]);
                V::Str(Term::sym(
                    self.str_sym(Origin::Fact { run, fact: "tls.version" }, Some(base), true),
                    View::Whole,
                ))
            }
            TlsCipher => {
                V::Str(Term::sym(self.str_sym(Origin::Fact { run, fact: "tls.cipher" }, None, true), View::Whole))
            }
            TlsClientCert if p.tls && self.listener.public_client_certs => {
                V::Bool(B::atom(self.w.atom(self.session.client_cert, AtomKind::True)))
            }
            TlsClientCert => V::Bool(B::Const(false)),
            TlsClientFingerprint if p.tls && self.listener.public_client_certs => {
                V::Str(Term::sym(self.session.fingerprint, View::Whole))
            }
            TlsClientFingerprint => lit(""),
            HeloName => match &env.helo {
                Some((t, _)) => V::Str(t.clone()),
                None => lit(""),
            },
            HeloExtended => match &env.helo {
                Some((_, b)) => V::Bool(b.clone()),
                None => V::Bool(B::Const(false)),
            },
            Authenticated => V::Bool(B::Const(false)),
            AuthUser => lit(""),
            AuthMechanism => match env.auth_mech {
                Some(s) => V::Str(Term::sym(s, View::Whole)),
                None => lit(""),
            },
            Sender | SenderLocal | SenderDomain => match env.sender {
                Some(s) => V::Str(Term::sym(
                    s,
                    match f {
                        Sender => View::Whole,
                        SenderLocal => View::Local,
                        _ => View::Domain,
                    },
                )),
                None => lit(""),
            },
            MailSize => match &env.mail {
                Some(m) => V::Num(NumV::Sym(m.size)),
                None => V::Num(NumV::Const(0)),
            },
            MailBody => match &env.mail {
                Some(m) => V::Str(Term::sym(m.body, View::Whole)),
                None => lit(""),
            },
            MailSmtputf8 => match &env.mail {
                Some(m) => V::Bool(self.truth(m.utf8)),
                None => V::Bool(B::Const(false)),
            },
            DsnRet => match &env.mail {
                Some(m) => V::Str(Term::sym(m.ret, View::Whole)),
                None => lit(""),
            },
            DsnEnvid => match &env.mail {
                Some(m) => V::Str(Term::sym(m.envid, View::Whole)),
                None => lit(""),
            },
            Recipient | RecipientLocal | RecipientDomain | RecipientDetail => match &env.rcpt {
                Some(r) => {
                    let view = match f {
                        Recipient => View::Whole,
                        RecipientLocal => View::Local,
                        RecipientDomain => View::Domain,
                        _ => View::Detail,
                    };
                    V::Str(self.term_view(run, &r.addr, view))
                }
                None => lit(""),
            },
            RecipientIsLocal => match env.rcpt.clone() {
                Some(r) => {
                    let d = self.term_view(run, &r.addr, View::Domain);
                    let spec = LangSpec::domains(&self.local_domains, true);
                    V::Bool(self.string_test(run, &d, &spec))
                }
                None => V::Bool(B::Const(false)),
            },
            RecipientRouting => match env.rcpt.clone() {
                Some(r) => {
                    let l = self.term_view(run, &r.addr, View::Local);
                    let spec = LangSpec::contains(&["%", "!", "@"]);
                    let mut alts = vec![self.string_test(run, &l, &spec)];
                    if let Some(s) = r.route {
                        alts.push(self.truth(s));
                    }
                    V::Bool(B::or(alts))
                }
                None => V::Bool(B::Const(false)),
            },
            DsnNotify => match &env.rcpt {
                Some(r) => V::List(ListV::Sym(r.notify)),
                None => V::List(ListV::Lits(Vec::new())),
            },
            DsnOrcpt => match &env.rcpt {
                Some(r) => V::Str(Term::sym(r.orcpt, View::Whole)),
                None => lit(""),
            },
            RecipientsCount => {
                let hi = self.listener.max_recipients.saturating_sub(1) as i64;
                V::Num(NumV::Sym(self.num_sym(Origin::Fact { run, fact: "recipients.count" }, 0, hi)))
            }
            Recipients => match &env.recipients {
                Some((Some(m), others)) => V::List(ListV::Recipients { member: m.clone(), others: *others }),
                Some((None, others)) => V::List(ListV::Sym(*others)),
                None => V::List(ListV::Lits(Vec::new())),
            },
            MessageSize => {
                let max = self.max_message_size;
                let r = self.msg_run(run);
                V::Num(NumV::Sym(self.num_sym(Origin::Fact { run: r, fact: "message.size" }, 0, max)))
            }
            Body => V::Str(Term::sym(self.message_str(run, "body"), View::Whole)),
            AttachmentNames => V::List(ListV::Sym(self.message_list(run, "attachment.names"))),
            AttachmentTypes => V::List(ListV::Sym(self.message_list(run, "attachment.types"))),
            QueueId => {
                V::Str(Term::sym(self.str_sym(Origin::Fact { run, fact: "queue.id" }, None, false), View::Whole))
            }
            Spf | Dkim | Dmarc | DmarcPolicy => {
                let (what, words): (&'static str, &[&str]) = match f {
                    Spf => ("spf", &["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]),
                    Dkim => ("dkim", &["pass", "fail", "neutral", "none", "temperror", "permerror"]),
                    Dmarc => ("dmarc", &["pass", "fail", "none", "temperror", "permerror"]),
                    _ => ("dmarc.policy", &["none", "quarantine", "reject", ""]),
                };
                let base = LangSpec::exact(words);
                // One answer per message: the host checks once.
                let r = if run >= super::session::RUN_GAP {
                    run
                } else if what == "spf" {
                    super::session::RUN_MAIL
                } else {
                    self.data_run
                };
                V::Str(Term::sym(self.str_sym(Origin::Fact { run: r, fact: what }, Some(base), true), View::Whole))
            }
            DnsblZone | DnsblAnswer | DnsblText => {
                let name = f.info().name;
                V::Str(Term::sym(self.str_sym(Origin::Fact { run, fact: name }, None, true), View::Whole))
            }
            CallaheadCode => V::Num(NumV::Sym(self.num_sym(Origin::Fact { run, fact: "callahead.code" }, 0, 999))),
            CallaheadText => {
                V::Str(Term::sym(self.str_sym(Origin::Fact { run, fact: "callahead.text" }, None, true), View::Whole))
            }
            TimeHour => V::Num(NumV::Sym(self.num_sym(Origin::Fact { run, fact: "time.hour" }, 0, 23))),
            DeliveryCode | DeliveryAttempts => V::Num(NumV::Const(0)),
            QueueAge => V::Num(NumV::Const(0)),
            DeliveryStatus | DeliveryText | DeliveryHost | BounceType | BounceReason => lit(""),
        }
    }

    /// The run whose message a run sees: a gap run its own, the final path the data run's.
    pub fn msg_run(&self, run: u32) -> u32 {
        if run >= super::session::RUN_GAP {
            run
        } else {
            self.data_run
        }
    }
    pub(super) fn message_str(&mut self, run: u32, what: &'static str) -> SymId {
        let r = self.msg_run(run);
        self.str_sym(Origin::Fact { run: r, fact: what }, None, true)
    }
    pub(super) fn message_list(&mut self, run: u32, what: &'static str) -> SymId {
        let r = self.msg_run(run);
        self.w.sym(Origin::Fact { run: r, fact: what }, SymKind::List(None), true)
    }

    /// A view of a string value: exact for a symbol read whole or for literal text; for
    /// other values, a fresh unknown string.
    pub fn term_view(&mut self, run: u32, t: &Term, view: View) -> Term {
        if view == View::Whole {
            return t.clone();
        }
        if let Some(s) = t.as_lit() {
            let (local, domain) = crate::address::split(&s);
            return Term::lit(&match view {
                View::Domain => domain,
                View::Local => local.to_string(),
                _ => crate::address::detail(local).to_string(),
            });
        }
        if let [Part::Sym(s, View::Whole)] = t.0.as_slice() {
            return Term::sym(*s, view);
        }
        // The last `@` in literal text with only literal text after it: the split is known.
        let at = t.0.iter().rposition(|p| matches!(p, Part::Lit(l) if l.contains('@')));
        if let Some(i) = at {
            if t.0[i + 1..].iter().all(|p| matches!(p, Part::Lit(_))) {
                let Part::Lit(l) = &t.0[i] else { unreachable!("checked a literal") };
                let cut = l.rfind('@').unwrap_or(0);
                let mut before = Term(t.0[..i].to_vec());
                before.push(Part::Lit(l[..cut].to_string()));
                let mut after = Term::lit(&l[cut + 1..]);
                for p in &t.0[i + 1..] {
                    after.push(p.clone());
                }
                match view {
                    View::Domain => {
                        let d = after.as_lit().unwrap_or_default().to_ascii_lowercase();
                        return Term::lit(&d);
                    }
                    View::Local => return before,
                    _ => {}
                }
            }
        }
        let attacker = t.syms().any(|(s, _)| self.w.syms[s as usize].attacker);
        let key = format!("view:{view:?}:{t:?}");
        Term::sym(self.str_sym(Origin::World { what: key, run }, None, attacker), View::Whole)
    }

    pub(super) fn val(&mut self, env: &Env, p: Path, v: &Val) -> (V, Path) {
        match v {
            Val::Fact(f) => (self.fact(env, &p, *f), p),
            Val::Var(id) => {
                let (shape, p) = self.read_var(p, id.0);
                let t = match shape {
                    Shape::Set(t) => t,
                    Shape::Any(s, _) => Term::sym(s, View::Whole),
                    _ => Term::default(),
                };
                (V::Str(t), p)
            }
            Val::Header(name) => {
                let n = self.prog.str(*name).to_ascii_lowercase();
                let s = self.w.sym(Origin::Header(format!("{}:{n}", self.msg_run(env.run))), SymKind::List(None), true);
                (V::List(ListV::Sym(s)), p)
            }
            Val::Lookup { table, key } => {
                let (k, p) = self.val(env, p, key);
                let t = self.to_term(env.run, &k);
                (V::Lookup(table.0, t), p)
            }
            Val::Rate { counter, key, window_ms } => {
                let (k, p) = self.val(env, p, key);
                let t = self.to_term(env.run, &k);
                let what = format!("rate:{}:{t:?}:{window_ms}", counter.name());
                let s = self.num_sym(Origin::World { what, run: env.run }, 1, 1 << 40);
                let kname = match key.as_ref() {
                    Val::Fact(f) => f.info().name.to_string(),
                    _ => "value".to_string(),
                };
                self.mean(s, Meaning::Rate { counter: *counter, key: kname, value: t });
                (V::Num(NumV::Sym(s)), p)
            }
            Val::Concurrent { key } => {
                let (k, p) = self.val(env, p, key);
                let t = self.to_term(env.run, &k);
                let s = self.num_sym(Origin::World { what: format!("concurrent:{t:?}"), run: env.run }, 1, 1 << 20);
                let kname = match key.as_ref() {
                    Val::Fact(f) => f.info().name.to_string(),
                    _ => "value".to_string(),
                };
                self.mean(s, Meaning::Concurrent { key: kname, value: t });
                (V::Num(NumV::Sym(s)), p)
            }
            Val::Score(s) => {
                // Scores are kept in thousandths.
                let r = self.msg_run(env.run);
                let sym = self.num_sym(Origin::World { what: format!("score:{}", s.0), run: r }, -(1 << 40), 1 << 40);
                self.mean(sym, Meaning::Score(s.0));
                (V::Num(NumV::Sym(sym)), p)
            }
            Val::Lit(s) => (V::Str(Term::lit(self.prog.str(*s))), p),
        }
    }

    /// A value as text (what `${...}` inserts).
    pub fn to_term(&mut self, run: u32, v: &V) -> Term {
        match v {
            V::Str(t) => t.clone(),
            V::Num(NumV::Const(n)) => Term::lit(&n.to_string()),
            V::Num(NumV::Sym(s)) | V::Ip(IpV::Sym(s)) => Term::sym(*s, View::Whole),
            V::Ip(IpV::Const(ip)) => Term::lit(&ip.to_string()),
            V::Bool(B::Const(b)) => Term::lit(if *b { "true" } else { "false" }),
            V::List(ListV::Lits(l)) => Term::lit(&l.join(", ")),
            V::Lookup(t, k) => match self.lookup_term(*t, k) {
                Some(t) => t,
                None => Term::sym(self.table_value_sym(*t, k), View::Whole),
            },
            other => {
                let attacker = true;
                Term::sym(
                    self.str_sym(Origin::World { what: format!("text:{other:?}"), run }, None, attacker),
                    View::Whole,
                )
            }
        }
    }

    /// The value of a lookup whose key is literal text in a table known now.
    pub(super) fn lookup_term(&mut self, t: u32, key: &Term) -> Option<Term> {
        let k = key.as_lit()?;
        match self.tables.get(t as usize)? {
            Some(Known::Keys(keys)) => {
                let lk = k.to_ascii_lowercase();
                Some(Term::lit(keys.iter().find(|(x, _)| *x == lk).map(|(_, v)| v).unwrap_or("")))
            }
            _ => None,
        }
    }

    pub fn table_value_sym(&mut self, t: u32, key: &Term) -> SymId {
        let s = self.str_sym(Origin::TableValue { table: t, key: format!("{key:?}") }, None, false);
        self.mean(s, Meaning::TableValue { table: t, key: key.clone() });
        s
    }

    pub fn render(&mut self, env: &Env, p: Path, t: &Template) -> (Term, Path) {
        let mut out = Term::default();
        let mut p = p;
        for part in &t.0 {
            match part {
                crate::ir::Part::Lit(s) => out.push(Part::Lit(self.prog.str(*s).to_string())),
                crate::ir::Part::Val(v) => {
                    let (x, q) = self.val(env, p, v);
                    p = q;
                    let t = self.to_term(env.run, &x);
                    out.extend(&t);
                }
            }
        }
        (out, p)
    }

    /// The shape a variable has, deciding an open one (a fork per possibility in
    /// symbolic mode is made by the caller through `open_choices`).
    pub(super) fn read_var(&mut self, p: Path, var: u32) -> (Shape, Path) {
        let shape = p.vars.get(var as usize).cloned().unwrap_or(Shape::Unset);
        match shape {
            Shape::Open(..) => {
                // Resolved by `resolve_open` before the instruction runs.
                (Shape::Unset, p)
            }
            s => (s, p),
        }
    }

    // ---- conditions ---------------------------------------------------------------------
}
