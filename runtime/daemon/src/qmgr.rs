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
use crate::eval::{DeliveryFacts, Outcome as PolicyOutcome, RenderedReply};
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

mod dsns;

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
                        shared.log.event("corrupt", &[("id", id.as_str()), ("reason", "the queue manager died on it")])
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
            Ok(()) => self.shared.log.event("corrupt", &[("id", id.as_str()), ("reason", why)]),
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

    fn lifetime(&self, class: Class) -> u64 {
        let c = self.sched.config();
        match class {
            Class::Normal => c.max_queue_lifetime_ms,
            Class::Bounce => c.bounce_queue_lifetime_ms,
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

    /// A message is in the spool: route its open recipients and schedule them.
    async fn admit(&mut self, id: &str) {
        let Some(qid) = QueueId::parse(id) else { return };
        let Some(stored) = self.load(&qid).await else { return };
        super::fault::check("qmgr-admit", &stored.message.data);
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
                (Some(crate::lists::Handled::Retry(text)), _) => {
                    Routed::Defer(RenderedReply { code: 451, enhanced: (4, 3, 0), text })
                }
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
                        &[("id", id), ("to", &stored.message.recipients[i].address), ("reply", &r.to_string())],
                    );
                    if !self.sched.config().soft_bounce {
                        crate::metrics::get().delivery("bounced");
                        let times = Delays { arrived: stored.arrived_ms, started: now, setup: 0, ended: now };
                        let line = summary_line(
                            &stored.message.recipients[i].address,
                            "none",
                            &times,
                            "bounced",
                            &r.to_string(),
                        );
                        self.shared.log.summary("qmgr", Severity::Warning, id, &line);
                    }
                    failures.push((i, r.to_string()))
                }
                Routed::Defer(r) if now.saturating_sub(stored.arrived_ms) >= self.lifetime(stored.class) => {
                    // Deferred at route past the queue lifetime: it expires like any deferral.
                    expired.push((i, format!("{r} (queue lifetime expired)")));
                }
                Routed::Defer(r) => {
                    // Route again at the next queue run.
                    updates.push((
                        i,
                        RcptState::Deferred {
                            attempts: attempts + 1,
                            next_at: now + 300_000,
                            last_reply: r.to_string(),
                        },
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
            let q = qid.clone();
            let _ = spool_io(&self.spool, move |s| s.activate(&q)).await;
        }
        // Only what is due now: a copy waits for its first job, not for a retry minutes away.
        let soon = !entry.held && entry.due_ms <= now;
        self.sched.add(entry, now);
        if unchanged && soon {
            self.handoff.put(stored);
        }
    }

    /// `archive FOLDER` (R12): a copy in the Maildir folder under the server's maildir.
    async fn archive(&self, stored: &Stored, folders: &[String]) {
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

    /// A delivery task for one job.
    fn delivery(&mut self, job: Job) -> impl std::future::Future<Output = JobDone> + Send + 'static {
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
            super::fault::check("delivery", &stored.message.data);
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
                        super::lookup::batv_lifetime_days(&prog),
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
                let text = reply_line(&reply);
                let d = match (policy, &outcome) {
                    (Some(PolicyOutcome::Tempfail(r)), _) => Delivery::TempFail(r.to_string()),
                    (Some(PolicyOutcome::Reject(r)), _) => Delivery::PermFail(r.to_string()),
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

    async fn finish(&mut self, d: JobDone) {
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
    async fn commands(&mut self, cmds: Vec<Command>, removed: bool) {
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

fn local_addrs(_shared: &Shared) -> Vec<std::net::IpAddr> {
    vec![std::net::IpAddr::from([127, 0, 0, 1]), std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST)]
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

fn reply_line(r: &Reply) -> String {
    match r.enhanced {
        Some((a, b, c)) => format!("{} {a}.{b}.{c} {}", r.code, r.text.replace(['\r', '\n'], " ")),
        None => format!("{} {}", r.code, r.text.replace(['\r', '\n'], " ")),
    }
}

#[allow(dead_code)]
fn _reply(r: &RenderedReply) -> String {
    r.to_string()
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
