//! A case's items played in order: the client's lines and the replies they expect, the
//! clock, TLS and session boundaries, and the expectations on verdicts, queued messages
//! and the queue side's stages.

use super::*;

impl CaseRun {
    pub(super) fn item(&mut self, item: &Item) {
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
}
