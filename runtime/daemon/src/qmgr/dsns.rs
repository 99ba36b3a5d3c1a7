//! The queue manager's DSNs: a report for recipients of a stored message (RFC 3464),
//! through the policy's `bounce` and `delay` stages, honouring NOTIFY and RET, stored in
//! the spool as class `Bounce` and admitted like any message.

use super::*;

impl Qmgr {
    /// Build and queue a DSN for `rcpts` of a stored message, honouring NOTIFY, RET and the
    /// policy's bounce/delay stage. Bounces of bounces go nowhere (never to `<>`).
    pub(super) async fn dsn(
        &mut self,
        id: &QueueId,
        stored: &Stored,
        kind: DsnKind,
        rcpts: &[(usize, String)],
        expired: bool,
    ) {
        self.dsn_as(id, stored, kind, rcpts, expired, None).await
    }

    /// [`Qmgr::dsn`], with the report's action and the remote MTA given (a "relayed" DSN).
    pub(super) async fn dsn_as(
        &mut self,
        id: &QueueId,
        stored: &Stored,
        kind: DsnKind,
        rcpts: &[(usize, String)],
        expired: bool,
        report_as: Option<(dsn::NoticeKind, Option<String>)>,
    ) {
        let msg = &stored.message;
        let now = now_ms();
        // A bounce that cannot be delivered is a double bounce: it goes to the server's
        // `postmaster`, once (a double bounce that fails is dropped), never to `<>`.
        let double = msg.sender.is_empty();
        if double && kind != DsnKind::Failure {
            // A DSN or alert delivered (or delayed) owes nobody a notice: nothing to drop.
            return;
        }
        let to = if double {
            let pm =
                self.prog.server.postmaster.clone().unwrap_or_else(|| format!("postmaster@{}", self.shared.hostname));
            let already = String::from_utf8_lossy(&msg.data[..msg.data.len().min(4096)])
                .to_ascii_lowercase()
                .contains("x-mailpolicy-double-bounce:");
            if pm.is_empty() || already {
                self.shared.log.event(
                    "dsn-dropped",
                    &[
                        ("id", id.as_str()),
                        ("kind", "double-bounce"),
                        ("reason", if pm.is_empty() { "no postmaster setting" } else { "not a first failure" }),
                    ],
                );
                return;
            }
            pm
        } else {
            msg.sender.clone()
        };
        let sender = reverse_path(&to);
        let tkind = match (&report_as, kind) {
            (Some((k, _)), _) => *k,
            (None, DsnKind::Failure) => dsn::NoticeKind::Failure,
            (None, DsnKind::Delay) => dsn::NoticeKind::Delay,
            (None, DsnKind::Success) => dsn::NoticeKind::Success,
        };
        let remote_mta = report_as.as_ref().and_then(|(_, h)| h.as_deref());
        let mut entries = Vec::new();
        for (i, reply) in rcpts {
            let Some(r) = msg.recipients.get(*i) else { continue };
            let notify = notify_of(r);
            if !double && !dsn::should_notify(tkind, notify.as_ref(), &sender) {
                continue;
            }
            let rep = Reply::parse(reply).unwrap_or_else(|| {
                Reply::new(
                    if kind == DsnKind::Delay { 451 } else { 550 },
                    (if kind == DsnKind::Delay { 4 } else { 5 }, 0, 0),
                    reply.clone(),
                )
            });
            let outcome = match kind {
                DsnKind::Failure => DeliveryOutcome::Failed(rep),
                DsnKind::Delay => DeliveryOutcome::Deferred(rep),
                DsnKind::Success => DeliveryOutcome::Delivered(rep),
            };
            let mut e = DsnRecipient::from_outcome(tkind, &r.address, orcpt_of(r).as_ref(), &outcome, remote_mta, now);
            if kind == DsnKind::Delay {
                e.will_retry_until = Some(stored.arrived_ms + queue_config(&self.prog).max_queue_lifetime_ms);
            }
            entries.push(e);
        }
        if entries.is_empty() {
            return;
        }
        let lookups = self.shared.lookups();
        if kind == DsnKind::Delay
            && !route::delay_warning_allowed(&self.prog, &lookups, msg, now, id.as_str(), stored.arrived_ms).await
        {
            self.shared.log.event("dsn-dropped", &[("id", id.as_str()), ("kind", "delay"), ("by", "policy")]);
            return;
        }
        let kind_word = match (tkind, kind) {
            (dsn::NoticeKind::Relayed, _) => "relayed",
            (_, DsnKind::Failure) => "failure",
            (_, DsnKind::Delay) => "delay",
            (_, DsnKind::Success) => "success",
        };
        let reason = rcpts.first().map(|r| r.1.clone()).unwrap_or_default();
        // A "relayed" notice is a success notice to the bounce stage (`bounce.type`).
        let bounce_type = if kind_word == "relayed" { "success" } else { kind_word };
        let (allowed, effects) = route::bounce_allowed(
            &self.prog,
            &lookups,
            msg,
            &to,
            bounce_type,
            &reason,
            now,
            id.as_str(),
            stored.arrived_ms,
        )
        .await;
        if !allowed {
            self.shared
                .log
                .event("dsn-dropped", &[("id", id.as_str()), ("kind", kind_word), ("to", &to), ("by", "policy")]);
            return;
        }
        let size_limit = self.prog.server.bounce_size_limit as usize;
        let ret = match msg.ret.as_str() {
            "HDRS" => Some(smtp::Ret::Hdrs),
            "FULL" => Some(smtp::Ret::Full),
            _ => None,
        };
        let envid = (!msg.envid.is_empty()).then_some(msg.envid.as_str());
        let utf8 = dsn::Dsn::needs_global(msg.session.smtputf8, &sender, &entries);
        let d = dsn::Dsn {
            kind: tkind,
            hostname: &self.shared.hostname,
            sender: &sender,
            envid,
            ret,
            arrival_date: stored.arrived_ms,
            now,
            recipients: &entries,
            message: &msg.data,
            size_limit,
            utf8,
        };
        let mut data = dsn::build_dsn(&d);
        // Header changes the bounce stage asked for.
        let mut prefix = String::new();
        if double {
            prefix.push_str("X-Mailpolicy-Double-Bounce: yes\r\n");
        }
        for e in effects {
            if let crate::eval::Effect::HeaderAdd { name, value } = e {
                prefix.push_str(&format!("{name}: {value}\r\n"));
            }
        }
        if !prefix.is_empty() {
            let mut v = prefix.into_bytes();
            v.extend_from_slice(&data);
            data = v;
        }
        let eight_bit = !data.is_ascii();
        let bounce = QueuedMessage {
            sender: String::new(),
            recipients: vec![QueuedRcpt {
                address: to.clone(),
                notify: vec!["NEVER".into()],
                orcpt: String::new(),
                ..Default::default()
            }],
            data,
            client_ip: "127.0.0.1".into(),
            helo: self.shared.hostname.clone(),
            session: crate::conn::SessionRecord {
                // RFC 6533: a report on an SMTPUTF8 message is one itself; any 8-bit report
                // goes as 8BITMIME.
                smtputf8: utf8,
                mail_body: if eight_bit { "8BITMIME".into() } else { String::new() },
                ..crate::conn::SessionRecord::internal(&self.prog, &self.shared.hostname)
            },
            ..Default::default()
        };
        let size = bounce.data.len();
        match spool_io(&self.spool, move |s| s.store(&bounce, Class::Bounce, now).map_err(std::io::Error::other)).await
        {
            Ok(new_id) => {
                // Postfix's lines: bounce names the notice, qmgr queues it.
                let what = match kind_word {
                    "delay" => "sender delay notification",
                    "success" | "relayed" => "sender delivery status notification",
                    _ => "sender non-delivery notification",
                };
                let info = crate::log::Severity::Info;
                self.shared.log.summary("bounce", info, id.as_str(), &format!("{what}: {}", new_id.as_str()));
                self.shared.log.summary(
                    "qmgr",
                    info,
                    new_id.as_str(),
                    &format!("from=<>, size={size}, nrcpt=1 (queue active)"),
                );
                self.shared.log.event(
                    "dsn",
                    &[
                        ("id", id.as_str()),
                        ("kind", if double { "double-bounce" } else { kind_word }),
                        ("to", &to),
                        ("dsn_id", new_id.as_str()),
                        ("expired", if expired { "yes" } else { "" }),
                    ],
                );
                match self.shared.backup.get().filter(|b| b.peer.is_some()) {
                    // Its peer holds a copy before it is queued (section 5.5); the queue
                    // manager goes on meanwhile, and admits it when the copy is held.
                    Some(b) => {
                        let (b, shared, kind) = (b.clone(), self.shared.clone(), kind_word.to_string());
                        tokio::spawn(async move {
                            b.shadow_own(shared.log, new_id.as_str(), &kind).await;
                            shared.enqueued(new_id.as_str());
                        });
                    }
                    None => Box::pin(self.admit(new_id.as_str())).await,
                }
            }
            Err(e) => self.shared.log.event("dsn-failed", &[("id", id.as_str()), ("error", &e.to_string())]),
        }
    }
}
