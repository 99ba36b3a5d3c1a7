//! Admission: a stored message's open recipients routed with the policy's `route` stage
//! (expansions, copies, `archive`, recipients failed or expired at routing) and handed to
//! the scheduler.

use super::*;

impl Qmgr {
    fn lifetime(&self, class: Class) -> u64 {
        let c = self.sched.config();
        match class {
            Class::Normal => c.max_queue_lifetime_ms,
            Class::Bounce => c.bounce_queue_lifetime_ms,
        }
    }

    /// A message is in the spool: route its open recipients and schedule them.
    pub(super) async fn admit(&mut self, id: &str) {
        let Some(qid) = QueueId::parse(id) else { return };
        // A message a session (or this queue manager) has just stored is still in memory.
        let fresh = self.spool.take_fresh(&qid);
        let Some(stored) = (match fresh {
            Some(s) => Some(s),
            None => self.load(&qid).await,
        }) else {
            return;
        };
        crate::fault::check("qmgr-admit", &stored.message.data);
        let now = now_ms();
        let mut entry = Entry::new(qid.clone(), stored.class, stored.arrived_ms);
        entry.due_ms = stored.next_attempt_ms;
        entry.delay_warned = stored.delay_warned;
        entry.in_deferred = stored.queue == QueueName::Deferred;
        entry.held = stored.queue == QueueName::Hold;
        let mut updates = Vec::new();
        let mut failures = Vec::new();
        let mut expired = Vec::new();
        let fresh = stored.attempts == 0 && stored.states.iter().all(|s| matches!(s, RcptState::Pending));
        if fresh {
            self.archive(&stored, &stored.message.archive).await;
        }
        let mut copies: Vec<route::Copy> = Vec::new();
        for (i, st) in stored.states.iter().enumerate() {
            if st.is_final() {
                continue;
            }
            let attempts = match st {
                RcptState::Deferred { attempts, .. } => *attempts,
                _ => 0,
            };
            // A list's service address (LIST-request, owner-LIST, VERP bounces) is the list
            // manager's, before the route stage (spec/language.md 4.9).
            let service = match &stored.message.filter {
                Some(_) => None,
                None => {
                    crate::lists::service(&self.prog, &self.shared.lookups(), &stored.message.recipients[i].address)
                }
            };
            let handled = match service {
                Some((list, svc)) => {
                    let mgr = crate::lists::Manager {
                        shared: self.shared.clone(),
                        policy_dir: self.policy_dir.clone(),
                        spool_dir: self.spool.dir().to_path_buf(),
                    };
                    let h = mgr.handle(&list, &svc, &stored.message).await;
                    self.shared.log.event(
                        "list-service",
                        &[
                            ("id", id),
                            ("list", &list.name),
                            ("to", &stored.message.recipients[i].address),
                            ("result", &format!("{h:?}")),
                        ],
                    );
                    Some(h)
                }
                None => None,
            };
            let routed = match (handled, &stored.message.filter) {
                (Some(crate::lists::Handled::Done(text)), _) => {
                    let text: String =
                        text.chars().filter(|c| c.is_ascii() && !c.is_ascii_control()).take(300).collect();
                    updates.push((i, RcptState::Delivered { at: now, reply: format!("250 2.0.0 {text}") }));
                    continue;
                }
                (Some(crate::lists::Handled::Forward(to)), _) => Routed::Expand { members: vec![to], sender: None },
                (Some(crate::lists::Handled::Retry(text)), _) => Routed::Defer(Reply::new(451, (4, 3, 0), text)),
                // R44: a message with a content filter goes there first, whatever route says.
                (None, Some(t)) => route::filter_route(t, &stored.message.recipients[i].address),
                (None, None) => {
                    let (routed, wanted) = route::route(
                        &self.prog,
                        &self.shared.lookups(),
                        &self.policy_dir,
                        &stored.message,
                        i,
                        id,
                        stored.arrived_ms,
                        now,
                    )
                    .await;
                    // Copies are made once per message, when it is first routed, and never of
                    // a copy (a route-stage bcc would otherwise copy itself forever).
                    if fresh && !stored.message.copy {
                        for c in wanted {
                            if !copies.contains(&c) {
                                copies.push(c);
                            }
                        }
                    }
                    routed
                }
            };
            match routed {
                Routed::Deliver { key, transport, address, sender, headers, sign } => {
                    let Some(target) = target_for(&key, &address) else {
                        failures.push((i, format!("550 5.3.5 Bad destination {key}")));
                        continue;
                    };
                    let tls = match transport.tls {
                        TlsMode::Required | TlsMode::Implicit => TlsPolicy::Required,
                        TlsMode::None => TlsPolicy::None,
                        TlsMode::May | TlsMode::Dane | TlsMode::Sts => TlsPolicy::May,
                    };
                    let standards = match transport.tls {
                        TlsMode::Dane => Standards::Dane,
                        TlsMode::Sts => Standards::Sts,
                        _ => Standards::Fixed,
                    };
                    let implicit_tls = transport.tls == TlsMode::Implicit;
                    let cert = transport.cert.as_ref().map(|(c, k)| (self.policy_dir.join(c), self.policy_dir.join(k)));
                    let mx = transport.kind == mailpolicy_lang::ir::TransportKind::Mx;
                    let auth = transport
                        .auth
                        .and_then(|s| self.prog.secrets.get(s.index()))
                        .and_then(|s| self.shared.lookups().secret(&s.name).and_then(Credentials::parse));
                    let ca = transport
                        .ca
                        .clone()
                        .or_else(|| self.prog.server.tls_ca.clone())
                        .map(|f| self.policy_dir.join(f));
                    self.routes.insert(
                        (id.to_string(), i),
                        RouteInfo {
                            address,
                            sender,
                            target,
                            tls,
                            standards,
                            auth,
                            ca,
                            implicit_tls,
                            cert,
                            mx,
                            headers,
                            sign,
                        },
                    );
                    entry = entry.rcpt(i, key);
                    if let Some(last) = entry.rcpts.last_mut() {
                        last.attempts = attempts;
                    }
                }
                Routed::Expand { members, sender } => {
                    let rcpt = &stored.message.recipients[i];
                    let mut m = stored.message.clone();
                    if let Some(s) = sender {
                        m.sender = s;
                    }
                    // The expansion is the same message: its archive and bcc copies were made
                    // when the message itself was routed, so it makes none of its own (one
                    // archive copy per message, never one with the list owner as sender).
                    m.archive.clear();
                    m.copy = true;
                    m.recipients = members
                        .iter()
                        .map(|a| QueuedRcpt {
                            address: a.clone(),
                            notify: rcpt.notify.clone(),
                            orcpt: rcpt.orcpt.clone(),
                            ..Default::default()
                        })
                        .collect();
                    if crate::headers::received_count(&m.data) > 50 {
                        failures.push((i, "554 5.4.6 Mail loop: too many Received headers".into()));
                        continue;
                    }
                    let class = stored.class;
                    match spool_io(&self.spool, move |s| s.store(&m, class, now).map_err(std::io::Error::other)).await {
                        Ok(new_id) => {
                            self.shared.log.event(
                                "expanded",
                                &[
                                    ("id", id),
                                    ("rcpt", &rcpt.address),
                                    ("into", new_id.as_str()),
                                    ("members", &members.join(",")),
                                ],
                            );
                            updates.push((
                                i,
                                RcptState::Delivered {
                                    at: now,
                                    reply: format!("250 2.1.5 expanded to {}", members.join(", ")),
                                },
                            ));
                            Box::pin(self.admit(new_id.as_str())).await;
                        }
                        Err(e) => self.shared.log.event("expand-failed", &[("id", id), ("error", &e.to_string())]),
                    }
                }
                Routed::ExpandList(name) => {
                    let lookups = self.shared.lookups();
                    let Some(list) = crate::lists::by_name(&self.prog, &lookups, &name) else {
                        failures.push((i, format!("550 5.1.1 no mailing list {name}")));
                        continue;
                    };
                    let members = match crate::lists::members(&self.policy_dir, &self.prog, &lookups, &list).await {
                        Ok(m) => m,
                        Err(e) => {
                            self.shared.log.event("list-expand-failed", &[("id", id), ("list", &name), ("error", &e)]);
                            updates.push((
                                i,
                                RcptState::Deferred {
                                    attempts: attempts + 1,
                                    next_at: now + 300_000,
                                    last_reply: format!("451 4.3.0 list {name}: {e}"),
                                },
                            ));
                            continue;
                        }
                    };
                    if members.is_empty() {
                        updates.push((
                            i,
                            RcptState::Delivered {
                                at: now,
                                reply: format!("250 2.1.5 list {name} has no subscribers"),
                            },
                        ));
                        continue;
                    }
                    if crate::headers::received_count(&stored.message.data) > 50 {
                        failures.push((i, "554 5.4.6 Mail loop: too many Received headers".into()));
                        continue;
                    }
                    // One copy for all subscribers; each is routed with its own VERP sender and
                    // List-* headers (route.rs), so each gets an envelope of its own.
                    let mut m = stored.message.clone();
                    m.sender = list.owner_address();
                    m.list = Some(list.name.clone());
                    m.archive.clear();
                    m.copy = true;
                    m.recipients = members
                        .iter()
                        .map(|a| QueuedRcpt {
                            address: a.clone(),
                            notify: vec!["FAILURE".into()],
                            ..Default::default()
                        })
                        .collect();
                    let class = stored.class;
                    let n = members.len();
                    match spool_io(&self.spool, move |s| s.store(&m, class, now).map_err(std::io::Error::other)).await {
                        Ok(new_id) => {
                            self.shared.log.event(
                                "list-expanded",
                                &[
                                    ("id", id),
                                    ("list", &name),
                                    ("into", new_id.as_str()),
                                    ("subscribers", &n.to_string()),
                                ],
                            );
                            updates.push((
                                i,
                                RcptState::Delivered {
                                    at: now,
                                    reply: format!("250 2.1.5 expanded to {n} subscribers of list {name}"),
                                },
                            ));
                            Box::pin(self.admit(new_id.as_str())).await;
                        }
                        Err(e) => {
                            self.shared.log.event("expand-failed", &[("id", id), ("error", &e.to_string())]);
                        }
                    }
                }
                Routed::Fail(r) => {
                    self.shared.log.event(
                        "route-failed",
                        &[("id", id), ("to", &stored.message.recipients[i].address), ("reply", &r.line())],
                    );
                    if !self.sched.config().soft_bounce {
                        crate::metrics::get().delivery("bounced");
                        let times = Delays { arrived: stored.arrived_ms, started: now, setup: 0, ended: now };
                        let line =
                            summary_line(&stored.message.recipients[i].address, "none", &times, "bounced", &r.line());
                        self.shared.log.summary("qmgr", Severity::Warning, id, &line);
                    }
                    failures.push((i, r.line()))
                }
                Routed::Defer(r) if now.saturating_sub(stored.arrived_ms) >= self.lifetime(stored.class) => {
                    // Deferred at route past the queue lifetime: it expires like any deferral.
                    expired.push((i, format!("{} (queue lifetime expired)", r.line())));
                }
                Routed::Defer(r) => {
                    // Route again at the next queue run.
                    updates.push((
                        i,
                        RcptState::Deferred { attempts: attempts + 1, next_at: now + 300_000, last_reply: r.line() },
                    ));
                }
                Routed::Discard => {
                    updates.push((i, RcptState::Delivered { at: now, reply: "250 2.0.0 discarded by policy".into() }))
                }
            }
        }
        // Route-stage bcc and archive (R12).
        let archive: Vec<String> = copies
            .iter()
            .filter_map(|c| if let route::Copy::Archive(f) = c { Some(f.clone()) } else { None })
            .collect();
        if !archive.is_empty() {
            self.archive(&stored, &archive).await;
        }
        for c in &copies {
            if let route::Copy::Bcc(to) = c {
                let mut m = stored.message.clone();
                m.recipients = vec![QueuedRcpt {
                    address: to.clone(),
                    notify: vec!["NEVER".into()],
                    orcpt: String::new(),
                    ..Default::default()
                }];
                m.copy = true;
                m.archive.clear();
                match self.spool.store(&m, stored.class, now) {
                    Ok(new_id) => {
                        self.shared.log.event("bcc", &[("id", id), ("to", to), ("copy", new_id.as_str())]);
                        Box::pin(self.admit(new_id.as_str())).await;
                    }
                    Err(e) => self.shared.log.event("bcc-failed", &[("id", id), ("to", to), ("error", &e.to_string())]),
                }
            }
        }
        if self.sched.config().soft_bounce {
            // soft_bounce (R40): what would bounce here is deferred and routed again later.
            for (i, r) in std::mem::take(&mut failures) {
                let last_reply = crate::eval::soft_bounce_line(&r);
                updates.push((i, RcptState::Deferred { attempts: 1, next_at: now + 300_000, last_reply }));
            }
        }
        failures.extend(expired);
        if !failures.is_empty() {
            self.dsn(&qid, &stored, DsnKind::Failure, &failures, false).await;
            for (i, r) in &failures {
                updates.push((*i, RcptState::Failed { at: now, reply: r.clone() }));
            }
        }
        // What admission read is what the spool holds unless it records something now.
        let unchanged = updates.is_empty();
        if !updates.is_empty() {
            let q = qid.clone();
            if let Err(e) = spool_io(&self.spool, move |s| s.record(&q, &updates, None)).await {
                self.shared.log.event("record-failed", &[("id", id), ("error", &e.to_string())]);
            }
        }
        if entry.rcpts.is_empty() {
            let q = qid.clone();
            let removed = spool_io(&self.spool, move |s| {
                let done = s.load(&q)?.states.iter().all(RcptState::is_final);
                if done {
                    s.remove(&q)?;
                }
                Ok(done)
            })
            .await;
            if matches!(removed, Ok(true)) {
                removed_line(&self.shared, id);
            }
            return;
        }
        if !entry.held && stored.queue == QueueName::Incoming {
            // One rename with no fsync, done in place: a hand-off to the blocking pool and
            // back costs more than the rename itself (issue 13).
            let _ = self.spool.activate(&qid);
        }
        // Only what is due now: a copy waits for its first job, not for a retry minutes away.
        let soon = !entry.held && entry.due_ms <= now;
        self.sched.add(entry, now);
        if unchanged && soon {
            self.handoff.put(stored);
        }
    }

    /// `archive FOLDER` (R12): a copy in the Maildir folder under the server's maildir.
    pub(super) async fn archive(&self, stored: &Stored, folders: &[String]) {
        for folder in folders {
            let root = crate::route::maildir_root(&self.prog, &self.policy_dir);
            let safe: String =
                folder.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
            let safe = safe.trim_start_matches('.').to_string();
            let dir = root.join(if safe.is_empty() { "archive".to_string() } else { safe });
            let dir = crate::paths::Confined { root: Some(root.clone()), path: dir };
            let env = Envelope {
                from: reverse_path(&stored.message.sender),
                params: MailParams::default(),
                recipients: Vec::new(),
            };
            let data = stored.message.data.clone();
            let d = dir.clone();
            let res =
                tokio::task::spawn_blocking(move || crate::transport::local::deliver_maildir_in(&d, &env, &data)).await;
            let ok = matches!(res, Ok(Ok(_)));
            self.shared.log.event(
                "archive",
                &[
                    ("id", stored.id.as_str()),
                    ("folder", &dir.path.display().to_string()),
                    ("status", if ok { "stored" } else { "failed" }),
                ],
            );
        }
    }
}

/// The delivery target for a route key.
fn target_for(key: &str, address: &str) -> Option<Target> {
    // the key's attributes (`route::route`) are not part of the destination
    let end = [" tls", " cert=", " from=", " headers="].iter().filter_map(|m| key.find(m)).min().unwrap_or(key.len());
    let key = key.get(..end).unwrap_or(key);
    if let Some(domain) = key.strip_prefix("mx:") {
        let d = if domain.is_empty() { mailpolicy_stdlib::address::split(address).1 } else { domain.to_string() };
        return Destination::parse(&d).map(Target::Smtp);
    }
    Target::parse(key)
}
