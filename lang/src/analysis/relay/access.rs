//! `access TABLE` on a path: every result the table can give the client, with its
//! condition (sendmail's scopes, as the evaluator has them).

use super::explore::*;
use super::sym::{LangSpec, Origin, View};
use super::term::{IpV, NumV, Term, B};
use super::witness::Meaning;
use super::{Known, Prover};
use crate::access::{self as acc, AccessAction};
use crate::ir::*;

impl Prover<'_> {
    /// `access TABLE`: every result the table can give this client, with its condition.
    pub(super) fn access(
        &mut self,
        stage: Stage,
        env: &Env,
        p: Path,
        t: u32,
        delay: AccessDelay,
        loc: LocId,
    ) -> Vec<(Path, Option<End>)> {
        #[derive(Clone, Copy, PartialEq)]
        enum R {
            Ok,
            Relay(bool),
            Refuse,
            Discard,
            Hold,
            Continue,
        }
        let scope = match stage {
            Stage::Connect | Stage::Helo | Stage::Auth => acc::Scope::Connect,
            Stage::Mail => acc::Scope::From,
            _ => acc::Scope::To,
        };
        let subject: Term = match scope {
            acc::Scope::Connect => Term::default(),
            acc::Scope::From => env.sender.map(|s| Term::sym(s, View::Whole)).unwrap_or_default(),
            acc::Scope::To => env.rcpt.as_ref().map(|r| r.addr.clone()).unwrap_or_default(),
        };
        let classify = |key: &str, v: &str| -> R {
            let v = v.trim();
            let v = v.strip_prefix('"').and_then(|x| x.strip_suffix('"')).unwrap_or(v);
            let word = v.split_whitespace().next().unwrap_or("").to_ascii_uppercase();
            if v.eq_ignore_ascii_case("REJECT") {
                return R::Refuse;
            }
            match acc::parse_value(v) {
                AccessAction::Accept if word == "RELAY" => match scope {
                    acc::Scope::To => R::Relay(relay_key_is_declaration(key)),
                    _ => R::Relay(true),
                },
                AccessAction::Accept => R::Ok,
                AccessAction::Dunno => R::Continue,
                AccessAction::Discard => R::Discard,
                AccessAction::Reject { .. } | AccessAction::Tempfail { .. } | AccessAction::Invalid(_) => R::Refuse,
                AccessAction::Hold(_) => R::Hold,
                // FRIEND and HATER only decide whether a delayed refusal reaches this
                // recipient: the stage goes on, as the runtime's does.
                AccessAction::Warn(_) | AccessAction::Friend | AccessAction::Hater => R::Continue,
            }
        };
        // `:delay` (sendmail's delay_checks): a refusal at connect, helo or mail waits for the
        // recipients, which it may or may not reach (FRIEND, HATER). A refusal only ever
        // takes relaying away, so the proof lets the stage go on as if there were no entry
        // and never counts the delayed refusal at rcpt: every result the runtime can give
        // is one considered here.
        let delayed = delay != AccessDelay::Now && scope != acc::Scope::To;
        let classify = |key: &str, v: &str| -> R {
            match classify(key, v) {
                R::Refuse if delayed => R::Continue,
                r => r,
            }
        };
        let mut alts: Vec<(B, R)> = Vec::new();
        match self.tables.get(t as usize).and_then(Option::as_ref) {
            Some(Known::Keys(rows)) => {
                let mut all = Vec::new();
                for (k, v) in rows.iter() {
                    let bare = match strip_scope(k, scope) {
                        Some(b) => b,
                        None => continue,
                    };
                    let cond = match scope {
                        acc::Scope::Connect => self.client_key_cond(env.run, bare),
                        _ => self.address_key_cond(env.run, &subject, bare),
                    };
                    if cond == B::Const(false) {
                        continue;
                    }
                    all.push(cond.clone());
                    let r = classify(bare, v);
                    alts.push((cond, r));
                }
                alts.push((B::and(all.into_iter().map(B::not).collect()), R::Continue));
            }
            _ => {
                // Unknown contents: any result, for a key the attacker's value can have.
                let what = format!("access:{t}:{}:{subject:?}", stage.name());
                let s = self.num_sym(Origin::World { what, run: env.run }, 0, 5);
                self.mean(s, Meaning::Access { table: t, stage, subject: subject.clone() });
                let results = [R::Continue, R::Ok, R::Relay(false), R::Refuse, R::Discard, R::Hold];
                for (i, r) in results.iter().enumerate() {
                    // A delayed refusal continues, which `no entry` (0) already covers for
                    // every key this unknown table may hold.
                    if delayed && *r == R::Refuse {
                        continue;
                    }
                    let b = self.num_test(&NumV::Sym(s), CmpOp::Eq, i as f64);
                    alts.push((b, *r));
                }
            }
        }
        // Group by result.
        let mut out = Vec::new();
        let kinds = [R::Continue, R::Ok, R::Relay(true), R::Relay(false), R::Refuse, R::Discard, R::Hold];
        for k in kinds {
            let conds: Vec<B> = alts.iter().filter(|(_, r)| *r == k).map(|(b, _)| b.clone()).collect();
            if conds.is_empty() {
                continue;
            }
            let b = B::or(conds);
            if b == B::Const(false) {
                continue;
            }
            let mut q = p.clone();
            q.cons = b.assume(&q.cons);
            let (what, end) = match (k, scope) {
                (R::Continue, _) => ("access: no entry", None),
                (R::Hold, _) => {
                    q.held = true;
                    ("access: HOLD", None)
                }
                (R::Ok, acc::Scope::To) => ("access: OK", Some(End::Default)),
                (R::Ok, _) => ("access: OK", Some(End::Accept)),
                (R::Relay(legit), acc::Scope::To) => ("access: RELAY", Some(End::AcceptRelay { legit })),
                (R::Relay(_), acc::Scope::Connect) => {
                    q.grant = true;
                    ("access: RELAY", Some(End::Accept))
                }
                (R::Relay(_), _) => ("access: RELAY (as OK)", Some(End::Accept)),
                (R::Refuse, _) => ("access: refuse", Some(End::Refuse)),
                (R::Discard, _) => ("access: DISCARD", Some(End::Discard)),
            };
            q.trace = q.trace.with(loc, what.into());
            out.push((q, end));
        }
        out
    }

    /// The condition under which an access key matches the client (address or its
    /// network, or its name and parent domains).
    pub(super) fn client_key_cond(&mut self, run: u32, key: &str) -> B {
        if let Some(set) = access_ip_key(key) {
            return self.ip_in(&IpV::Sym(self.session.client_ip), &set);
        }
        let name = Term::sym(self.session.client_name, View::Whole);
        let spec = LangSpec::domains(&[key.to_string(), format!(".{key}")], false);
        let m = self.string_test(run, &name, &spec);
        let unknown = LangSpec::exact(&["unknown"]);
        let u = self.string_test(run, &name, &unknown);
        B::and(vec![m, u.not()])
    }

    /// The condition under which an access key matches an address (`From:`/`To:` keys).
    pub(super) fn address_key_cond(&mut self, run: u32, addr: &Term, key: &str) -> B {
        if key == "<>" {
            return self.string_test(run, addr, &LangSpec::exact(&[""]));
        }
        if let Some(user) = key.strip_suffix('@') {
            let l = self.term_view(run, addr, View::Local);
            let has_at = self.string_test(run, addr, &LangSpec::contains(&["@"]));
            let m = self.string_test(run, &l, &LangSpec::exact(&[user]));
            return B::and(vec![has_at, m]);
        }
        if key.contains('@') {
            return self.string_test(run, addr, &LangSpec::exact(&[key]));
        }
        let d = self.term_view(run, addr, View::Domain);
        let spec = LangSpec::domains(&[key.to_string(), format!(".{key}")], false);
        self.string_test(run, &d, &spec)
    }
}

/// An access key without its scope, if it applies in `scope` (unscoped keys apply in all).
fn strip_scope(key: &str, scope: acc::Scope) -> Option<&str> {
    for s in [acc::Scope::Connect, acc::Scope::From, acc::Scope::To] {
        let pre = s.prefix().to_ascii_lowercase();
        if let Some(rest) = key.strip_prefix(&pre) {
            return if s == scope { Some(rest) } else { None };
        }
    }
    Some(key)
}

/// A `To:` key with RELAY that declares a destination the administrator relays for (a
/// domain that is not a public suffix, or one address), rather than letting `user@` any
/// domain through.
fn relay_key_is_declaration(key: &str) -> bool {
    if key.ends_with('@') || key.is_empty() || key == "<>" {
        return false;
    }
    let domain = key.rsplit_once('@').map(|(_, d)| d).unwrap_or(key);
    !super::public_suffix(domain)
}

/// `192.0.2`, `10`, `2001:db8` (16-bit groups): the network an access key names.
pub fn access_ip_key(key: &str) -> Option<super::sets::IpSet> {
    use super::sets::IpSet;
    let parts: Vec<&str> = key.split('.').collect();
    if (1..=4).contains(&parts.len())
        && parts.iter().all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
    {
        let mut octets = [0u8; 4];
        for (i, p) in parts.iter().enumerate() {
            octets[i] = p.parse().ok()?;
        }
        return Some(IpSet::of_cidr(&Cidr { addr: std::net::IpAddr::from(octets), prefix: (parts.len() * 8) as u8 }));
    }
    if key.contains(':') {
        if let Ok(a) = key.parse::<std::net::Ipv6Addr>() {
            return Some(IpSet::single(std::net::IpAddr::V6(a)));
        }
        let groups: Vec<&str> = key.split(':').collect();
        if groups.len() < 8
            && groups.iter().all(|g| !g.is_empty() && g.len() <= 4 && g.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            let mut segs = [0u16; 8];
            for (i, g) in groups.iter().enumerate() {
                segs[i] = u16::from_str_radix(g, 16).ok()?;
            }
            let addr = std::net::Ipv6Addr::from(segs);
            return Some(IpSet::of_cidr(&Cidr { addr: std::net::IpAddr::V6(addr), prefix: (groups.len() * 16) as u8 }));
        }
    }
    None
}
