//! The counterexample: a transcript (spec/transcript.md) whose client relays, built from a
//! model of a relaying path. `mailc check` replays it through the real engine before it
//! calls the listener an open relay.

use std::fmt::Write;

use super::explore::Shape;
use super::session::{RelayEnd, RUN_CONNECT, RUN_DATA, RUN_GAP, RUN_HELO, RUN_MAIL, RUN_RCPT, RUN_ROUTE};
use super::sym::{Model, Origin, SymId, Value, View};
use super::term::{Part, Term};
use super::{Known, Prover, TlsOpt};
use crate::ir::*;

/// What a symbol's value means for the counterexample (recorded when it is made).
#[derive(Clone, Debug)]
pub enum Meaning {
    /// A DNS question: `dnsbl ZONE [returns]`, `rhsbl ZONE` about a domain, `resolvable`.
    Dnsbl {
        zone: String,
        returns: Vec<String>,
    },
    Rhsbl {
        zone: String,
        domain: Term,
        returns: Vec<String>,
    },
    Resolvable(Term),
    Callahead(Term),
    Greylist {
        delay_ms: u64,
    },
    /// Whether a table the proof could not read holds a key.
    TableHas {
        table: u32,
        key: Term,
    },
    /// The value a table the proof could not read gives a key.
    TableValue {
        table: u32,
        key: Term,
    },
    /// The result an access table the proof could not read gives the stage's keys.
    Access {
        table: u32,
        stage: Stage,
        subject: Term,
    },
    Rate {
        counter: Counter,
        key: String,
        value: Term,
    },
    Concurrent {
        key: String,
        value: Term,
    },
    Score(u32),
}

impl Prover<'_> {
    fn value(&self, m: &Model, s: SymId) -> Value {
        m.values.get(&s).cloned().unwrap_or_else(|| self.default_value(s))
    }

    fn text(&self, m: &Model, s: SymId) -> String {
        match self.value(m, s) {
            Value::Str(x) => x,
            Value::Ip(a) => a.to_string(),
            Value::Num(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::List(l) => l.join(", "),
        }
    }

    /// A term's text under the model.
    pub fn render_with(&self, m: &Model, t: &Term) -> String {
        let mut out = String::new();
        for p in &t.0 {
            match p {
                Part::Lit(l) => out.push_str(l),
                Part::Sym(s, v) => {
                    let x = self.text(m, *s);
                    let (local, domain) = crate::address::split(&x);
                    out.push_str(&match v {
                        View::Whole => x.clone(),
                        View::Local => local.to_string(),
                        View::Domain => domain,
                        View::Detail => crate::address::detail(local).to_string(),
                    });
                }
            }
        }
        out
    }

    fn find(&mut self, run: u32, fact: &'static str) -> Option<SymId> {
        self.w.find(&Origin::Fact { run, fact })
    }

    fn fact_text(&mut self, m: &Model, run: u32, fact: &'static str) -> Option<String> {
        self.find(run, fact).map(|s| self.text(m, s))
    }

    fn fact_bool(&mut self, m: &Model, run: u32, fact: &'static str) -> Option<bool> {
        let s = self.find(run, fact)?;
        match m.values.get(&s) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    fn fact_num(&mut self, m: &Model, run: u32, fact: &'static str) -> i64 {
        match self.find(run, fact).map(|s| self.value(m, s)) {
            Some(Value::Num(n)) => n,
            _ => 0,
        }
    }

    fn table_name(&self, t: u32) -> String {
        self.prog.tables.get(t as usize).map(|r| r.name.clone()).unwrap_or_default()
    }

    /// The transcript, and the address it relays to.
    pub fn transcript(&mut self, e: &RelayEnd, m: &Model) -> (String, String) {
        let name = self.listener.name.clone();
        let who = name.clone().map(|n| format!("listener `{n}`")).unwrap_or_else(|| "the default listener".into());
        let target = self.render_with(m, &e.target);
        let mut t = String::new();
        let _ = writeln!(
            t,
            "# Written by `mailc check`: a client that is not authenticated and not in\n# `networks` relays to {target} through {who} ({}).",
            e.via
        );
        let _ = writeln!(t, "case: open relay through {who}");
        if let Some(n) = &name {
            let _ = writeln!(t, "listener: {n}");
        }
        let ip = match self.value(m, self.session.client_ip) {
            Value::Ip(a) => a,
            _ => std::net::IpAddr::from([198, 51, 100, 23]),
        };
        let port = match m.values.get(&self.session.client_port) {
            Some(Value::Num(n)) if (1..=65535).contains(n) => *n,
            _ => 40000,
        };
        let _ = writeln!(t, "client: {}", std::net::SocketAddr::new(ip, port as u16));
        let cname = self.text(m, self.session.client_name);
        if cname != "unknown" && !cname.is_empty() {
            let _ = writeln!(t, "client-name: {cname}");
        }
        let ptr = self.text(m, self.session.client_ptr);
        if !ptr.is_empty() {
            let _ = writeln!(t, "client-ptr: {ptr}");
        }
        let local = match m.values.get(&self.session.local_ip) {
            Some(Value::Ip(l)) => Some(*l),
            _ => match self.listener.local_ip.v4.r.len() + self.listener.local_ip.v6.r.len() {
                1 if self.listener.local_ip.size_hint().0 + self.listener.local_ip.size_hint().1 == 1 => {
                    self.listener.local_ip.pick()
                }
                _ => None,
            },
        };
        if let Some(l) = local {
            let _ = writeln!(t, "local: {}", std::net::SocketAddr::new(l, self.listener.local_port));
        }
        if self.listener.tls == TlsOpt::Implicit {
            let _ = writeln!(t, "tls: implicit");
        }
        let fp = self.text(m, self.session.fingerprint);
        let cert = matches!(m.values.get(&self.session.client_cert), Some(Value::Bool(true)));
        if self.listener.public_client_certs && (cert || !fp.is_empty()) {
            let fp = if fp.is_empty() { vec!["AB"; 32].join(":") } else { fp };
            let _ = writeln!(t, "client-cert: {fp}");
        }
        // The clock: each run at the hour the model gives it.
        let hours: Vec<(u32, i64)> = [RUN_CONNECT, RUN_HELO, RUN_MAIL, RUN_RCPT, RUN_DATA, RUN_ROUTE]
            .iter()
            .map(|r| (*r, self.fact_num(m, *r, "time.hour")))
            .collect();
        let start_hour = hours.first().map(|h| h.1).unwrap_or(0);
        let _ = writeln!(t, "clock: 2026-01-01T{:02}:00:00Z", start_hour.clamp(0, 23));
        self.fixtures(m, ip, &mut t);
        // The dialogue.
        let helo = self.fact_text(m, RUN_HELO, "helo.name").unwrap_or_else(|| "attacker.test".into());
        let ehlo = self.fact_bool(m, RUN_HELO, "helo.extended").unwrap_or(true);
        let hello = if ehlo { "EHLO" } else { "HELO" };
        let mut d = String::new();
        let mut hour = start_hour;
        let wait_for = |d: &mut String, h: i64, hour: &mut i64| {
            while *hour != h {
                for _ in 0..15 {
                    d.push_str("C: NOOP\nS: 250 *\nwait: 4m\n");
                }
                *hour = (*hour + 1) % 24;
            }
        };
        d.push_str("S: 220 *\n");
        let tls = e.path.tls && self.listener.tls != TlsOpt::Implicit;
        if tls {
            d.push_str(&format!("C: EHLO {helo}\nS: 250 *\nC: STARTTLS\nS: 220 *\n"));
        }
        // Commands before the final HELO: other HELOs and failed AUTHs.
        let gaps: Vec<(Stage, Vec<(SymId, SymId)>)> =
            e.path.gaps.iter().filter_map(|g| g.shape.map(|s| (self.gap_shapes[s].stage, g.copies.clone()))).collect();
        let copy_of = |copies: &[(SymId, SymId)], run: u32, fact: &'static str, w: &super::sym::World| {
            let ph = w.find(&Origin::Fact { run, fact })?;
            copies.iter().find(|(p, _)| *p == ph).map(|(_, c)| *c)
        };
        for (stage, copies) in &gaps {
            match stage {
                Stage::Helo => {
                    let s = copy_of(copies, RUN_GAP + Stage::Helo as u32, "helo.name", &self.w);
                    let v = s.map(|s| self.text(m, s)).unwrap_or_else(|| "attacker.test".into());
                    d.push_str(&format!("C: EHLO {v}\nS: *\n"));
                }
                Stage::Auth => {
                    let s = copy_of(copies, RUN_GAP + Stage::Auth as u32, "auth.mechanism", &self.w);
                    let mech = s.map(|s| self.text(m, s)).unwrap_or_default();
                    d.push_str(&format!("C: EHLO {helo}\nS: 250 *\n"));
                    if mech.eq_ignore_ascii_case("LOGIN") {
                        d.push_str("C: AUTH LOGIN\nS: 334 *\nC: bm9ib2R5\nS: 334 *\nC: d3Jvbmc=\nS: 535 *\n");
                    } else {
                        d.push_str("C: AUTH PLAIN AG5vYm9keQB3cm9uZw==\nS: 535 *\n");
                    }
                }
                _ => {}
            }
        }
        wait_for(&mut d, hours[1].1, &mut hour);
        d.push_str(&format!("C: {hello} {helo}\nS: 250 *\n"));
        // Other transactions, then the final MAIL.
        let sender = self.fact_text(m, RUN_MAIL, "sender").unwrap_or_else(|| "user@attacker.test".into());
        for (stage, copies) in &gaps {
            if *stage == Stage::Mail {
                let s = copy_of(copies, RUN_GAP + Stage::Mail as u32, "sender", &self.w);
                let v = s.map(|s| self.text(m, s)).unwrap_or_default();
                d.push_str(&format!("C: MAIL FROM:<{v}>\nS: *\nC: RSET\nS: 250 *\n"));
            }
        }
        wait_for(&mut d, hours[2].1, &mut hour);
        let mut params = String::new();
        let size = self.fact_num(m, RUN_MAIL, "mail.size");
        if size > 0 {
            let _ = write!(params, " SIZE={size}");
        }
        let body_kind = self.fact_text(m, RUN_MAIL, "mail.body").unwrap_or_default();
        let binary = body_kind.eq_ignore_ascii_case("BINARYMIME");
        if body_kind.eq_ignore_ascii_case("8BITMIME") || binary {
            let _ = write!(params, " BODY={}", body_kind.to_ascii_uppercase());
        }
        if self.fact_bool(m, RUN_MAIL, "mail.smtputf8") == Some(true) {
            params.push_str(" SMTPUTF8");
        }
        let ret = self.fact_text(m, RUN_MAIL, "dsn.ret").unwrap_or_default();
        if !ret.is_empty() {
            let _ = write!(params, " RET={}", ret.to_ascii_uppercase());
        }
        let envid = self.fact_text(m, RUN_MAIL, "dsn.envid").unwrap_or_default();
        if !envid.is_empty() {
            let _ = write!(params, " ENVID={}", xtext(&envid));
        }
        d.push_str(&format!("C: MAIL FROM:<{sender}>{params}\nS: 250 *\n"));
        // Earlier RCPTs of this transaction.
        for (stage, copies) in &gaps {
            if *stage == Stage::Rcpt {
                let s = copy_of(copies, RUN_GAP + Stage::Rcpt as u32, "recipient", &self.w);
                let v = s.map(|s| self.text(m, s)).unwrap_or_default();
                d.push_str(&format!("C: RCPT TO:<{v}>\nS: *\n"));
            }
        }
        for _ in 0..self.fact_num(m, RUN_RCPT, "recipients.count").clamp(0, 100) {
            d.push_str("C: RCPT TO:<postmaster>\nS: 250 *\n");
        }
        for _ in 0..self.fact_num(m, RUN_RCPT, "session.errors").clamp(0, 50) {
            d.push_str("C: XERROR\nS: 5* *\n");
        }
        wait_for(&mut d, hours[3].1, &mut hour);
        let rcpt = self.fact_text(m, RUN_RCPT, "recipient").unwrap_or_else(|| format!("victim@{}", super::TARGET));
        let route = if self.fact_bool(m, RUN_RCPT, "source-route") == Some(true) { "@hop.attacker.test:" } else { "" };
        let mut rparams = String::new();
        if let Some(s) = self.find(RUN_RCPT, "dsn.notify") {
            if let Value::List(n) = self.value(m, s) {
                if !n.is_empty() {
                    let n: Vec<String> = if n.iter().any(|x| x.eq_ignore_ascii_case("NEVER")) {
                        vec!["NEVER".into()]
                    } else {
                        n.iter().map(|x| x.to_ascii_uppercase()).collect()
                    };
                    let _ = write!(rparams, " NOTIFY={}", n.join(","));
                }
            }
        }
        let orcpt = self.fact_text(m, RUN_RCPT, "dsn.orcpt").unwrap_or_default();
        if !orcpt.is_empty() {
            let (ty, a) = orcpt.split_once(';').unwrap_or(("rfc822", orcpt.as_str()));
            let _ = write!(rparams, " ORCPT={ty};{}", xtext(a));
        }
        d.push_str(&format!("C: RCPT TO:<{route}{rcpt}>{rparams}\nS: 250 *\n"));
        wait_for(&mut d, hours[4].1, &mut hour);
        let message = self.message(m, &sender, &rcpt);
        if binary {
            d.push_str(&format!("C: BDAT {} LAST\n", message.len()));
            d.push_str(&format!("C! {}\n", escape_c(&message)));
            d.push_str("S: 250 *\n");
        } else {
            d.push_str("C: DATA\nS: 354 *\n");
            let mut lines: Vec<&str> = message.split("\r\n").collect();
            if lines.last() == Some(&"") {
                lines.pop();
            }
            for line in lines {
                let line = if line.starts_with('.') { format!(".{line}") } else { line.to_string() };
                d.push_str(&format!("C: {}\n", escape_c(&line)));
            }
            d.push_str("C: .\nS: 250 *\n");
        }
        // Greylisting: the first try is refused, the retry after the delay passes.
        let greylist = self.greylist_wait(m);
        if let Some(ms) = greylist {
            let first = d.replace("S: 250 *\n", "S: *\n");
            let cut = first.rfind("C: RCPT TO:").map(|i| first[..i].to_string()).unwrap_or(first.clone());
            t.push_str(&cut);
            t.push_str(&format!("C: RCPT TO:<{route}{rcpt}>{rparams}\nS: *\nreconnect\nwait: {}s\n", ms / 1000 + 60));
        }
        t.push_str(&d);
        wait_for(&mut t, hours[5].1, &mut hour);
        let how = if e.transport.starts_with("smtp") { "smtp" } else { "mx" };
        match e.via.as_str() {
            "the recipient" | "the data stage's `redirect`" => {
                let _ = writeln!(t, "route: {target} => *deliver {how}*");
            }
            "an `alert`" => {
                let _ = writeln!(t, "alert: {target}: *");
            }
            _ => {
                let _ = writeln!(t, "route: {target} => *deliver {how}*");
            }
        }
        (t, target)
    }

    fn greylist_wait(&self, m: &Model) -> Option<u64> {
        for (s, meaning) in &self.meanings {
            if let Meaning::Greylist { delay_ms } = meaning {
                if matches!(m.values.get(s), Some(Value::Bool(false))) {
                    return Some(*delay_ms);
                }
            }
        }
        None
    }

    /// The message the client sends: the headers, body and attachments the model gives.
    fn message(&mut self, m: &Model, sender: &str, rcpt: &str) -> String {
        let mut headers: Vec<(String, String)> = Vec::new();
        let prefix = format!("{RUN_DATA}:");
        for (i, s) in self.w.syms.iter().enumerate() {
            if let Origin::Header(h) = &s.origin {
                if let Some(name) = h.strip_prefix(&prefix) {
                    if let Some(Value::List(vals)) = m.values.get(&(i as SymId)) {
                        for v in vals {
                            headers.push((name.to_string(), v.clone()));
                        }
                    }
                }
            }
        }
        let has = |n: &str, h: &[(String, String)]| h.iter().any(|(x, _)| x.eq_ignore_ascii_case(n));
        let mut out = String::new();
        if !has("from", &headers) {
            out.push_str(&format!(
                "From: <{}>\r\n",
                if sender.is_empty() { "mailer-daemon@attacker.test" } else { sender }
            ));
        }
        if !has("to", &headers) {
            out.push_str(&format!("To: <{rcpt}>\r\n"));
        }
        if !has("subject", &headers) {
            out.push_str("Subject: relayed by a stranger\r\n");
        }
        let names = self.find(RUN_DATA, "attachment.names").map(|s| self.value(m, s));
        let types = self.find(RUN_DATA, "attachment.types").map(|s| self.value(m, s));
        let body = self.fact_text(m, RUN_DATA, "body").unwrap_or_default();
        let body = if body.is_empty() { "This message was relayed.".to_string() } else { body };
        for (n, v) in &headers {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        let names = match names {
            Some(Value::List(l)) => l,
            _ => Vec::new(),
        };
        let types = match types {
            Some(Value::List(l)) => l,
            _ => Vec::new(),
        };
        if names.is_empty() && types.iter().all(|t| t.eq_ignore_ascii_case("text/plain")) {
            out.push_str("\r\n");
            out.push_str(&body.replace('\n', "\r\n"));
            out.push_str("\r\n");
        } else {
            out.push_str("MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n");
            out.push_str(&format!("--b\r\nContent-Type: text/plain\r\n\r\n{body}\r\n"));
            let n = names.len().max(types.len());
            for i in 0..n {
                let ty = types.get(i).cloned().unwrap_or_else(|| "application/octet-stream".into());
                let fname = names.get(i).cloned().unwrap_or_else(|| format!("file{i}.bin"));
                out.push_str(&format!(
                    "--b\r\nContent-Type: {ty}\r\nContent-Disposition: attachment; filename=\"{fname}\"\r\nContent-Transfer-Encoding: base64\r\n\r\nAAAA\r\n"
                ));
            }
            out.push_str("--b--\r\n");
        }
        let size = self.fact_num(m, RUN_DATA, "message.size");
        while (out.len() as i64) < size {
            out = format!("X-Padding: {}\r\n{out}", "x".repeat(70));
        }
        out
    }

    /// Fixture lines for the outside world the model assumes.
    fn fixtures(&mut self, m: &Model, ip: std::net::IpAddr, t: &mut String) {
        let mut tables_used: Vec<u32> = Vec::new();
        let mut rows: Vec<(u32, String)> = Vec::new();
        let meanings = self.meanings.clone();
        for (s, meaning) in &meanings {
            let v = m.values.get(s).cloned();
            match meaning {
                Meaning::Dnsbl { zone, returns } => {
                    if matches!(v, Some(Value::Bool(true))) {
                        let a = returns.first().cloned().unwrap_or_else(|| "127.0.0.2".into());
                        let _ = writeln!(t, "dns: {}.{zone} A {a}", reverse_ip(ip));
                        // What the list's TXT record says, when the path reads it.
                        let text = [RUN_CONNECT, RUN_HELO, RUN_MAIL, RUN_RCPT, RUN_DATA]
                            .iter()
                            .filter_map(|r| self.w.find(&Origin::Fact { run: *r, fact: "dnsbl.text" }))
                            .find_map(|s| match m.values.get(&s) {
                                Some(Value::Str(x)) if !x.is_empty() => Some(x.clone()),
                                _ => None,
                            });
                        if let Some(x) = text {
                            let _ = writeln!(t, "dns: {}.{zone} TXT \"{x}\"", reverse_ip(ip));
                        }
                    }
                }
                Meaning::Rhsbl { zone, domain, returns } => {
                    if matches!(v, Some(Value::Bool(true))) {
                        let a = returns.first().cloned().unwrap_or_else(|| "127.0.0.2".into());
                        let dom = self.render_with(m, domain).trim_end_matches('.').to_ascii_lowercase();
                        let _ = writeln!(t, "dns: {dom}.{zone} A {a}");
                    }
                }
                Meaning::Resolvable(d) => {
                    if matches!(v, Some(Value::Bool(true))) {
                        let dom = self.render_with(m, d).trim_end_matches('.').to_ascii_lowercase();
                        let _ = writeln!(t, "dns: {dom} A 192.0.2.53");
                    }
                }
                Meaning::Callahead(a) => {
                    let addr = self.render_with(m, a);
                    let reply =
                        if matches!(v, Some(Value::Bool(true))) { "250 2.1.5 Ok" } else { "550 5.1.1 No such user" };
                    let _ = writeln!(t, "callahead: {addr} => {reply}");
                }
                Meaning::Greylist { .. } => {}
                Meaning::TableHas { table, key } => {
                    tables_used.push(*table);
                    if matches!(v, Some(Value::Bool(true))) {
                        let k = self.render_with(m, key).to_ascii_lowercase();
                        let val = if self.table_kind(*table) == "access" { "OK" } else { "yes" };
                        rows.push((*table, self.row(*table, &k, val)));
                    }
                }
                Meaning::TableValue { table, key } => {
                    tables_used.push(*table);
                    if let Some(Value::Str(x)) = v {
                        if !x.is_empty() {
                            let k = self.render_with(m, key).to_ascii_lowercase();
                            rows.push((*table, self.row(*table, &k, &x)));
                        }
                    }
                }
                Meaning::Access { table, stage, subject } => {
                    tables_used.push(*table);
                    if let Some(Value::Num(n)) = v {
                        let word = match n {
                            1 => "OK",
                            2 => "RELAY",
                            3 => "REJECT",
                            4 => "DISCARD",
                            5 => "HOLD",
                            _ => continue,
                        };
                        let key = match stage {
                            Stage::Connect | Stage::Helo | Stage::Auth => format!("connect:{ip}"),
                            Stage::Mail => {
                                let s = self.render_with(m, subject);
                                if s.is_empty() {
                                    "from:<>".into()
                                } else {
                                    format!("from:{}", s.to_ascii_lowercase())
                                }
                            }
                            _ => format!("to:{}", self.render_with(m, subject).to_ascii_lowercase()),
                        };
                        rows.push((*table, format!("table {}: {key} => {word}\n", self.table_name(*table))));
                    }
                }
                Meaning::Rate { counter, key, value } => {
                    if let Some(Value::Num(n)) = v {
                        if n > 1 {
                            let val = self.render_with(m, value).to_ascii_lowercase();
                            let _ = writeln!(t, "count: {} {key}={val} {}", counter.name(), n - 1);
                        }
                    }
                }
                Meaning::Concurrent { key, value } => {
                    if let Some(Value::Num(n)) = v {
                        if n > 1 {
                            let val = self.render_with(m, value).to_ascii_lowercase();
                            let _ = writeln!(t, "concurrent: {key}={val} {n}");
                        }
                    }
                }
                Meaning::Score(scanner) => {
                    let name = self.prog.scanners.get(*scanner as usize).map(|s| s.name.clone()).unwrap_or_default();
                    let n = match v {
                        Some(Value::Num(n)) => n,
                        _ => 0,
                    };
                    let _ = writeln!(t, "score {name}: {}", n as f64 / 1000.0);
                }
            }
        }
        for (what, line) in [("spf", "spf"), ("dkim", "dkim"), ("dmarc", "dmarc"), ("dmarc.policy", "dmarc-policy")] {
            let run = if what == "spf" { RUN_MAIL } else { RUN_DATA };
            if let Some(s) = self.find(run, what) {
                if let Some(Value::Str(x)) = m.values.get(&s) {
                    if !x.is_empty() && x != "none" {
                        let _ = writeln!(t, "{line}: {x}");
                    }
                }
            }
        }
        // Every unreadable table the path reads gets rows, so the case does not depend on
        // files; lookups in other tables find nothing.
        tables_used.sort();
        tables_used.dedup();
        for tid in tables_used {
            let mine: Vec<&String> = rows.iter().filter(|(x, _)| *x == tid).map(|(_, r)| r).collect();
            if mine.is_empty() {
                let name = self.table_name(tid);
                let line = match self.table_kind(tid).as_str() {
                    "cidr" => format!("table {name}: 192.0.2.255/32 => DUNNO\n"),
                    "regexp" | "pcre" => format!("table {name}: /^mailc-counterexample-unused$/ => DUNNO\n"),
                    "list" => format!("table {name}: mailc-counterexample.invalid\n"),
                    _ => format!("table {name}: mailc-counterexample.invalid => DUNNO\n"),
                };
                t.push_str(&line);
            } else {
                for r in mine {
                    t.push_str(r);
                }
            }
        }
        let _ = Shape::Unset;
        let _ = Known::Keys(Default::default());
    }

    fn table_kind(&self, t: u32) -> String {
        self.prog.tables.get(t as usize).map(|r| r.kind.clone()).unwrap_or_default()
    }

    fn row(&self, t: u32, key: &str, value: &str) -> String {
        if self.table_kind(t) == "list" {
            format!("table {}: {key}\n", self.table_name(t))
        } else {
            format!("table {}: {key} => {value}\n", self.table_name(t))
        }
    }
}

fn reverse_ip(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}", o[3], o[2], o[1], o[0])
        }
        std::net::IpAddr::V6(v6) => {
            let mut parts = Vec::new();
            for b in v6.octets().iter().rev() {
                parts.push(format!("{:x}", b & 0xf));
                parts.push(format!("{:x}", b >> 4));
            }
            parts.join(".")
        }
    }
}

/// RFC 3461 xtext.
fn xtext(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if (33..=126).contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            let _ = write!(out, "+{b:02X}");
        }
    }
    out
}

/// A line for `C:`/`C!` (the transcript's escapes).
fn escape_c(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push_str("\\0"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}
