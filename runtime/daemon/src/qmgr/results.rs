//! A finished job's results: the scheduler's commands (DSNs, relayed notices, spool
//! records, deferral, removal) carried out in order.

use super::*;

impl Qmgr {
    pub(super) async fn finish(&mut self, d: JobDone) {
        let now = now_ms();
        let id = d.job.id.clone();
        let removed = d.removed;
        let cmds = self.sched.done(d.job, d.results, now);
        // RFC 3461 section 4: a recipient relayed to a server with DSN gets no notice from
        // us (NOTIFY went on with it); one relayed to a server without gets one "relayed"
        // notice instead of "delivered".
        let mut out = Vec::with_capacity(cmds.len());
        let mut relayed_notice = Vec::new();
        for c in cmds {
            match c {
                Command::Dsn { id: cid, class, kind: DsnKind::Success, rcpts, expired } if cid == id => {
                    let mut delivered = Vec::new();
                    for (i, reply) in rcpts {
                        match d.relayed.iter().find(|(r, _, _)| *r == i) {
                            Some((_, true, _)) => {}
                            Some((_, false, host)) => relayed_notice.push((i, reply, host.clone())),
                            None => delivered.push((i, reply)),
                        }
                    }
                    if !delivered.is_empty() {
                        out.push(Command::Dsn { id: cid, class, kind: DsnKind::Success, rcpts: delivered, expired });
                    }
                }
                other => out.push(other),
            }
        }
        if !relayed_notice.is_empty() {
            if let Some(stored) = self.load(&id).await {
                let rcpts: Vec<(usize, String)> = relayed_notice
                    .iter()
                    .map(|(i, _, host)| {
                        let text = match host {
                            Some(h) => format!("250 2.0.0 relayed to {h}, which does not support DSN"),
                            None => "250 2.0.0 relayed to a host without DSN support".to_string(),
                        };
                        (*i, text)
                    })
                    .collect();
                let host = relayed_notice.iter().find_map(|(_, _, h)| h.clone());
                self.dsn_as(&id, &stored, DsnKind::Success, &rcpts, false, Some((dsn::NoticeKind::Relayed, host)))
                    .await;
            }
        }
        self.commands(out, removed).await;
    }

    /// Execute the scheduler's commands, in order.
    /// `removed`: the delivery task already removed the message (see `JobDone::removed`).
    pub(super) async fn commands(&mut self, cmds: Vec<Command>, removed: bool) {
        for c in cmds {
            match c {
                // The delivery task removed the message (every recipient delivered, no success
                // DSN asked for): the scheduler's success-DSN check and removal are done.
                Command::Dsn { kind: DsnKind::Success, .. } | Command::Record { .. } if removed => {}
                Command::Remove { id } if removed => {
                    for k in self.routes.keys().filter(|(m, _)| m == id.as_str()).cloned().collect::<Vec<_>>() {
                        self.routes.remove(&k);
                    }
                    removed_line(&self.shared, id.as_str());
                }
                Command::Dsn { id, kind, rcpts, expired, .. } => {
                    if let Some(stored) = self.load(&id).await {
                        self.dsn(&id, &stored, kind, &rcpts, expired).await;
                        if kind == DsnKind::Delay {
                            let q = id.clone();
                            let _ = spool_io(&self.spool, move |s| s.set_delay_warned(&q)).await;
                        }
                    }
                }
                Command::Record { id, updates, next_attempt_ms } => {
                    let q = id.clone();
                    if let Err(e) = spool_io(&self.spool, move |s| s.record(&q, &updates, next_attempt_ms)).await {
                        self.shared.log.event("record-failed", &[("id", id.as_str()), ("error", &e.to_string())]);
                    }
                }
                Command::Defer { id } => {
                    let _ = spool_io(&self.spool, move |s| s.defer(&id)).await;
                }
                Command::Remove { id } => {
                    for k in self.routes.keys().filter(|(m, _)| m == id.as_str()).cloned().collect::<Vec<_>>() {
                        self.routes.remove(&k);
                    }
                    // The scheduler has forgotten the message; its removal (a group-committed
                    // directory fsync) need not hold up the next admission or delivery.
                    let spool = self.spool.clone();
                    let shared = self.shared.clone();
                    self.removals.spawn_blocking(move || match spool.remove(&id) {
                        Ok(()) => removed_line(&shared, id.as_str()),
                        Err(e) => shared.log.event("remove-failed", &[("id", id.as_str()), ("error", &e.to_string())]),
                    });
                }
            }
        }
    }
}
