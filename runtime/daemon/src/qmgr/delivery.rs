//! A delivery job as a task of its own: the stored message (or the admission's copy), the
//! transport for its route, each recipient's result recorded in the spool by the task
//! itself, and the per-recipient log lines.

use super::*;

impl Qmgr {
    /// A delivery task for one job.
    pub(super) fn delivery(&mut self, job: Job) -> impl std::future::Future<Output = JobDone> + Send + 'static {
        let handed = self.handoff.take(&job);
        let spool = self.spool.clone();
        let prog = self.prog.clone();
        let shared = self.shared.clone();
        let routes: Vec<Option<RouteInfo>> =
            job.rcpts.iter().map(|i| self.routes.get(&(job.id.as_str().to_string(), *i)).cloned()).collect();
        let resolver = self.resolver.clone();
        let cache = self.cache.clone();
        let security = self.security.clone();
        let hostname = shared.hostname.clone();
        let soft_bounce = self.sched.config().soft_bounce;
        async move {
            let id = job.id.clone();
            let load = async {
                match handed {
                    Some(s) => Ok(Ok(s)),
                    None => {
                        let (spool, id) = (spool.clone(), id.clone());
                        tokio::task::spawn_blocking(move || spool.load(&id).map(Arc::new)).await
                    }
                }
            };
            let stored = match load.await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    let r = format!("451 4.3.0 cannot read the queue file: {e}");
                    return JobDone::deferred(job, &r);
                }
                Err(e) => {
                    let r = format!("451 4.3.0 {e}");
                    return JobDone::deferred(job, &r);
                }
            };
            crate::fault::check("delivery", &stored.message.data);
            let Some(Some(first)) = routes.first().cloned() else {
                let r = "451 4.3.0 recipient not routed".to_string();
                return JobDone::deferred(job, &r);
            };
            let msg = &stored.message;
            let lookups = shared.lookups();
            let base_sender = first.sender.clone().unwrap_or_else(|| msg.sender.clone());
            let sender = if msg.batv_sign && !base_sender.is_empty() {
                match lookups.batv_keys(&prog).and_then(|k| k.into_iter().max_by_key(|(n, _)| *n)) {
                    Some((n, key)) => mailpolicy_stdlib::batv::sign(
                        &base_sender,
                        n,
                        &key,
                        now_ms(),
                        crate::lookup::batv_lifetime_days(&prog),
                    ),
                    None => base_sender.clone(),
                }
            } else {
                base_sender.clone()
            };
            let mut env = Envelope { from: reverse_path(&sender), params: mail_params(msg), recipients: Vec::new() };
            let mut indices = Vec::new();
            for (k, i) in job.rcpts.iter().enumerate() {
                let (Some(r), Some(info)) = (msg.recipients.get(*i), routes.get(k).cloned().flatten()) else {
                    continue;
                };
                let Some(path) = forward_path(&info.address) else { continue };
                env.recipients.push(Recipient { path, params: rcpt_params(r) });
                indices.push(*i);
            }
            let mut opts = DeliveryOptions::new(hostname.clone(), resolver);
            opts.tls = first.tls;
            if first.standards != Standards::Fixed {
                match security {
                    Ok(s) => {
                        opts.standards = first.standards;
                        opts.security = Some(s);
                    }
                    Err(e) => {
                        let r = format!("451 4.7.5 cannot read mta_sts_ca: {e}");
                        return JobDone::deferred(job, &r);
                    }
                }
            }
            if let Some(ca) = &first.ca {
                match driver::roots_from_pem(ca) {
                    Ok(roots) => opts.tls_roots = Some(roots),
                    Err(e) => {
                        // A CA file that cannot be read is the administrator's to fix: defer.
                        shared.log.event("tls-ca-failed", &[("id", id.as_str()), ("error", &e)]);
                        let r = format!("451 4.7.5 cannot read the CA file: {e}");
                        return JobDone::deferred(job, &r);
                    }
                }
            }
            if let Some((c, k)) = &first.cert {
                match driver::ClientCert::from_pem(c, k) {
                    Ok(cc) => opts.client_cert = Some(cc),
                    Err(e) => {
                        shared.log.event("tls-cert-failed", &[("id", id.as_str()), ("error", &e)]);
                        let r = format!("451 4.7.5 cannot read the client certificate: {e}");
                        return JobDone::deferred(job, &r);
                    }
                }
            }
            opts.implicit_tls = first.implicit_tls;
            if first.mx {
                opts.fallback = prog.server.fallback_relay.as_deref().and_then(Destination::parse);
            }
            opts.auth = first.auth.clone();
            opts.cache = Some(cache);
            opts.local = LocalIdentity { hostnames: vec![hostname.clone()], addrs: local_addrs(&shared) };
            // The route stage's header edits, made to this envelope's copy only.
            let edited;
            let data: &[u8] = if first.headers.is_empty() {
                &msg.data
            } else {
                edited = crate::headers::edit(&msg.data, "", &first.headers);
                &edited
            };
            // A mailing list copy is signed now, after its List-* fields were added, so the
            // signature covers List-Unsubscribe and List-Unsubscribe-Post (RFC 8058).
            let signed;
            let data: &[u8] = match (&first.sign, lookups.signer.as_ref()) {
                (Some(domain), Some(signer)) => match signer.sign_list(data, domain) {
                    Ok(Some(h)) => {
                        let mut v = h.into_bytes();
                        v.extend_from_slice(data);
                        signed = v;
                        &signed
                    }
                    Ok(None) => data,
                    Err(e) => {
                        shared.log.event("dkim-sign-failed", &[("id", id.as_str()), ("error", &e)]);
                        data
                    }
                },
                _ => data,
            };
            let attempt_started = now_ms();
            let report: DeliveryReport = driver::deliver(&first.target, &env, data, &opts).await;
            let now = now_ms();
            let mut results = Vec::new();
            let mut relayed = Vec::new();
            for (k, i) in indices.iter().enumerate() {
                let outcome = report
                    .recipients
                    .get(k)
                    .cloned()
                    .unwrap_or_else(|| DeliveryOutcome::Deferred(Reply::new(451, (4, 3, 0), "no result")));
                let rcpt = &msg.recipients[*i];
                let reply = outcome.reply().clone();
                let facts = DeliveryFacts {
                    code: reply.code,
                    status: reply.enhanced.map(|(a, b, c)| format!("{a}.{b}.{c}")).unwrap_or_default(),
                    text: reply.text.clone(),
                    host: report.remote_host.clone().unwrap_or_default(),
                    attempts: job.attempt,
                };
                let policy =
                    route::after_attempt(&prog, &lookups, msg, rcpt, facts, now, id.as_str(), stored.arrived_ms).await;
                let text = reply.line().replace(['\r', '\n'], " ");
                let d = match (policy, &outcome) {
                    (Some(PolicyOutcome::Tempfail(r)), _) => Delivery::TempFail(r.line()),
                    (Some(PolicyOutcome::Reject(r)), _) => Delivery::PermFail(r.line()),
                    (_, DeliveryOutcome::Delivered(_)) => Delivery::Delivered(text),
                    (_, DeliveryOutcome::Deferred(_)) => Delivery::TempFail(text),
                    (_, DeliveryOutcome::Failed(_)) => Delivery::PermFail(text),
                };
                // soft_bounce (R40): logged and recorded as the deferral it becomes.
                let d = match d {
                    Delivery::PermFail(t) if soft_bounce => Delivery::TempFail(crate::eval::soft_bounce_line(&t)),
                    d => d,
                };
                shared.log.event(
                    "delivery",
                    &[
                        ("id", id.as_str()),
                        ("to", &rcpt.address),
                        ("relay", &report.remote_mta.clone().unwrap_or_else(|| first.target.to_string())),
                        (
                            "status",
                            match &d {
                                Delivery::Delivered(_) => "sent",
                                Delivery::TempFail(_) => "deferred",
                                Delivery::PermFail(_) => "bounced",
                            },
                        ),
                        (
                            "reply",
                            match &d {
                                Delivery::Delivered(r) | Delivery::TempFail(r) | Delivery::PermFail(r) => r,
                            },
                        ),
                        ("tls", if report.tls { "yes" } else { "no" }),
                        ("tls_policy", report.tls_policy.unwrap_or("")),
                    ],
                );
                crate::metrics::get().delivery(match &d {
                    Delivery::Delivered(_) => "delivered",
                    Delivery::TempFail(_) => "deferred",
                    Delivery::PermFail(_) => "bounced",
                });
                {
                    // Postfix's per-recipient line (smtp, lmtp or local).
                    let (program, relay) = match &first.target {
                        Target::Smtp(_) => ("smtp", report.remote_mta.clone()),
                        Target::Lmtp(_) => ("lmtp", report.remote_mta.clone()),
                        Target::Maildir(_) | Target::Mbox(_) => ("local", Some("local".to_string())),
                    };
                    let (status, reply) = match &d {
                        Delivery::Delivered(r) => ("sent", r),
                        Delivery::TempFail(r) => ("deferred", r),
                        Delivery::PermFail(r) => ("bounced", r),
                    };
                    let setup = report.setup.map(|t| t.as_millis() as u64).unwrap_or(0);
                    let times = Delays { arrived: stored.arrived_ms, started: attempt_started, setup, ended: now };
                    let line = summary_line(&rcpt.address, relay.as_deref().unwrap_or("none"), &times, status, reply);
                    let sev = if status == "sent" { Severity::Info } else { Severity::Warning };
                    shared.log.summary(program, sev, id.as_str(), &line);
                }
                // R1: relayed to another SMTP server, which reports success itself when it
                // takes DSN; otherwise we owe one "relayed" DSN, not a "delivered" one.
                if matches!(d, Delivery::Delivered(_)) && matches!(first.target, Target::Smtp(_)) {
                    relayed.push((*i, report.next_hop_dsn, report.remote_host.clone()));
                }
                results.push((*i, d));
            }
            // Record what the next hop accepted now, before this job's result travels back to
            // the queue manager: a crash from here on does not deliver these again (10.7).
            let delivered: Vec<(usize, RcptState)> = results
                .iter()
                .filter_map(|(i, d)| match d {
                    Delivery::Delivered(r) => Some((*i, RcptState::Delivered { at: now, reply: r.clone() })),
                    _ => None,
                })
                .collect();
            // When that leaves no recipient open (the common case: one recipient, one job) and
            // nobody asked for a success DSN, the message is done: removing it (one group-
            // committed unlink of the message and its state) is that record, and it saves a
            // state file written, fsynced and renamed only to be deleted next (issue 13).
            let done = !delivered.is_empty()
                && results.len() == job.rcpts.len()
                && results.iter().all(|(_, d)| matches!(d, Delivery::Delivered(_)))
                && stored.states.iter().enumerate().all(|(i, st)| st.is_final() || job.rcpts.contains(&i))
                && !msg.recipients.iter().any(|r| r.notify.iter().any(|n| n.eq_ignore_ascii_case("SUCCESS")));
            let mut removed = false;
            if done {
                let (s, q) = (spool.clone(), id.clone());
                match tokio::task::spawn_blocking(move || s.remove(&q)).await {
                    Ok(Ok(())) => removed = true,
                    Ok(Err(e)) => shared.log.event("remove-failed", &[("id", id.as_str()), ("error", &e.to_string())]),
                    Err(e) => shared.log.event("remove-failed", &[("id", id.as_str()), ("error", &e.to_string())]),
                }
            }
            if !delivered.is_empty() && !removed {
                let (s, q) = (spool.clone(), id.clone());
                match tokio::task::spawn_blocking(move || s.mark_delivered(&q, &delivered)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => shared.log.event("record-failed", &[("id", id.as_str()), ("error", &e.to_string())]),
                    Err(e) => shared.log.event("record-failed", &[("id", id.as_str()), ("error", &e.to_string())]),
                }
            }
            // Recipients that could not be put in the envelope fail for good.
            for i in &job.rcpts {
                if !indices.contains(i) {
                    results.push((*i, Delivery::PermFail("553 5.1.3 Bad recipient address syntax".into())));
                }
            }
            JobDone { job, results, relayed, panic: None, removed }
        }
    }
}

fn local_addrs(_shared: &Shared) -> Vec<std::net::IpAddr> {
    vec![std::net::IpAddr::from([127, 0, 0, 1]), std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST)]
}
