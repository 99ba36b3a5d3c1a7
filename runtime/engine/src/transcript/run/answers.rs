//! The fixtures' answers to the evaluator's requests (tables, DNS, rates, call-ahead,
//! greylisting, BATV), for a case's [`CaseRun`].

use std::path::Path;

use mailpolicy_lang::ir::Program;
use mailpolicy_stdlib::{batv, tables::FileTable};

use super::super::{DnsAnswer, TableRow};
use super::CaseRun;
use crate::eval::{Answer, Request, RrType};

impl CaseRun {
    // ---- fixtures ---------------------------------------------------------------------

    pub(super) fn answer(&mut self, prog: &Program, req: &Request) -> Answer {
        match req {
            Request::Lookup { table, key } => {
                let Some(t) = prog.tables.get(table.index()) else {
                    return Answer::Error("no such table".into());
                };
                let name = t.name.clone();
                if let Some(rows) = self.rows.get(&name) {
                    if rows.iter().any(|r| *r == TableRow::Error) {
                        return Answer::Error(format!("table {name} is down"));
                    }
                    if rows.iter().any(|r| *r == TableRow::Timeout) {
                        return Answer::Timeout;
                    }
                    let kind = match t.kind.as_str() {
                        "cidr" | "regexp" | "pcre" | "list" => t.kind.as_str(),
                        _ => "map",
                    };
                    let text: String = rows
                        .iter()
                        .filter_map(|r| {
                            if let TableRow::Entry { key, value } = r {
                                Some(format!("{key} {value}\n"))
                            } else {
                                None
                            }
                        })
                        .collect();
                    return match FileTable::parse(kind, &text) {
                        Ok(ft) => Answer::Value(ft.lookup(key)),
                        Err(e) => Answer::Error(format!("table {name} rows: {e}")),
                    };
                }
                let Some(source) = t.source.clone() else {
                    self.fail(format!(
                        "the policy looks up `{key}` in the {} table `{name}`, and the case gives no rows for it",
                        t.kind
                    ));
                    return Answer::Error("no fixture".into());
                };
                let kind = t.kind.clone();
                let dir = self.policy_path.parent().map(Path::to_path_buf).unwrap_or_default();
                let entry = self.file_tables.entry(name.clone()).or_insert_with(|| {
                    let path = dir.join(&source);
                    std::fs::read_to_string(&path)
                        .map_err(|e| format!("{}: {e}", path.display()))
                        .and_then(|text| FileTable::parse(&kind, &text).map_err(|e| format!("{}: {e}", path.display())))
                });
                match entry {
                    Ok(ft) => Answer::Value(ft.lookup(key)),
                    Err(e) => Answer::Error(e.clone()),
                }
            }
            Request::Dns { name, rtype } => {
                let t = match rtype {
                    RrType::A => "A",
                    RrType::Aaaa => "AAAA",
                    RrType::Mx => "MX",
                    RrType::Txt => "TXT",
                    RrType::Ptr => "PTR",
                };
                let name = name.to_ascii_lowercase();
                let mut records = Vec::new();
                for ((n, ty), a) in &self.dns {
                    if *n != name {
                        continue;
                    }
                    if ty == "*" {
                        return Answer::NxDomain;
                    }
                    if ty == t {
                        match a {
                            DnsAnswer::Records(r) => records.extend(r.iter().cloned()),
                            DnsAnswer::ServFail => return Answer::Error("SERVFAIL".into()),
                            DnsAnswer::Timeout => return Answer::Timeout,
                            DnsAnswer::NxDomain => return Answer::NxDomain,
                        }
                    }
                }
                // Deterministic: a name the case does not mention does not exist.
                if records.is_empty() {
                    Answer::NxDomain
                } else {
                    records.sort();
                    Answer::Records(records)
                }
            }
            Request::Rate { counter, key, window_ms } => {
                Answer::Count(self.rates.count(counter.name(), key, *window_ms, self.now))
            }
            Request::Concurrent { key } => {
                Answer::Count(self.concurrent.get(key).copied().unwrap_or_else(|| self.rates.concurrent(key)))
            }
            // Never asked of this host, as of the daemon's: in a session `Conn` answers it
            // (from the `spf:`/`dkim:`/... fixtures), and the queue-side stages read the
            // results kept in the message's record (`Facts::recorded_auth`).
            Request::Scan { scanner } => {
                let name = prog.scanners.get(scanner.index()).map(|s| s.name.clone()).unwrap_or_default();
                match self.scores.get(&name) {
                    Some(s) => Answer::Score(*s),
                    None => Answer::Error(format!("no `score {name}:` fixture")),
                }
            }
            Request::Callahead { recipient, .. } => match self.callahead.get(&recipient.to_ascii_lowercase()) {
                Some(Some((code, text))) => Answer::Reply { code: *code, text: text.clone() },
                Some(None) => Answer::Error("next hop unreachable".into()),
                None => {
                    self.fail(format!(
                        "the policy calls ahead for {recipient} and the case has no `callahead:` for it"
                    ));
                    Answer::Error("no fixture".into())
                }
            },
            Request::Greylist { client, sender, recipient, delay_ms, expire_ms } => {
                Answer::Bool(self.greylist.check(client, sender, recipient, self.now, *delay_ms, *expire_ms))
            }
            Request::BatvValid { address } => {
                let secret = prog.server.batv_keys.and_then(|id| prog.secrets.get(id.index())).map(|s| s.name.clone());
                let Some(keys) = secret.and_then(|s| self.secrets.get(&s).cloned()) else {
                    self.fail("`batv valid` needs the server's batv_keys secret as a fixture: `secret NAME: 0 key`");
                    return Answer::Error("no keys".into());
                };
                let lifetime = prog.server.batv_lifetime_days();
                let keys = batv::parse_keys(&keys);
                Answer::Bool(matches!(batv::verify(address, &keys, self.now, lifetime), batv::Check::Valid(_)))
            }
        }
    }
}
