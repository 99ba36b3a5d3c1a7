//! The queue manager: the daemon's host for the sans-IO [`Scheduler`]. It routes each
//! stored message's recipients with the policy's `route` stage, runs delivery jobs through
//! the transports, records results durably in the spool, and sends DSNs (through the
//! policy's `bounce` and `delay` stages) as the scheduler's commands say.
//!
//! One task owns the scheduler; deliveries run as separate tasks and report back.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mailpolicy_lang::ir::{Program, TlsMode};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::route::{self, Routed};
use super::{now_ms, Shared};
use crate::conn::{QueuedMessage, QueuedRcpt};
use crate::eval::{DeliveryFacts, Outcome as PolicyOutcome};
use crate::log::Severity;
use crate::queue::{Command, Delivery, DsnKind, Entry, Job, QueueConfig, Scheduler};
use crate::record::{forward_path, mail_params, notify_of, orcpt_of, rcpt_params, reverse_path};
use crate::smtp::{self, Envelope, MailParams, Recipient, Reply};
use crate::spool::{Class, QueueId, QueueName, RcptState, Spool, Stored};
use crate::transport::client::{Credentials, TlsPolicy};
use crate::transport::driver::{self, DeliveryOptions, DeliveryOutcome, DeliveryReport, Target};
use crate::transport::dsn::{self, DsnRecipient};
use crate::transport::mx::{Destination, LocalIdentity, Resolver};
use crate::transport::security::{Security, Standards};

mod admission;
mod delivery;
mod dsns;
mod results;

enum Ctl {
    Reload(Arc<Program>),
    Stop(oneshot::Sender<()>),
    /// A `mailc queue` command from the control socket (`control.rs`).
    Admin(crate::control::Op, oneshot::Sender<crate::control::Answer>),
}

/// Handle on the running queue manager.
pub struct QmgrHandle {
    ctl: mpsc::UnboundedSender<Ctl>,
}

impl QmgrHandle {
    pub fn reload(&self, prog: Arc<Program>) {
        let _ = self.ctl.send(Ctl::Reload(prog));
    }
    /// Carry out a `mailc queue` command now: the spool's files changed as `mailc queue`
    /// changes them, then the scheduler (a flushed message is due at once).
    pub async fn admin(&self, op: crate::control::Op) -> crate::control::Answer {
        use crate::control::Answer;
        let (tx, rx) = oneshot::channel();
        if self.ctl.send(Ctl::Admin(op, tx)).is_err() {
            return Answer::fail(2, "the queue manager is not running");
        }
        rx.await.unwrap_or_else(|_| Answer::fail(2, "the queue manager stopped before answering"))
    }
    /// Stop starting deliveries and wait for those in flight.
    pub async fn stop(&self) {
        let (tx, rx) = oneshot::channel();
        if self.ctl.send(Ctl::Stop(tx)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(60), rx).await;
        }
    }
}

/// Scheduler settings from the policy's `server { }` (Postfix defaults otherwise).
pub fn queue_config(p: &Program) -> QueueConfig {
    QueueConfig::from_settings(&p.server)
}

/// The outbound session cache: as many idle sessions per destination as deliveries may run
/// to it at once, so that at full concurrency a finished delivery's session is kept for the
/// next message instead of being closed while the next delivery opens a new one. Kept
/// for the server's `connection_cache_time_limit`, reused up to `connection_reuse_*_limit`.
fn session_cache(p: &Program) -> driver::ConnectionCache {
    let mut c = driver::ConnectionCache::new(p.server.connection_cache_time_limit);
    c.max_per_key = c.max_per_key.max(queue_config(p).destination_concurrency_limit as usize);
    c.max_uses = p.server.connection_reuse_count_limit;
    c.max_age = p.server.connection_reuse_time_limit;
    c
}

/// DANE, MTA-STS and TLS-RPT for one policy load: the DNSSEC-aware client on the policy's
/// name server, MTA-STS policies cached under `SPOOL/sts` and fetched with `mta_sts_port`
/// and `mta_sts_ca`, session results under `SPOOL/tlsrpt` (when reports are on).
fn security_for(
    p: &Program,
    policy_dir: &std::path::Path,
    spool_dir: &std::path::Path,
) -> Result<Arc<Security>, String> {
    use crate::transport::{dane::SecureDns, sts::Sts, tlsrpt::Recorder};
    let server = p.server.dns_server.as_deref().and_then(|a| a.parse().ok());
    let roots = match &p.server.mta_sts_ca {
        Some(f) => driver::roots_from_pem(&policy_dir.join(f))?,
        None => driver::system_roots(),
    };
    let report = (!p.server.tls_report_interval.is_zero()).then(|| Arc::new(Recorder::new(spool_dir.join("tlsrpt"))));
    Ok(Arc::new(Security {
        dns: SecureDns::new(server, p.server.dns_timeout),
        sts: Sts {
            dir: spool_dir.join("sts"),
            port: u16::try_from(p.server.mta_sts_port).unwrap_or(443),
            roots,
            timeout: p.server.lookup_timeout.max(Duration::from_secs(1)),
        },
        report,
    }))
}

/// When the next TLS-RPT reports are due: a period starts at start-up or when the last
/// report run did (kept in `SPOOL/tlsrpt/period` once there are results, so a restart does
/// not reset it). Nothing is written to the spool for a server that has no results.
fn report_due(p: &Program, spool_dir: &std::path::Path) -> Option<u64> {
    let every = p.server.tls_report_interval.as_millis() as u64;
    if every == 0 {
        return None;
    }
    let file = spool_dir.join("tlsrpt").join("period");
    let start = std::fs::read_to_string(&file).ok().and_then(|t| t.trim().parse::<u64>().ok()).unwrap_or_else(now_ms);
    Some(start.saturating_add(every))
}

/// How one routed recipient is delivered.
#[derive(Clone, Debug)]
struct RouteInfo {
    address: String,
    /// The envelope sender when the route stage rewrote it.
    sender: Option<String>,
    target: Target,
    tls: TlsPolicy,
    /// `:tls dane` / `:tls sts`: each hop's TLS decided by DANE and MTA-STS.
    standards: Standards,
    auth: Option<Credentials>,
    /// The CA file a verified next hop must chain to (`:ca`, else the server's `tls_ca`);
    /// None: the system's trust store.
    ca: Option<PathBuf>,
    /// `:tls implicit` (RFC 8314).
    implicit_tls: bool,
    /// `:cert`/`:key`: the client certificate files.
    cert: Option<(PathBuf, PathBuf)>,
    /// MX delivery (`deliver mx`, or falling off the end of route): the server's
    /// `fallback_relay` applies.
    mx: bool,
    /// The route stage's header edits for this envelope's copy.
    headers: Vec<crate::headers::Edit>,
    /// A mailing list copy: DKIM-sign it for this domain after the edits.
    sign: Option<String>,
}

struct JobDone {
    job: Job,
    results: Vec<(usize, Delivery)>,
    /// Recipients relayed to another SMTP server (R1, RFC 3461 section 4): whether that
    /// server took DSN (then it reports success itself), and its name.
    relayed: Vec<(usize, bool, Option<String>)>,
    /// The delivery panicked (caught at the task boundary), with the panic's text.
    panic: Option<String>,
    /// The delivery task removed the message from the spool itself: this job delivered
    /// every recipient still open and none asked for a success DSN (see `delivery`).
    removed: bool,
}

impl JobDone {
    /// Every recipient of `job` deferred with `reply` (the delivery could not start).
    fn deferred(job: Job, reply: &str) -> JobDone {
        let results = job.rcpts.iter().map(|i| (*i, Delivery::TempFail(reply.to_string()))).collect();
        JobDone { job, results, relayed: Vec::new(), panic: None, removed: false }
    }
}

struct Qmgr {
    shared: Arc<Shared>,
    spool: Spool,
    policy_dir: PathBuf,
    prog: Arc<Program>,
    sched: Scheduler,
    routes: HashMap<(String, usize), RouteInfo>,
    resolver: Arc<dyn Resolver>,
    cache: Arc<driver::ConnectionCache>,
    /// DANE, MTA-STS and TLS-RPT as the policy sets them up (`Err`: `mta_sts_ca` cannot
    /// be read, and deliveries under `:tls dane`/`:tls sts` are deferred).
    security: Result<Arc<Security>, String>,
    /// When the next TLS-RPT reports are due (ms), None for never.
    next_report: Option<u64>,
    /// Removals of delivered messages, running on the blocking pool while the queue manager
    /// goes on; drained before a queue scan so a scan never sees a message being removed.
    removals: JoinSet<()>,
    /// Shared with the supervisor: the message being worked on.
    current: Current,
    /// Messages as admission read them, handed to their first delivery so that it does
    /// not read the same files again (see [`Handoff`]).
    handoff: Handoff,
}

/// Messages admission has just read, kept for their first delivery job. A message is put
/// here only when admission changed none of its state (so the copy is what the spool
/// holds), and a delivery takes it only when its job has every recipient still open (so no
/// other job can have changed the state since); anything else reads the spool as before.
/// Every copy leaves at its message's first delivery, or when the queue manager forgets
/// the message (`mailc queue`, quarantine). Bounded in bytes: above the bound, and for
/// large messages, the delivery reads the spool.
#[derive(Default)]
struct Handoff {
    by_id: HashMap<QueueId, Arc<Stored>>,
    bytes: usize,
}

impl Handoff {
    /// At most this many bytes of message data are kept in all.
    const MAX_BYTES: usize = 32 << 20;
    /// A message larger than this is never kept.
    const MAX_MESSAGE: usize = 256 << 10;

    fn put(&mut self, stored: Stored) {
        let n = stored.message.data.len();
        if n > Self::MAX_MESSAGE || self.bytes + n > Self::MAX_BYTES {
            return;
        }
        self.bytes += n;
        if let Some(old) = self.by_id.insert(stored.id.clone(), Arc::new(stored)) {
            self.bytes -= old.message.data.len();
        }
    }

    fn remove(&mut self, id: &QueueId) -> Option<Arc<Stored>> {
        let s = self.by_id.remove(id)?;
        self.bytes -= s.message.data.len();
        Some(s)
    }

    /// The copy of `job`'s message when the job has every recipient still open.
    fn take(&mut self, job: &Job) -> Option<Arc<Stored>> {
        let s = self.remove(&job.id)?;
        let open = s.states.iter().enumerate().filter(|(_, st)| !st.is_final()).map(|(i, _)| i);
        let mut open: Vec<usize> = open.collect();
        let mut rcpts = job.rcpts.clone();
        open.sort_unstable();
        rcpts.sort_unstable();
        (open == rcpts).then_some(s)
    }
}

/// Blocking spool I/O (reads, renames, fsyncs) on the blocking pool, so that the queue
/// manager never stalls a runtime worker that sessions need.
async fn spool_io<T: Send + 'static>(
    spool: &Spool,
    f: impl FnOnce(&Spool) -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let s = spool.clone();
    tokio::task::spawn_blocking(move || f(&s)).await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

/// The message a queue manager is working on, shared with its supervisor: when the queue
/// manager dies, that message is the one that killed it.
type Current = Arc<std::sync::Mutex<Option<QueueId>>>;

/// Start the queue manager under a supervisor. The supervisor is the last line of
/// defence: a failure in one message's processing is caught inside the queue manager (a
/// panic included: [`Qmgr::guarded`]) and moves that message to `corrupt/`; if the queue
/// manager itself stops, the supervisor marks it down (sessions then answer new mail
/// `451 4.3.0`, [`Shared::qmgr_up`]), moves the message it was working on to `corrupt/`
/// so a restart never re-runs the message that killed it, and starts a new queue
/// manager on what is in the spool, after a pause that grows with repeated failures.
pub fn spawn(
    shared: Arc<Shared>,
    spool: Spool,
    policy_dir: PathBuf,
    recovered: Vec<String>,
    incoming: mpsc::UnboundedReceiver<String>,
) -> QmgrHandle {
    let (ctl, ctl_rx) = mpsc::unbounded_channel();
    let incoming = Arc::new(tokio::sync::Mutex::new(incoming));
    let ctl_rx = Arc::new(tokio::sync::Mutex::new(ctl_rx));
    tokio::spawn(async move {
        let mut ids = Some(recovered);
        let mut deaths: u32 = 0;
        loop {
            let current: Current = Arc::default();
            let start_ids = match ids.take() {
                Some(v) => v,
                // What the spool holds (never corrupt/): the dead manager's scheduler is gone.
                None => spool_io(&spool, |s| s.list())
                    .await
                    .map(|l| l.into_iter().map(|m| m.id.as_str().to_string()).collect())
                    .unwrap_or_default(),
            };
            let task = tokio::spawn(run(
                shared.clone(),
                spool.clone(),
                policy_dir.clone(),
                start_ids,
                incoming.clone(),
                ctl_rx.clone(),
                current.clone(),
            ));
            shared.set_qmgr_up(true);
            if deaths > 0 {
                shared.log.event("qmgr-restarted", &[("restarts", &deaths.to_string())]);
            }
            let ended = task.await;
            let Err(e) = ended else { break };
            shared.set_qmgr_up(false);
            deaths += 1;
            let culprit = current.lock().map(|mut c| c.take()).unwrap_or_else(|p| p.into_inner().take());
            let why = panic_text(e);
            shared
                .log
                .event("qmgr-died", &[("error", &why), ("id", culprit.as_ref().map(QueueId::as_str).unwrap_or(""))]);
            if let Some(id) = culprit {
                let q = id.clone();
                match spool_io(&spool, move |s| s.move_to(&q, QueueName::Corrupt)).await {
                    Ok(()) => {
                        shared.log.event("corrupt", &[("id", id.as_str()), ("reason", "the queue manager died on it")]);
                        if let Some(b) = shared.backup.get() {
                            b.removed(id.as_str());
                        }
                    }
                    Err(e) => shared.log.event("corrupt-failed", &[("id", id.as_str()), ("error", &e.to_string())]),
                }
            }
            // 1 s, 2 s, 4 s ... at most a minute between restarts.
            let pause = Duration::from_secs(1u64 << deaths.saturating_sub(1).min(6)).min(Duration::from_secs(60));
            tokio::time::sleep(pause).await;
        }
        shared.set_qmgr_up(false);
    });
    QmgrHandle { ctl }
}

/// The text of a task's failure (a panic's message when it has one).
fn panic_text(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let p = e.into_panic();
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

fn panic_payload_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// One queue manager: the loop that owns the scheduler.
async fn run(
    shared: Arc<Shared>,
    spool: Spool,
    policy_dir: PathBuf,
    recovered: Vec<String>,
    incoming: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>>,
    ctl_rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Ctl>>>,
    current: Current,
) {
    let mut incoming = incoming.lock().await;
    let mut ctl_rx = ctl_rx.lock().await;
    let prog = shared.program();
    // The daemon's one resolver (and cache), shared with policy lookups and mail-auth.
    let resolver: Arc<dyn Resolver> = shared.lookups().mx_resolver();
    let cache = Arc::new(session_cache(&prog));
    let security = security_for(&prog, &policy_dir, spool.dir());
    if let Err(e) = &security {
        shared.log.event("mta-sts-ca-failed", &[("error", e)]);
    }
    let next_report = report_due(&prog, spool.dir());
    let mut q = Qmgr {
        security,
        next_report,
        sched: Scheduler::new(queue_config(&prog)),
        shared,
        spool,
        policy_dir,
        prog,
        routes: HashMap::new(),
        resolver,
        cache,
        removals: JoinSet::new(),
        current,
        handoff: Handoff::default(),
    };
    for id in recovered {
        q.guarded_admit(&id).await;
    }
    let mut inflight: JoinSet<JobDone> = JoinSet::new();
    let mut reports: JoinSet<crate::transport::tlsrpt::ReportRun> = JoinSet::new();
    let mut stopping: Option<oneshot::Sender<()>> = None;
    loop {
        let now = now_ms();
        if stopping.is_none() && reports.is_empty() && q.next_report.is_some_and(|t| now >= t) {
            q.next_report = q.start_reports(&mut reports);
        }
        if stopping.is_none() {
            while let Some(job) = q.sched.poll_job(now) {
                let again = job.clone();
                let work = std::panic::AssertUnwindSafe(q.delivery(job));
                // A panic in one delivery is that message's: caught here, handled in finish.
                inflight.spawn(async move {
                    use futures_util::FutureExt;
                    match work.catch_unwind().await {
                        Ok(d) => d,
                        Err(p) => JobDone {
                            job: again,
                            results: Vec::new(),
                            relayed: Vec::new(),
                            panic: Some(panic_payload_text(&*p)),
                            removed: false,
                        },
                    }
                });
            }
            // Delay warnings fall due by the clock, not only after an attempt (R31).
            let warnings = q.sched.poll_warnings(now);
            q.guarded_commands(warnings).await;
        }
        if stopping.is_some() && inflight.is_empty() {
            while q.removals.join_next().await.is_some() {}
            break;
        }
        let wake = q
            .sched
            .poll_timeout()
            .map(|t| Duration::from_millis(t.saturating_sub(now_ms()).max(10)))
            .unwrap_or(Duration::from_secs(60));
        let wake = match q.next_report {
            Some(t) => wake.min(Duration::from_millis(t.saturating_sub(now_ms()).max(10))),
            None => wake,
        };
        tokio::select! {
            Some(id) = incoming.recv(), if stopping.is_none() => q.guarded_admit(&id).await,
            Some(_) = q.removals.join_next(), if !q.removals.is_empty() => {}
            Some(done) = reports.join_next(), if !reports.is_empty() => {
                if let Ok(run) = done {
                    q.queue_reports(run).await;
                }
            }
            Some(done) = inflight.join_next(), if !inflight.is_empty() => match done {
                Ok(d) => q.guarded_finish(d).await,
                Err(e) => q.shared.log.event("delivery-task-failed", &[("error", &e.to_string())]),
            },
            ctl = ctl_rx.recv() => match ctl {
                Some(Ctl::Reload(p)) => {
                    // The scheduler holds the queue (entries, backoff, jobs in flight):
                    // it is kept, so its settings stay those it was started with.
                    if queue_config(&p) != *q.sched.config() {
                        q.shared.log.event("reload-partial", &[("kept", "queue settings (queue_run, retry_min, retry_max, lifetimes, concurrency) until restart")]);
                    }
                    q.security = security_for(&p, &q.policy_dir, q.spool.dir());
                    if let Err(e) = &q.security {
                        q.shared.log.event("mta-sts-ca-failed", &[("error", e)]);
                    }
                    if p.server.tls_report_interval != q.prog.server.tls_report_interval {
                        q.next_report = report_due(&p, q.spool.dir());
                    }
                    q.prog = p;
                }
                Some(Ctl::Stop(tx)) => stopping = Some(tx),
                Some(Ctl::Admin(op, tx)) => {
                    let a = q.admin(op).await;
                    let _ = tx.send(a);
                }
                None => break,
            },
            _ = tokio::time::sleep(wake) => {
                if q.sched.poll_scan(now_ms()) {
                    q.rescan().await;
                }
            }
        }
    }
    if let Some(tx) = stopping {
        let _ = tx.send(());
    }
}

impl Qmgr {
    /// Starts the TLS-RPT report run (RFC 8460) on its own task (DNS and HTTPS must not hold
    /// the scheduler); returns when the next one is due.
    fn start_reports(&mut self, reports: &mut JoinSet<crate::transport::tlsrpt::ReportRun>) -> Option<u64> {
        let every = self.prog.server.tls_report_interval.as_millis() as u64;
        let dir = self.spool.dir().join("tlsrpt");
        let now = now_ms();
        if dir.is_dir() {
            let _ = std::fs::write(dir.join("period"), now.to_string());
        }
        let Ok(sec) = self.security.clone() else { return (every > 0).then(|| now + every) };
        if let Some(rec) = sec.report.clone() {
            let resolver = self.resolver.clone();
            let org = self.prog.server.tls_report_org.clone().unwrap_or_else(|| self.shared.hostname.clone());
            let contact =
                self.prog.server.postmaster.clone().unwrap_or_else(|| format!("postmaster@{}", self.shared.hostname));
            // an https rua is verified as policy hosts are (mta_sts_ca, else the system's store)
            let roots = sec.sts.roots.clone();
            reports.spawn(async move { rec.take_reports(resolver.as_ref(), &org, &contact, roots, 443).await });
        }
        (every > 0).then(|| now + every)
    }

    /// Logs the POSTs of a TLS-RPT run and queues its mails.
    async fn queue_reports(&mut self, run: crate::transport::tlsrpt::ReportRun) {
        for (domain, uri, r) in &run.posts {
            match r {
                Ok(()) => self.shared.log.event("tls-report", &[("domain", domain), ("to", uri)]),
                Err(e) => self.shared.log.event("tls-report-failed", &[("domain", domain), ("to", uri), ("error", e)]),
            }
        }
        let mails = run.mails;
        let from =
            self.prog.server.postmaster.clone().unwrap_or_else(|| format!("postmaster@{}", self.shared.hostname));
        for m in mails {
            let msg = QueuedMessage {
                sender: from.clone(),
                recipients: vec![QueuedRcpt {
                    address: m.to.clone(),
                    notify: vec!["NEVER".into()],
                    ..Default::default()
                }],
                data: m.data,
                client_ip: "127.0.0.1".into(),
                helo: self.shared.hostname.clone(),
                session: crate::conn::SessionRecord::internal(&self.prog, &self.shared.hostname),
                ..Default::default()
            };
            let now = now_ms();
            match spool_io(&self.spool, move |s| s.store(&msg, Class::Normal, now).map_err(std::io::Error::other)).await
            {
                Ok(id) => {
                    self.shared.log.event("tls-report", &[("domain", &m.domain), ("to", &m.to), ("id", id.as_str())]);
                    Box::pin(self.admit(id.as_str())).await;
                }
                Err(e) => {
                    self.shared.log.event("tls-report-failed", &[("domain", &m.domain), ("error", &e.to_string())])
                }
            }
        }
    }

    /// Work on message `id`: the supervisor blames it if the queue manager dies meanwhile.
    fn working_on(&self, id: Option<&QueueId>) {
        let mut c = self.current.lock().unwrap_or_else(|p| p.into_inner());
        *c = id.cloned();
    }

    /// A message's processing failed for good (a panic caught at this boundary): it leaves
    /// the queue for `corrupt/`, with a log line, and the queue goes on.
    async fn quarantine(&mut self, id: &QueueId, why: &str) {
        self.sched.remove(id);
        self.handoff.remove(id);
        for k in self.routes.keys().filter(|(m, _)| m == id.as_str()).cloned().collect::<Vec<_>>() {
            self.routes.remove(&k);
        }
        let q = id.clone();
        match spool_io(&self.spool, move |s| s.move_to(&q, QueueName::Corrupt)).await {
            Ok(()) => {
                self.shared.log.event("corrupt", &[("id", id.as_str()), ("reason", why)]);
                // Its shadow copy, if a peer holds one, is delivered there now.
                if let Some(b) = self.shared.backup.get() {
                    b.removed(id.as_str());
                }
            }
            Err(e) => self.shared.log.event("corrupt-failed", &[("id", id.as_str()), ("error", &e.to_string())]),
        }
    }

    /// [`Qmgr::admit`] with a panic contained to the message.
    async fn guarded_admit(&mut self, id: &str) {
        use futures_util::FutureExt;
        let Some(qid) = QueueId::parse(id) else { return };
        self.working_on(Some(&qid));
        if super::fault::armed("qmgr-task").is_some() {
            // Outside the per-message boundary: this kills the queue manager itself.
            if let Some(stored) = self.load(&qid).await {
                super::fault::check("qmgr-task", &stored.message.data);
            }
        }
        let r = std::panic::AssertUnwindSafe(self.admit(id)).catch_unwind().await;
        if let Err(p) = r {
            let why = format!("processing failed: {}", panic_payload_text(&*p));
            self.quarantine(&qid, &why).await;
        }
        self.working_on(None);
    }

    /// [`Qmgr::finish`] with a panic contained to the message; a delivery that panicked is
    /// finished as a temporary failure (so the scheduler's counts stay right), then the
    /// message is quarantined.
    async fn guarded_finish(&mut self, mut d: JobDone) {
        use futures_util::FutureExt;
        let id = d.job.id.clone();
        self.working_on(Some(&id));
        if let Some(p) = d.panic.take() {
            let r = "451 4.3.0 internal error during delivery".to_string();
            d.results = d.job.rcpts.iter().map(|i| (*i, Delivery::TempFail(r.clone()))).collect();
            let _ = self.sched.done(d.job, d.results, now_ms());
            self.quarantine(&id, &format!("delivery failed: {p}")).await;
        } else if let Err(p) = std::panic::AssertUnwindSafe(self.finish(d)).catch_unwind().await {
            let why = format!("processing failed: {}", panic_payload_text(&*p));
            self.quarantine(&id, &why).await;
        }
        self.working_on(None);
    }

    /// [`Qmgr::commands`] one at a time, a panic contained to the message it is about.
    async fn guarded_commands(&mut self, cmds: Vec<Command>) {
        use futures_util::FutureExt;
        for c in cmds {
            let id = match &c {
                Command::Dsn { id, .. }
                | Command::Record { id, .. }
                | Command::Defer { id }
                | Command::Remove { id } => id.clone(),
            };
            self.working_on(Some(&id));
            if let Err(p) = std::panic::AssertUnwindSafe(self.commands(vec![c], false)).catch_unwind().await {
                let why = format!("processing failed: {}", panic_payload_text(&*p));
                self.quarantine(&id, &why).await;
            }
            self.working_on(None);
        }
    }

    async fn load(&self, id: &QueueId) -> Option<Stored> {
        let qid = id.clone();
        match spool_io(&self.spool, move |s| s.load(&qid)).await {
            Ok(s) => Some(s),
            Err(e) => {
                self.shared.log.event("load-failed", &[("id", id.as_str()), ("error", &e.to_string())]);
                None
            }
        }
    }

    /// The queue run: pick up what `mailc queue` changed.
    /// A control-socket command: the spool first (`control::apply`, what `mailc queue` does
    /// without a daemon), then the scheduler.
    async fn admin(&mut self, op: crate::control::Op) -> crate::control::Answer {
        use crate::control::{self, Answer, Op};
        while self.removals.join_next().await.is_some() {}
        let now = now_ms();
        let (spool, o) = (self.spool.clone(), op.clone());
        let (answer, ids) = match tokio::task::spawn_blocking(move || control::apply(&spool, &o, now)).await {
            Ok(x) => x,
            Err(e) => return Answer::fail(2, e.to_string()),
        };
        for id in &ids {
            match &op {
                Op::Hold { .. } => {
                    self.sched.hold(id);
                }
                Op::Release { .. } => {
                    if !self.sched.release(id, now) {
                        self.guarded_admit(id.as_str()).await;
                    }
                }
                Op::Delete { .. } => {
                    self.forget(id);
                }
                Op::Requeue { .. } => {
                    self.forget(id);
                    self.guarded_admit(id.as_str()).await;
                }
                Op::Flush { .. } => {
                    if !self.sched.make_due(id, now) && !self.sched.contains(id) {
                        self.guarded_admit(id.as_str()).await;
                    }
                }
                Op::Reload => {}
            }
        }
        // Destinations given up on for now are tried again too (postqueue -f, -s).
        if let Op::Flush { domain } = &op {
            match domain {
                None => self.sched.flush(None, now),
                Some(d) => {
                    let d = d.to_ascii_lowercase();
                    let hit = move |k: &str| k.to_ascii_lowercase().contains(&d);
                    self.sched.flush(Some(&hit), now)
                }
            }
        }
        self.shared.log.event("admin", &[("request", &format!("{op:?}")), ("result", &answer.text)]);
        answer
    }

    /// The scheduler and the routes forget `id`.
    fn forget(&mut self, id: &QueueId) {
        self.sched.remove(id);
        self.handoff.remove(id);
        for k in self.routes.keys().filter(|(m, _)| m == id.as_str()).cloned().collect::<Vec<_>>() {
            self.routes.remove(&k);
        }
    }

    async fn rescan(&mut self) {
        while self.removals.join_next().await.is_some() {}
        let Ok(list) = spool_io(&self.spool, |s| s.list()).await else { return };
        let now = now_ms();
        let known: std::collections::HashSet<String> = self.sched.ids().map(|i| i.as_str().to_string()).collect();
        let mut seen = std::collections::HashSet::new();
        for s in list {
            let id = s.id.as_str().to_string();
            seen.insert(id.clone());
            if s.queue == QueueName::Corrupt {
                continue;
            }
            if !known.contains(&id) {
                self.admit(&id).await;
                continue;
            }
            if s.queue == QueueName::Hold {
                self.sched.hold(&s.id);
            } else if self.sched.is_held(&s.id) {
                self.sched.release(&s.id, now);
            } else if s.queue == QueueName::Incoming && s.attempts > 0 {
                // `mailc queue requeue`: route afresh.
                self.sched.remove(&s.id);
                self.admit(&id).await;
            } else if s.next_attempt_ms <= now {
                self.sched.make_due(&s.id, now);
            }
        }
        for id in known {
            if !seen.contains(&id) {
                if let Some(q) = QueueId::parse(&id) {
                    self.sched.remove(&q);
                }
            }
        }
    }
}

/// The times of one delivery attempt (Unix ms; `setup` a duration), for `delay=` and
/// `delays=a/b/c/d` (spec/language.md, section 5.4).
struct Delays {
    arrived: u64,
    started: u64,
    setup: u64,
    ended: u64,
}

/// Postfix's per-recipient summary text: `to=<RCPT>, relay=R, delay=S, delays=a/b/c/d,
/// dsn=X.Y.Z, status=STATUS (REPLY)`.
fn summary_line(to: &str, relay: &str, t: &Delays, status: &str, reply: &str) -> String {
    // As Postfix prints them: two decimals below 10 s, trailing zeros dropped; whole
    // seconds above.
    let secs = |ms: u64| {
        if ms >= 10_000 {
            return format!("{}", (ms + 500) / 1000);
        }
        let v = format!("{:.2}", ms as f64 / 1000.0);
        v.trim_end_matches('0').trim_end_matches('.').to_string()
    };
    let a = t.started.saturating_sub(t.arrived);
    let total = t.ended.saturating_sub(t.arrived);
    let c = t.setup.min(t.ended.saturating_sub(t.started));
    let d = t.ended.saturating_sub(t.started).saturating_sub(c);
    let dsn = reply_status(reply);
    format!(
        "to=<{to}>, relay={relay}, delay={}, delays={}/0/{}/{}, dsn={dsn}, status={status} ({reply})",
        secs(total),
        secs(a),
        secs(c),
        secs(d)
    )
}

/// The enhanced status code of a reply line (`550 5.1.1 ...`), else one from its class.
fn reply_status(reply: &str) -> String {
    let mut words = reply.split_whitespace();
    let code = words.next().unwrap_or("");
    if let Some(w) = words.next() {
        let parts: Vec<&str> = w.split('.').collect();
        if parts.len() == 3 && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) {
            return w.to_string();
        }
    }
    match code.as_bytes().first() {
        Some(b'2') => "2.0.0".into(),
        Some(b'5') => "5.0.0".into(),
        _ => "4.0.0".into(),
    }
}

fn removed_line(shared: &Shared, id: &str) {
    if let Some(b) = shared.backup.get() {
        b.removed(id);
    }
    shared.log.event("removed", &[("id", id)]);
    shared.log.summary("qmgr", Severity::Info, id, "removed");
}

#[cfg(test)]
mod summary_tests {
    use super::*;

    #[test]
    fn postfix_summary_text() {
        let t = Delays { arrived: 1_000, started: 3_500, setup: 120, ended: 3_800 };
        let l = summary_line("a@example.com", "mx.example.com[192.0.2.1]:25", &t, "sent", "250 2.0.0 Ok: queued as X");
        assert_eq!(
            l,
            "to=<a@example.com>, relay=mx.example.com[192.0.2.1]:25, delay=2.8, delays=2.5/0/0.12/0.18, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as X)"
        );
        assert_eq!(reply_status("451 try later"), "4.0.0");
        assert_eq!(reply_status("550 5.1.1 no such user"), "5.1.1");
        let t = Delays { arrived: 0, started: 0, setup: 0, ended: 45_000 };
        assert!(summary_line("b@x", "none", &t, "bounced", "550 x").contains("delay=45, delays=0/0/0/45,"));
    }
}
