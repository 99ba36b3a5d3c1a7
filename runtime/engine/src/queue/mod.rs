//! The queue scheduler: Postfix qmgr semantics, sans-IO.
//!
//! No clock, no tokio, no files: every call takes `now` (ms since the epoch), and what the
//! host must do comes back as data ([`Job`]s to run, [`Command`]s to execute against the
//! spool and the bounce generator). The daemon drives it; tests drive it with fake time.
//!
//! ```text
//! start:      for m in spool recovered messages { sched.add(Entry::from_summary(&m, route), now) }
//! accepted:   sched.add(Entry::new(id, class, now).rcpt(i, dest)..., now)
//! worker:     while let Some(job) = sched.poll_job(now) { deliver job.rcpts of job.id to job.destination;
//!                 cmds = sched.done(job, results, now); execute cmds in order;
//!                 reuse the connection: sched.poll_job_for(&dest, now) }
//! timer:      sleep until sched.poll_timeout(); if sched.poll_scan(now) { rescan the spool }
//! ```
//!
//! **Semantics** (defaults as Postfix, see [`QueueConfig`]):
//! - A recipient is scheduled per *destination*, an opaque key the host chooses ("mx:example.com",
//!   "smtp:[10.0.0.5]:25", "lmtp:unix:/run/lmtp", "maildir:/var/mail/x"). A [`Job`] is one message's
//!   recipients for one destination, at most `destination_recipient_limit` of them.
//! - Destinations are served round-robin. Each has a concurrency *window* that starts at
//!   `initial_destination_concurrency` (slow start), grows by one per job that reached the
//!   destination (any recipient delivered or permanently refused) up to
//!   `destination_concurrency_limit`, and halves (at least 1) per job where every recipient
//!   failed temporarily. A failure at window 1 marks the destination dead for
//!   `minimal_backoff_ms`: its ready jobs wait (without using up attempts) until then or a flush.
//! - A temporary failure defers the recipient: the `n`th attempt failing waits
//!   `minimal_backoff_ms * 2^(n-1)`, at most `maximal_backoff_ms` (5, 10, 20, 40, 66.7 min).
//!   A temporary failure after the queue lifetime (`max_queue_lifetime_ms`, or
//!   `bounce_queue_lifetime_ms` for the bounce class) fails the recipient instead ("expired").
//! - A normal-class message that still has recipients to deliver when it reaches
//!   `delay_warning_ms` of age gets one delay DSN for them ([`Scheduler::poll_warnings`] at
//!   that time, or [`Scheduler::done`] when an attempt defers them later), once per message;
//!   a message on hold gets it when it is released, never while an administrator holds it.
//! - With `soft_bounce`, a permanent failure defers the recipient with the reply's 5xy made
//!   4xy, until the queue lifetime ends.
//! - Bounces (R30) run in their own lane: at most `bounce_max_jobs` at once, at most
//!   `bounce_rate_per_minute` jobs started per minute if set, and when both lanes have work
//!   only one pick in `bounce_share` goes to bounces, so a bounce flood cannot starve normal mail.
//! - `poll_scan` says when the queue run is due (every `queue_run_delay_ms`). The host then
//!   rereads the spool ([`crate::spool::Spool::list`]) to pick up what `mailc queue` changed:
//!   for a summary in `hold/`, [`Scheduler::hold`]; for one elsewhere that
//!   [`Scheduler::is_held`], [`Scheduler::release`]; unknown ids, [`Scheduler::add`]
//!   (routed afresh: this is how `requeue` takes effect, the CLI having moved the message to
//!   `incoming/` and reset its deferred recipients, so the host removes and re-adds a known
//!   id found in `incoming/` with attempts made); `next_attempt_ms <= now`,
//!   [`Scheduler::make_due`] (`mailc queue flush` rewrote it); ids in [`Scheduler::ids`] no
//!   longer in the spool, [`Scheduler::remove`]. Between runs, CLI changes wait at most
//!   `queue_run_delay_ms` (5 minutes) to take effect.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::record::{Class, QueueId, QueueName, RcptState, Summary};

/// A destination key chosen by the host.
pub type Destination = String;

/// Scheduler settings; `Default` gives Postfix's defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// `queue_run_delay`: how often the host rescans the spool (0 = never).
    pub queue_run_delay_ms: u64,
    /// `minimal_backoff_time`.
    pub minimal_backoff_ms: u64,
    /// `maximal_backoff_time`.
    pub maximal_backoff_ms: u64,
    /// `maximal_queue_lifetime`.
    pub max_queue_lifetime_ms: u64,
    /// `bounce_queue_lifetime`.
    pub bounce_queue_lifetime_ms: u64,
    /// `delay_warning_time`; `None` disables delay warnings.
    pub delay_warning_ms: Option<u64>,
    /// `default_destination_concurrency_limit`.
    pub destination_concurrency_limit: u32,
    /// `initial_destination_concurrency` (slow start).
    pub initial_destination_concurrency: u32,
    /// `default_destination_recipient_limit`: recipients per job.
    pub destination_recipient_limit: usize,
    /// Jobs in flight in all (the host's delivery worker count).
    pub max_jobs: usize,
    /// Jobs of the bounce class in flight at most.
    pub bounce_max_jobs: usize,
    /// Bounce jobs started per minute at most; `None` = no limit.
    pub bounce_rate_per_minute: Option<u32>,
    /// When both lanes have work, one pick in this many goes to bounces (at least 1).
    pub bounce_share: u32,
    /// Postfix `soft_bounce` (R40): a permanent failure is a deferral, 5xy turned into 4xy.
    pub soft_bounce: bool,
}

const MINUTE: u64 = 60_000;

impl Default for QueueConfig {
    /// The scheduler under a policy that sets nothing.
    fn default() -> Self {
        QueueConfig::from_settings(&mailpolicy_lang::settings::Server::default())
    }
}

impl QueueConfig {
    /// The scheduler under the policy's `server { }` (its defaults are Postfix's); what no
    /// setting names is the scheduler's own.
    pub fn from_settings(s: &mailpolicy_lang::settings::Server) -> QueueConfig {
        let ms = |d: std::time::Duration| d.as_millis().min(u64::MAX as u128) as u64;
        QueueConfig {
            queue_run_delay_ms: ms(s.queue_run),
            minimal_backoff_ms: ms(s.retry_min),
            maximal_backoff_ms: ms(s.retry_max),
            max_queue_lifetime_ms: ms(s.queue_lifetime),
            bounce_queue_lifetime_ms: ms(s.bounce_lifetime),
            delay_warning_ms: Some(ms(s.delay_warning)).filter(|&v| v != 0),
            destination_concurrency_limit: (s.destination_concurrency.min(u32::MAX as u64) as u32).max(1),
            initial_destination_concurrency: 2,
            destination_recipient_limit: 50,
            max_jobs: 100,
            bounce_max_jobs: 20,
            bounce_rate_per_minute: s.bounce_rate.map(|v| v.min(u32::MAX as u64) as u32),
            bounce_share: 4,
            soft_bounce: s.soft_bounce,
        }
    }

    /// The wait after the `attempts`th failed attempt (1-based).
    pub fn backoff(&self, attempts: u32) -> u64 {
        let shift = attempts.saturating_sub(1).min(40);
        self.minimal_backoff_ms
            .saturating_mul(1u64 << shift)
            .min(self.maximal_backoff_ms)
            .max(self.minimal_backoff_ms.min(self.maximal_backoff_ms))
    }

    fn lifetime(&self, class: Class) -> u64 {
        match class {
            Class::Normal => self.max_queue_lifetime_ms,
            Class::Bounce => self.bounce_queue_lifetime_ms,
        }
    }
}

/// One recipient of an [`Entry`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryRcpt {
    /// Index into the message's envelope recipients.
    pub index: usize,
    pub destination: Destination,
    /// Attempts already made (from the spool state after a restart).
    pub attempts: u32,
}

/// A message given to the scheduler: its recipients still to deliver, each routed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub id: QueueId,
    pub class: Class,
    pub arrived_ms: u64,
    pub rcpts: Vec<EntryRcpt>,
    /// Not before this time (0 = now).
    pub due_ms: u64,
    pub delay_warned: bool,
    /// The message file is already in `deferred/` (no move command needed).
    pub in_deferred: bool,
    /// On hold: known but not scheduled until [`Scheduler::release`].
    pub held: bool,
}

impl Entry {
    pub fn new(id: QueueId, class: Class, arrived_ms: u64) -> Entry {
        Entry {
            id,
            class,
            arrived_ms,
            rcpts: Vec::new(),
            due_ms: 0,
            delay_warned: false,
            in_deferred: false,
            held: false,
        }
    }

    pub fn rcpt(mut self, index: usize, destination: impl Into<Destination>) -> Entry {
        self.rcpts.push(EntryRcpt { index, destination: destination.into(), attempts: 0 });
        self
    }

    /// An entry for a message found in the spool: every recipient not final, routed by
    /// `route(index, address)` (`None` leaves the recipient out, e.g. when the host fails it
    /// itself), with its attempts and due time as recorded.
    pub fn from_summary(s: &Summary, mut route: impl FnMut(usize, &str) -> Option<Destination>) -> Entry {
        let rcpts = s
            .rcpts
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.state.is_final())
            .filter_map(|(index, r)| {
                let attempts = match &r.state {
                    RcptState::Deferred { attempts, .. } => *attempts,
                    _ => 0,
                };
                route(index, &r.address).map(|destination| EntryRcpt { index, destination, attempts })
            })
            .collect();
        Entry {
            id: s.id.clone(),
            class: s.class,
            arrived_ms: s.arrived_ms,
            rcpts,
            due_ms: s.next_attempt_ms,
            delay_warned: s.delay_warned,
            in_deferred: s.queue == QueueName::Deferred,
            held: s.queue == QueueName::Hold,
        }
    }
}

/// Some recipients of one message for one destination: deliver them, then [`Scheduler::done`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub id: QueueId,
    pub destination: Destination,
    pub class: Class,
    /// Envelope recipient indices.
    pub rcpts: Vec<usize>,
    /// 1 for a first attempt (the highest among the recipients).
    pub attempt: u32,
}

/// What became of one recipient of a job; the string is the reply to record and report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    Delivered(String),
    TempFail(String),
    PermFail(String),
}

/// Which DSN to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DsnKind {
    /// The recipients failed (permanently, or expired).
    Failure,
    /// The recipients are delayed (sent once per message).
    Delay,
    /// The recipients were delivered (send only to those with NOTIFY=SUCCESS).
    Success,
}

/// What the host must do after [`Scheduler::done`], in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Generate a DSN (honouring each recipient's NOTIFY and the message's RET) and store
    /// it with [`crate::spool::Spool::store`] as class `Bounce`. For a message of class
    /// `Bounce` a failure goes to the postmaster or is dropped, never to the null sender.
    /// After a `Delay` DSN, call `set_delay_warned`. Comes before `Record` so that a crash
    /// in between repeats a DSN rather than loses it.
    Dsn {
        id: QueueId,
        class: Class,
        kind: DsnKind,
        /// Recipient index and its reply (for `Failure` with `expired`, the last reply).
        rcpts: Vec<(usize, String)>,
        /// Failure because the queue lifetime ran out.
        expired: bool,
    },
    /// [`crate::spool::Spool::record`]`(id, updates, next_attempt_ms)`.
    Record { id: QueueId, updates: Vec<(usize, RcptState)>, next_attempt_ms: Option<u64> },
    /// [`crate::spool::Spool::defer`]: the message now waits in `deferred/` (unless the
    /// administrator put it on hold meanwhile; `defer` leaves held messages alone).
    Defer { id: QueueId },
    /// Every recipient is final: [`crate::spool::Spool::remove`].
    Remove { id: QueueId },
}

/// Counts, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub messages: usize,
    /// Recipients waiting for their time.
    pub waiting: usize,
    /// Recipients due, waiting for a delivery slot.
    pub ready: usize,
    pub in_flight_jobs: usize,
    pub in_flight_bounce_jobs: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Waiting(u64),
    Ready,
    InFlight,
    Held,
    Done,
}

#[derive(Debug)]
struct Rcpt {
    dest: Destination,
    attempts: u32,
    status: Status,
    /// The last temporary failure, for a delay warning.
    last_reply: Option<String>,
}

#[derive(Debug)]
struct Msg {
    class: Class,
    arrived_ms: u64,
    delay_warned: bool,
    in_deferred: bool,
    held: bool,
    rcpts: BTreeMap<usize, Rcpt>,
}

/// A batch of ready recipients of one message at one destination.
#[derive(Debug)]
struct Unit {
    id: QueueId,
    rcpts: Vec<usize>,
}

#[derive(Debug)]
struct Dest {
    window: u32,
    in_flight: u32,
    ready: [VecDeque<Unit>; 2],
    in_ring: [bool; 2],
    dead_until: u64,
}

fn lane(c: Class) -> usize {
    match c {
        Class::Normal => 0,
        Class::Bounce => 1,
    }
}

/// The scheduler. See the module docs.
#[derive(Debug)]
pub struct Scheduler {
    cfg: QueueConfig,
    msgs: HashMap<QueueId, Msg>,
    /// (due, seq) -> message and destination to look at then.
    waiting: BTreeMap<(u64, u64), (QueueId, Destination)>,
    seq: u64,
    dests: HashMap<Destination, Dest>,
    /// Round-robin ring of destinations with ready work, per lane.
    rings: [VecDeque<Destination>; 2],
    in_flight: [usize; 2],
    picks_since_bounce: u32,
    bounce_starts: VecDeque<u64>,
    next_scan: Option<u64>,
    /// (when, seq) -> message whose delay warning is due then, if still unwarned.
    warnings: BTreeMap<(u64, u64), QueueId>,
}

impl Scheduler {
    pub fn new(cfg: QueueConfig) -> Scheduler {
        Scheduler {
            cfg,
            msgs: HashMap::new(),
            waiting: BTreeMap::new(),
            seq: 0,
            dests: HashMap::new(),
            rings: [VecDeque::new(), VecDeque::new()],
            in_flight: [0, 0],
            picks_since_bounce: 0,
            bounce_starts: VecDeque::new(),
            next_scan: None,
            warnings: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &QueueConfig {
        &self.cfg
    }

    /// Whether `id` is known (scheduled, held or in flight).
    pub fn contains(&self, id: &QueueId) -> bool {
        self.msgs.contains_key(id)
    }

    /// The current concurrency window of a destination, if it has been seen.
    pub fn window(&self, dest: &str) -> Option<u32> {
        self.dests.get(dest).map(|d| d.window)
    }

    pub fn stats(&self) -> Stats {
        let mut s = Stats {
            messages: self.msgs.len(),
            in_flight_jobs: self.in_flight[0] + self.in_flight[1],
            in_flight_bounce_jobs: self.in_flight[1],
            ..Stats::default()
        };
        for r in self.msgs.values().flat_map(|m| m.rcpts.values()) {
            match r.status {
                Status::Waiting(_) => s.waiting += 1,
                Status::Ready => s.ready += 1,
                _ => {}
            }
        }
        s
    }

    /// Schedule a message. Returns false (and changes nothing) if `id` is already known, or
    /// if it has no recipients (the host removes such a message itself).
    pub fn add(&mut self, e: Entry, now: u64) -> bool {
        if self.msgs.contains_key(&e.id) || e.rcpts.is_empty() {
            return false;
        }
        let due = e.due_ms;
        let mut rcpts = BTreeMap::new();
        for r in &e.rcpts {
            let status = if e.held { Status::Held } else { Status::Waiting(due) };
            rcpts.insert(r.index, Rcpt { dest: r.destination.clone(), attempts: r.attempts, status, last_reply: None });
        }
        let held = e.held;
        let id = e.id.clone();
        self.msgs.insert(
            e.id,
            Msg {
                class: e.class,
                arrived_ms: e.arrived_ms,
                delay_warned: e.delay_warned,
                in_deferred: e.in_deferred,
                held,
                rcpts,
            },
        );
        if e.class == Class::Normal && !e.delay_warned {
            if let Some(w) = self.cfg.delay_warning_ms {
                self.seq += 1;
                self.warnings.insert((e.arrived_ms.saturating_add(w), self.seq), id.clone());
            }
        }
        if !held {
            self.wake_all(&id, due, now);
        }
        true
    }

    /// Delay warnings due by `now` (R31): a [`Command::Dsn`] of kind `Delay` for each message
    /// of the normal class that reached `delay_warning_ms` of age with recipients still to
    /// deliver and was not warned yet; a message on hold waits for its release. Call when
    /// [`Scheduler::poll_timeout`] says, and execute the commands as those of `done`.
    pub fn poll_warnings(&mut self, now: u64) -> Vec<Command> {
        let mut cmds = Vec::new();
        while let Some(entry) = self.warnings.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let id = entry.remove();
            let Some(m) = self.msgs.get_mut(&id) else { continue };
            if m.delay_warned || m.held || m.class != Class::Normal {
                continue;
            }
            let rcpts: Vec<(usize, String)> = m
                .rcpts
                .iter()
                .filter(|(_, r)| r.status != Status::Done)
                .map(|(i, r)| {
                    let reply = r
                        .last_reply
                        .clone()
                        .unwrap_or_else(|| "451 4.4.7 the message is still waiting for delivery".into());
                    (*i, reply)
                })
                .collect();
            if rcpts.is_empty() {
                continue;
            }
            m.delay_warned = true;
            cmds.push(Command::Dsn { id: id.clone(), class: m.class, kind: DsnKind::Delay, rcpts, expired: false });
        }
        cmds
    }

    /// Put a waiting-list entry for each destination of `id` at `due`.
    fn wake_all(&mut self, id: &QueueId, due: u64, now: u64) {
        let Some(m) = self.msgs.get(id) else { return };
        let mut dests: Vec<Destination> = m.rcpts.values().map(|r| r.dest.clone()).collect();
        dests.sort();
        dests.dedup();
        for d in dests {
            self.wake(id.clone(), d, due);
        }
        self.promote(now);
    }

    fn wake(&mut self, id: QueueId, dest: Destination, due: u64) {
        self.seq += 1;
        self.waiting.insert((due, self.seq), (id, dest));
    }

    /// Move every due waiting entry to its destination's ready queue.
    fn promote(&mut self, now: u64) {
        while let Some(entry) = self.waiting.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (id, dest) = entry.remove();
            let Some(m) = self.msgs.get_mut(&id) else {
                continue;
            };
            if m.held {
                continue;
            }
            let mut ready = Vec::new();
            for (i, r) in m.rcpts.iter_mut() {
                if r.dest == dest && matches!(r.status, Status::Waiting(t) if t <= now) {
                    r.status = Status::Ready;
                    ready.push(*i);
                }
            }
            if ready.is_empty() {
                continue;
            }
            let l = lane(m.class);
            let limit = self.cfg.destination_recipient_limit.max(1);
            let initial = self.cfg.initial_destination_concurrency.max(1);
            let d = self.dests.entry(dest.clone()).or_insert_with(|| Dest {
                window: initial,
                in_flight: 0,
                ready: [VecDeque::new(), VecDeque::new()],
                in_ring: [false, false],
                dead_until: 0,
            });
            for chunk in ready.chunks(limit) {
                d.ready[l].push_back(Unit { id: id.clone(), rcpts: chunk.to_vec() });
            }
            if !d.in_ring[l] {
                d.in_ring[l] = true;
                self.rings[l].push_back(dest);
            }
        }
    }

    fn bounce_rate_ok(&mut self, now: u64) -> bool {
        let Some(limit) = self.cfg.bounce_rate_per_minute else {
            return true;
        };
        while self.bounce_starts.front().is_some_and(|t| t + MINUTE <= now) {
            self.bounce_starts.pop_front();
        }
        self.bounce_starts.len() < limit as usize
    }

    fn lane_allowed(&mut self, l: usize, now: u64) -> bool {
        if self.in_flight[0] + self.in_flight[1] >= self.cfg.max_jobs {
            return false;
        }
        l == 0 || (self.in_flight[1] < self.cfg.bounce_max_jobs && self.bounce_rate_ok(now))
    }

    /// The next job to run, if a slot is free and something is due.
    pub fn poll_job(&mut self, now: u64) -> Option<Job> {
        self.promote(now);
        let bounce_first = self.picks_since_bounce + 1 >= self.cfg.bounce_share.max(1);
        let order = if bounce_first { [1, 0] } else { [0, 1] };
        for l in order {
            if !self.lane_allowed(l, now) {
                continue;
            }
            if let Some(job) = self.take_from_ring(l, now) {
                return Some(job);
            }
        }
        None
    }

    /// Another job for `dest`, for a worker that holds a connection to it (connection
    /// reuse). Normal mail first; the same limits as [`Scheduler::poll_job`] apply.
    pub fn poll_job_for(&mut self, dest: &str, now: u64) -> Option<Job> {
        self.promote(now);
        for l in [0, 1] {
            if !self.lane_allowed(l, now) {
                continue;
            }
            if let Some(job) = self.take_from_dest(dest, l, now) {
                return Some(job);
            }
        }
        None
    }

    fn take_from_ring(&mut self, l: usize, now: u64) -> Option<Job> {
        for _ in 0..self.rings[l].len() {
            let dest = self.rings[l].pop_front()?;
            let job = self.take_from_dest(&dest, l, now);
            if let Some(d) = self.dests.get_mut(&dest) {
                if d.ready[l].is_empty() {
                    d.in_ring[l] = false;
                } else {
                    self.rings[l].push_back(dest);
                }
            }
            if job.is_some() {
                return job;
            }
        }
        None
    }

    fn take_from_dest(&mut self, dest: &str, l: usize, now: u64) -> Option<Job> {
        let d = self.dests.get_mut(dest)?;
        if d.in_flight >= d.window || d.dead_until > now {
            return None;
        }
        while let Some(unit) = d.ready[l].pop_front() {
            let Some(m) = self.msgs.get_mut(&unit.id) else {
                continue;
            };
            let mut rcpts = Vec::new();
            let mut attempt = 1;
            for i in unit.rcpts {
                if let Some(r) = m.rcpts.get_mut(&i) {
                    if r.status == Status::Ready {
                        r.status = Status::InFlight;
                        attempt = attempt.max(r.attempts + 1);
                        rcpts.push(i);
                    }
                }
            }
            if rcpts.is_empty() {
                continue;
            }
            d.in_flight += 1;
            self.in_flight[l] += 1;
            if l == 1 {
                self.picks_since_bounce = 0;
                if self.cfg.bounce_rate_per_minute.is_some() {
                    self.bounce_starts.push_back(now);
                }
            } else {
                self.picks_since_bounce += 1;
            }
            return Some(Job { id: unit.id, destination: dest.to_string(), class: m.class, rcpts, attempt });
        }
        None
    }

    /// Report a finished job. `results` should cover every recipient of the job; one left
    /// out counts as a temporary failure. Returns what the host must do, in order.
    pub fn done(&mut self, job: Job, results: Vec<(usize, Delivery)>, now: u64) -> Vec<Command> {
        let l = lane(job.class);
        self.in_flight[l] = self.in_flight[l].saturating_sub(1);
        let reached = results.iter().any(|(_, r)| !matches!(r, Delivery::TempFail(_)));
        if let Some(d) = self.dests.get_mut(&job.destination) {
            d.in_flight = d.in_flight.saturating_sub(1);
            if reached {
                d.window = (d.window + 1).min(self.cfg.destination_concurrency_limit.max(1));
                d.dead_until = 0;
            } else if d.window <= 1 {
                d.dead_until = now + self.cfg.minimal_backoff_ms;
            } else {
                d.window = (d.window / 2).max(1);
            }
        }
        let mut results: HashMap<usize, Delivery> = results.into_iter().collect();
        let Some(m) = self.msgs.get_mut(&job.id) else {
            return Vec::new(); // removed while in flight
        };
        let lifetime = self.cfg.lifetime(m.class);
        let expired = now.saturating_sub(m.arrived_ms) >= lifetime;
        let mut updates = Vec::new();
        let (mut failed, mut expired_rcpts, mut delivered) = (Vec::new(), Vec::new(), Vec::new());
        let mut deferred_due = None;
        for i in &job.rcpts {
            let Some(r) = m.rcpts.get_mut(i) else {
                continue;
            };
            if r.status != Status::InFlight {
                continue;
            }
            let res =
                results.remove(i).unwrap_or_else(|| Delivery::TempFail("451 4.4.0 no result for recipient".into()));
            let res = match res {
                Delivery::PermFail(reply) if self.cfg.soft_bounce => {
                    Delivery::TempFail(crate::eval::soft_bounce_line(&reply))
                }
                other => other,
            };
            match res {
                Delivery::Delivered(reply) => {
                    r.status = Status::Done;
                    updates.push((*i, RcptState::Delivered { at: now, reply: reply.clone() }));
                    delivered.push((*i, reply));
                }
                Delivery::PermFail(reply) => {
                    r.status = Status::Done;
                    updates.push((*i, RcptState::Failed { at: now, reply: reply.clone() }));
                    failed.push((*i, reply));
                }
                Delivery::TempFail(reply) => {
                    r.attempts += 1;
                    r.last_reply = Some(reply.clone());
                    if expired {
                        r.status = Status::Done;
                        updates.push((*i, RcptState::Failed { at: now, reply: reply.clone() }));
                        expired_rcpts.push((*i, reply));
                    } else {
                        let next_at = now + self.cfg.backoff(r.attempts);
                        r.status = if m.held { Status::Held } else { Status::Waiting(next_at) };
                        updates.push((*i, RcptState::Deferred { attempts: r.attempts, next_at, last_reply: reply }));
                        deferred_due = Some(deferred_due.map_or(next_at, |t: u64| t.min(next_at)));
                    }
                }
            }
        }
        let mut cmds = Vec::new();
        let class = m.class;
        let id = job.id.clone();
        if !failed.is_empty() {
            cmds.push(Command::Dsn { id: id.clone(), class, kind: DsnKind::Failure, rcpts: failed, expired: false });
        }
        if !expired_rcpts.is_empty() {
            cmds.push(Command::Dsn {
                id: id.clone(),
                class,
                kind: DsnKind::Failure,
                rcpts: expired_rcpts,
                expired: true,
            });
        }
        if deferred_due.is_some()
            && class == Class::Normal
            && !m.delay_warned
            && self.cfg.delay_warning_ms.is_some_and(|w| now.saturating_sub(m.arrived_ms) >= w)
        {
            m.delay_warned = true;
            let delayed: Vec<(usize, String)> = updates
                .iter()
                .filter_map(|(i, s)| match s {
                    RcptState::Deferred { last_reply, .. } => Some((*i, last_reply.clone())),
                    _ => None,
                })
                .collect();
            cmds.push(Command::Dsn { id: id.clone(), class, kind: DsnKind::Delay, rcpts: delayed, expired: false });
        }
        if !delivered.is_empty() {
            cmds.push(Command::Dsn { id: id.clone(), class, kind: DsnKind::Success, rcpts: delivered, expired: false });
        }
        let all_done = m.rcpts.values().all(|r| r.status == Status::Done);
        let next_attempt_ms = m
            .rcpts
            .values()
            .filter_map(|r| match r.status {
                Status::Waiting(t) => Some(t),
                _ => None,
            })
            .min();
        if !updates.is_empty() && !all_done {
            cmds.push(Command::Record { id: id.clone(), updates, next_attempt_ms });
        }
        if all_done {
            self.msgs.remove(&id);
            cmds.push(Command::Remove { id });
            return cmds;
        }
        if deferred_due.is_some() && !m.in_deferred {
            m.in_deferred = true;
            cmds.push(Command::Defer { id: id.clone() });
        }
        if let Some(due) = deferred_due {
            if !m.held {
                self.wake(id, job.destination, due);
            }
        }
        cmds
    }

    /// When the host should call again (absolute ms): the earliest of the next due
    /// recipient, the end of a dead destination's pause with work waiting, the bounce rate
    /// window, and the next queue run. `None` when there is nothing to wait for.
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut t = self.next_scan;
        let mut consider = |x: u64| t = Some(t.map_or(x, |t| t.min(x)));
        if let Some(((due, _), _)) = self.waiting.first_key_value() {
            consider(*due);
        }
        if let Some(((due, _), _)) = self.warnings.first_key_value() {
            consider(*due);
        }
        for d in self.dests.values() {
            if d.dead_until > 0 && (!d.ready[0].is_empty() || !d.ready[1].is_empty()) {
                consider(d.dead_until);
            }
        }
        if let (Some(limit), Some(first)) = (self.cfg.bounce_rate_per_minute, self.bounce_starts.front()) {
            if self.bounce_starts.len() >= limit as usize {
                consider(first + MINUTE);
            }
        }
        t
    }

    /// True when a queue run (spool rescan) is due; then the next one is scheduled
    /// `queue_run_delay_ms` later. The first call only schedules.
    pub fn poll_scan(&mut self, now: u64) -> bool {
        if self.cfg.queue_run_delay_ms == 0 {
            return false;
        }
        match self.next_scan {
            None => {
                self.next_scan = Some(now + self.cfg.queue_run_delay_ms);
                false
            }
            Some(t) if t <= now => {
                self.next_scan = Some(now + self.cfg.queue_run_delay_ms);
                true
            }
            Some(_) => false,
        }
    }

    /// Make every waiting recipient whose destination matches due now, and revive dead
    /// matching destinations. `None` flushes everything (`postqueue -f`); for one site
    /// (`postqueue -s`) pass a predicate on the destination key.
    pub fn flush(&mut self, matches: Option<&dyn Fn(&str) -> bool>, now: u64) {
        let hit = |d: &str| match matches {
            None => true,
            Some(f) => f(d),
        };
        for d in self.dests.iter_mut().filter(|(k, _)| hit(k)).map(|(_, d)| d) {
            d.dead_until = 0;
        }
        let mut wakes = Vec::new();
        for (id, m) in &mut self.msgs {
            for r in m.rcpts.values_mut() {
                if matches!(r.status, Status::Waiting(_)) && hit(&r.dest) {
                    r.status = Status::Waiting(now);
                    wakes.push((id.clone(), r.dest.clone()));
                }
            }
        }
        wakes.sort();
        wakes.dedup();
        for (id, d) in wakes {
            self.wake(id, d, now);
        }
        self.promote(now);
    }

    /// Make one message due now (after `mailc queue flush` changed its next attempt).
    /// False if unknown.
    pub fn make_due(&mut self, id: &QueueId, now: u64) -> bool {
        let Some(m) = self.msgs.get_mut(id) else {
            return false;
        };
        let mut dests = Vec::new();
        for r in m.rcpts.values_mut() {
            if matches!(r.status, Status::Waiting(_)) {
                r.status = Status::Waiting(now);
                dests.push(r.dest.clone());
            }
        }
        dests.sort();
        dests.dedup();
        for d in dests {
            self.wake(id.clone(), d, now);
        }
        self.promote(now);
        true
    }

    /// Stop scheduling `id` (jobs in flight finish; their deferred recipients stay held).
    pub fn hold(&mut self, id: &QueueId) -> bool {
        let Some(m) = self.msgs.get_mut(id) else {
            return false;
        };
        m.held = true;
        for r in m.rcpts.values_mut() {
            if matches!(r.status, Status::Waiting(_) | Status::Ready) {
                r.status = Status::Held;
            }
        }
        true
    }

    /// Schedule a held message again, due now.
    pub fn release(&mut self, id: &QueueId, now: u64) -> bool {
        let Some(m) = self.msgs.get_mut(id) else {
            return false;
        };
        m.held = false;
        for r in m.rcpts.values_mut() {
            if r.status == Status::Held {
                r.status = Status::Waiting(now);
            }
        }
        // A delay warning that fell due while the message was held goes out now.
        if m.class == Class::Normal && !m.delay_warned {
            if let Some(w) = self.cfg.delay_warning_ms {
                self.seq += 1;
                self.warnings.insert((m.arrived_ms.saturating_add(w).max(now), self.seq), id.clone());
            }
        }
        self.wake_all(id, now, now);
        true
    }

    /// Whether `id` is known and on hold.
    pub fn is_held(&self, id: &QueueId) -> bool {
        self.msgs.get(id).is_some_and(|m| m.held)
    }

    /// Every known message id (for reconciling with the spool at a queue run).
    pub fn ids(&self) -> impl Iterator<Item = &QueueId> {
        self.msgs.keys()
    }

    /// Forget `id` (deleted from the spool). A job in flight for it is still accepted by
    /// [`Scheduler::done`], which then returns no commands.
    pub fn remove(&mut self, id: &QueueId) -> bool {
        self.msgs.remove(id).is_some()
    }
}

#[cfg(test)]
mod tests;
