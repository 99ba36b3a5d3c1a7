use super::*;

const MIN: u64 = 60_000;
const HOUR: u64 = 60 * MIN;

fn id(n: u32) -> QueueId {
    QueueId::parse(&format!("M{n:06}")).expect("id")
}

fn temp(job: &Job) -> Vec<(usize, Delivery)> {
    job.rcpts.iter().map(|i| (*i, Delivery::TempFail("451 4.3.0 try later".into()))).collect()
}

fn ok(job: &Job) -> Vec<(usize, Delivery)> {
    job.rcpts.iter().map(|i| (*i, Delivery::Delivered("250 2.0.0 ok".into()))).collect()
}

fn records(cmds: &[Command]) -> Vec<&Command> {
    cmds.iter().filter(|c| matches!(c, Command::Record { .. })).collect()
}

#[test]
fn backoff_doubles_from_5_to_67_minutes() {
    let c = QueueConfig::default();
    let seq: Vec<u64> = (1..=7).map(|n| c.backoff(n)).collect();
    assert_eq!(seq, vec![300_000, 600_000, 1_200_000, 2_400_000, 4_000_000, 4_000_000, 4_000_000]);
    assert_eq!(c.backoff(u32::MAX), 4_000_000);
}

#[test]
fn deferred_message_is_retried_with_backoff() {
    let mut s = Scheduler::new(QueueConfig::default());
    let t0 = 1_000_000;
    assert!(s.add(Entry::new(id(1), Class::Normal, t0).rcpt(0, "mx:b.example"), t0));
    assert!(!s.add(Entry::new(id(1), Class::Normal, t0).rcpt(0, "mx:b.example"), t0));
    let mut now = t0;
    let mut waits = Vec::new();
    for attempt in 1..=5 {
        let job = s.poll_job(now).expect("due");
        assert_eq!(job.attempt, attempt);
        assert_eq!(s.poll_job(now), None);
        let cmds = s.done(job.clone(), temp(&job), now);
        let next = match records(&cmds)[..] {
            [Command::Record { updates, next_attempt_ms: Some(next), .. }] => {
                assert!(matches!(&updates[0], (0, RcptState::Deferred { attempts, next_at, .. })
                    if *attempts == attempt && next_at == next));
                *next
            }
            _ => panic!("{cmds:?}"),
        };
        // Moved to deferred/ only the first time.
        let moves = cmds.iter().filter(|c| matches!(c, Command::Defer { .. })).count();
        assert_eq!(moves, usize::from(attempt == 1));
        waits.push(next - now);
        assert_eq!(s.poll_timeout(), Some(next));
        assert_eq!(s.poll_job(next - 1), None);
        now = next;
    }
    assert_eq!(waits, vec![5 * MIN, 10 * MIN, 20 * MIN, 40 * MIN, 4_000_000]);
    let job = s.poll_job(now).expect("due");
    let cmds = s.done(job.clone(), ok(&job), now);
    assert_eq!(cmds.last(), Some(&Command::Remove { id: id(1) }));
    assert!(cmds.iter().any(|c| matches!(c, Command::Dsn { kind: DsnKind::Success, .. })));
    assert!(!s.contains(&id(1)));
    assert_eq!(s.stats(), Stats::default());
}

#[test]
fn expiry_bounces_instead_of_deferring() {
    let cfg = QueueConfig { delay_warning_ms: None, ..QueueConfig::default() };
    let lifetime = cfg.max_queue_lifetime_ms;
    let mut s = Scheduler::new(cfg);
    s.add(Entry::new(id(1), Class::Normal, 0).rcpt(0, "mx:a").rcpt(1, "mx:a"), 0);
    let job = s.poll_job(0).expect("job");
    let cmds = s.done(job.clone(), temp(&job), 0);
    assert!(!cmds.iter().any(|c| matches!(c, Command::Dsn { .. })));
    // The last attempt after the lifetime fails with the last reply.
    s.flush(None, lifetime);
    let job = s.poll_job(lifetime).expect("job");
    let results = vec![
        (0, Delivery::TempFail("452 4.2.2 mailbox full".into())),
        (1, Delivery::TempFail("421 4.4.2 timeout".into())),
    ];
    let cmds = s.done(job, results, lifetime);
    assert_eq!(
        cmds[0],
        Command::Dsn {
            id: id(1),
            class: Class::Normal,
            kind: DsnKind::Failure,
            rcpts: vec![(0, "452 4.2.2 mailbox full".into()), (1, "421 4.4.2 timeout".into())],
            expired: true,
        }
    );
    assert_eq!(cmds.last(), Some(&Command::Remove { id: id(1) }));
    assert!(!s.contains(&id(1)));
}

#[test]
fn bounces_have_their_own_lifetime() {
    let cfg = QueueConfig { bounce_queue_lifetime_ms: HOUR, ..QueueConfig::default() };
    let mut s = Scheduler::new(cfg);
    s.add(Entry::new(id(1), Class::Bounce, 0).rcpt(0, "mx:a"), 0);
    s.add(Entry::new(id(2), Class::Normal, 0).rcpt(0, "mx:b"), 0);
    while let Some(job) = s.poll_job(0) {
        s.done(job.clone(), temp(&job), 0);
    }
    s.flush(None, 2 * HOUR);
    let mut expired = Vec::new();
    while let Some(job) = s.poll_job(2 * HOUR) {
        let cmds = s.done(job.clone(), temp(&job), 2 * HOUR);
        if cmds.iter().any(|c| matches!(c, Command::Dsn { expired: true, .. })) {
            expired.push(job.id);
        }
    }
    assert_eq!(expired, vec![id(1)]);
    assert!(s.contains(&id(2)));
}

#[test]
fn permanent_failure_asks_for_a_failure_dsn() {
    let mut s = Scheduler::new(QueueConfig::default());
    s.add(Entry::new(id(1), Class::Normal, 0).rcpt(0, "mx:a").rcpt(1, "mx:a"), 0);
    let job = s.poll_job(0).expect("job");
    let cmds = s.done(
        job,
        vec![(0, Delivery::PermFail("550 5.1.1 no such user".into())), (1, Delivery::TempFail("451 later".into()))],
        10,
    );
    assert!(matches!(&cmds[0], Command::Dsn { kind: DsnKind::Failure, rcpts, expired: false, .. }
        if rcpts == &vec![(0, "550 5.1.1 no such user".to_string())]));
    assert!(matches!(&cmds[1], Command::Record { updates, .. } if updates.len() == 2));
    assert_eq!(cmds[2], Command::Defer { id: id(1) });
}

#[test]
fn delay_warning_once_after_four_hours() {
    let mut s = Scheduler::new(QueueConfig::default());
    s.add(Entry::new(id(1), Class::Normal, 0).rcpt(0, "mx:a"), 0);
    let mut warnings = Vec::new();
    let mut now = 0;
    while now < 10 * HOUR {
        let mut cmds = s.poll_warnings(now);
        let Some(job) = s.poll_job(now) else {
            collect_warnings(&cmds, now, &mut warnings);
            now = s.poll_timeout().expect("timeout");
            continue;
        };
        cmds.extend(s.done(job.clone(), temp(&job), now));
        collect_warnings(&cmds, now, &mut warnings);
    }
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    // At four hours by the clock, between two attempts.
    assert_eq!(warnings[0].0, 4 * HOUR);
    assert_eq!(warnings[0].1, vec![(0, "451 4.3.0 try later".to_string())]);
    // A message recovered with the flag set never warns again; bounces never warn.
    let mut s = Scheduler::new(QueueConfig::default());
    let mut e = Entry::new(id(2), Class::Normal, 0).rcpt(0, "mx:a");
    e.delay_warned = true;
    s.add(e, 5 * HOUR);
    s.add(Entry::new(id(3), Class::Bounce, 0).rcpt(0, "mx:b"), 5 * HOUR);
    while let Some(job) = s.poll_job(5 * HOUR) {
        let cmds = s.done(job.clone(), temp(&job), 5 * HOUR);
        assert!(!cmds.iter().any(|c| matches!(c, Command::Dsn { kind: DsnKind::Delay, .. })));
    }
}

fn collect_warnings(cmds: &[Command], now: u64, out: &mut Vec<(u64, Vec<(usize, String)>)>) {
    for c in cmds {
        if let Command::Dsn { kind: DsnKind::Delay, rcpts, .. } = c {
            out.push((now, rcpts.clone()));
        }
    }
}

/// Issue 11: a message held, released and requeued expired without its delay warning.
/// The warning is due by the clock; one that fell due while the message was held goes out
/// at its release, and before the message can expire.
#[test]
fn delay_warning_due_while_held_goes_out_at_release_before_expiry() {
    let cfg = QueueConfig { max_queue_lifetime_ms: 6 * HOUR, ..QueueConfig::default() };
    let mut s = Scheduler::new(cfg);
    s.add(Entry::new(id(1), Class::Normal, 0).rcpt(0, "mx:a"), 0);
    let job = s.poll_job(0).expect("first attempt");
    let cmds = s.done(job.clone(), temp(&job), 0);
    assert!(!cmds.iter().any(|c| matches!(c, Command::Dsn { .. })));
    // The administrator holds it for seven hours: no warning while it is held.
    assert!(s.hold(&id(1)));
    assert!(s.poll_warnings(5 * HOUR).is_empty(), "no warning while held");
    assert_eq!(s.poll_job(5 * HOUR), None);
    // Released (and, as `requeue` does, due now) past the warning time and the lifetime.
    assert!(s.release(&id(1), 7 * HOUR));
    let mut warnings = Vec::new();
    let cmds = s.poll_warnings(7 * HOUR);
    collect_warnings(&cmds, 7 * HOUR, &mut warnings);
    assert_eq!(warnings, vec![(7 * HOUR, vec![(0, "451 4.3.0 try later".to_string())])]);
    // The next attempt defers again: it expires, with no second warning.
    let job = s.poll_job(7 * HOUR).expect("released");
    let cmds = s.done(job.clone(), temp(&job), 7 * HOUR);
    assert!(cmds.iter().any(|c| matches!(c, Command::Dsn { kind: DsnKind::Failure, expired: true, .. })));
    assert!(!cmds.iter().any(|c| matches!(c, Command::Dsn { kind: DsnKind::Delay, .. })));
}

/// Without any attempt falling after the warning time (a long backoff), the warning still
/// comes at four hours.
#[test]
fn delay_warning_by_the_clock_with_a_long_backoff() {
    let cfg = QueueConfig { minimal_backoff_ms: 3 * HOUR, maximal_backoff_ms: 5 * HOUR, ..QueueConfig::default() };
    let mut s = Scheduler::new(cfg);
    s.add(Entry::new(id(1), Class::Normal, 0).rcpt(0, "mx:a").rcpt(1, "mx:b"), 0);
    while let Some(job) = s.poll_job(0) {
        let results = if job.destination == "mx:a" { temp(&job) } else { ok(&job) };
        s.done(job, results, 0);
    }
    assert_eq!(s.poll_timeout(), Some(3 * HOUR));
    let job = s.poll_job(3 * HOUR).expect("second attempt");
    s.done(job.clone(), temp(&job), 3 * HOUR);
    assert_eq!(s.poll_timeout(), Some(4 * HOUR), "the warning is the next thing due");
    let mut warnings = Vec::new();
    collect_warnings(&s.poll_warnings(4 * HOUR), 4 * HOUR, &mut warnings);
    assert_eq!(warnings, vec![(4 * HOUR, vec![(0, "451 4.3.0 try later".to_string())])], "only the undelivered one");
    assert!(s.poll_warnings(9 * HOUR).is_empty(), "once per message");
}

/// soft_bounce (R40): a permanent failure is deferred with its 5xy made 4xy.
#[test]
fn soft_bounce_defers_permanent_failures() {
    let cfg = QueueConfig { soft_bounce: true, delay_warning_ms: None, ..QueueConfig::default() };
    let lifetime = cfg.max_queue_lifetime_ms;
    let mut s = Scheduler::new(cfg);
    s.add(Entry::new(id(1), Class::Normal, 0).rcpt(0, "mx:a"), 0);
    let job = s.poll_job(0).expect("job");
    let cmds = s.done(job, vec![(0, Delivery::PermFail("554 5.7.1 refused by the next hop".into()))], 0);
    assert!(!cmds.iter().any(|c| matches!(c, Command::Dsn { .. })), "{cmds:?}");
    assert!(cmds.iter().any(|c| matches!(c, Command::Record { updates, .. }
        if matches!(&updates[0], (0, RcptState::Deferred { last_reply, .. }) if last_reply == "454 4.7.1 refused by the next hop"))));
    // At the end of the queue lifetime it bounces like any deferral.
    s.flush(None, lifetime);
    let job = s.poll_job(lifetime).expect("retry");
    let cmds = s.done(job, vec![(0, Delivery::PermFail("554 5.7.1 still refused".into()))], lifetime);
    assert!(cmds.iter().any(|c| matches!(c, Command::Dsn { kind: DsnKind::Failure, expired: true, .. })));
}

#[test]
fn slow_start_grows_on_success_and_shrinks_on_failure() {
    let mut s = Scheduler::new(QueueConfig::default());
    for n in 0..100 {
        s.add(Entry::new(id(n), Class::Normal, 0).rcpt(0, "mx:big"), 0);
    }
    // Starts at 2 concurrent jobs.
    let a = s.poll_job(0).expect("1");
    let b = s.poll_job(0).expect("2");
    assert_eq!(s.poll_job(0), None);
    assert_eq!(s.window("mx:big"), Some(2));
    // Each success widens the window by one.
    s.done(a.clone(), ok(&a), 1);
    assert_eq!(s.window("mx:big"), Some(3));
    s.done(b.clone(), ok(&b), 1);
    assert_eq!(s.window("mx:big"), Some(4));
    let mut inflight: Vec<Job> = std::iter::from_fn(|| s.poll_job(1)).collect();
    assert_eq!(inflight.len(), 4);
    for _ in 0..30 {
        let j = inflight.pop().expect("job");
        s.done(j.clone(), ok(&j), 2);
        inflight.extend(std::iter::from_fn(|| s.poll_job(2)));
    }
    // Never above the limit.
    assert_eq!(s.window("mx:big"), Some(20));
    assert_eq!(inflight.len(), 20);
    // A failure halves it.
    let j = inflight.pop().expect("job");
    s.done(j.clone(), temp(&j), 3);
    assert_eq!(s.window("mx:big"), Some(10));
    let j = inflight.pop().expect("job");
    s.done(j.clone(), temp(&j), 3);
    assert_eq!(s.window("mx:big"), Some(5));
    // 18 still in flight, window 5: nothing new starts.
    assert_eq!(s.poll_job(3), None);
    // Another destination is not affected.
    s.add(Entry::new(id(500), Class::Normal, 0).rcpt(0, "mx:other"), 3);
    assert_eq!(s.poll_job(3).map(|j| j.destination), Some("mx:other".into()));
}

#[test]
fn dead_destination_pauses_until_backoff_or_flush() {
    let cfg = QueueConfig { initial_destination_concurrency: 1, ..QueueConfig::default() };
    let mut s = Scheduler::new(cfg);
    for n in 0..3 {
        s.add(Entry::new(id(n), Class::Normal, 0).rcpt(0, "mx:down"), 0);
    }
    let j = s.poll_job(0).expect("job");
    s.done(j.clone(), temp(&j), 0);
    assert_eq!(s.window("mx:down"), Some(1));
    // Two more are ready but the destination is dead for 5 minutes.
    assert_eq!(s.poll_job(1), None);
    assert_eq!(s.poll_timeout(), Some(5 * MIN));
    assert!(s.poll_job(5 * MIN).is_some());
    let mut s2 = Scheduler::new(QueueConfig { initial_destination_concurrency: 1, ..QueueConfig::default() });
    for n in 0..2 {
        s2.add(Entry::new(id(n), Class::Normal, 0).rcpt(0, "mx:down"), 0);
    }
    let j = s2.poll_job(0).expect("job");
    s2.done(j.clone(), temp(&j), 0);
    assert_eq!(s2.poll_job(1), None);
    s2.flush(Some(&|d: &str| d == "mx:down"), 1);
    assert!(s2.poll_job(1).is_some());
}

#[test]
fn bounce_flood_does_not_starve_normal_mail() {
    let cfg = QueueConfig { max_jobs: 8, bounce_max_jobs: 4, ..QueueConfig::default() };
    let mut s = Scheduler::new(cfg);
    // 2000 bounces to 1000 different (backscatter) destinations arrive first.
    for n in 0..2000 {
        s.add(Entry::new(id(n), Class::Bounce, 0).rcpt(0, format!("mx:victim{}", n % 1000)), 0);
    }
    for n in 0..40 {
        s.add(Entry::new(id(10_000 + n), Class::Normal, 1).rcpt(0, format!("mx:d{}", n % 10)), 1);
    }
    let mut now = 1;
    let mut normal_done_at = None;
    let mut started = 0;
    let mut inflight: VecDeque<Job> = VecDeque::new();
    while normal_done_at.is_none() {
        while let Some(j) = s.poll_job(now) {
            assert!(s.stats().in_flight_bounce_jobs <= 4);
            started += 1;
            inflight.push_back(j);
        }
        let j = inflight.pop_front().expect("something in flight");
        s.done(j.clone(), ok(&j), now);
        now += 1;
        if !s.msgs.keys().any(|k| k.as_str() >= "M010000") {
            normal_done_at = Some(started);
        }
    }
    // All 40 normal messages went out among the first ~60 jobs, not after 2000 bounces.
    assert!(normal_done_at.is_some_and(|n| n < 80), "{normal_done_at:?}");
    // And bounces still made progress meanwhile.
    assert!(s.stats().messages < 2000);
}

#[test]
fn bounce_rate_limit_per_minute() {
    let cfg = QueueConfig { bounce_rate_per_minute: Some(3), ..QueueConfig::default() };
    let mut s = Scheduler::new(cfg);
    for n in 0..10 {
        s.add(Entry::new(id(n), Class::Bounce, 0).rcpt(0, format!("mx:v{n}")), 0);
    }
    let first: Vec<Job> = std::iter::from_fn(|| s.poll_job(0)).collect();
    assert_eq!(first.len(), 3);
    for j in &first {
        s.done(j.clone(), ok(j), 10);
    }
    assert_eq!(s.poll_job(MIN - 1), None);
    assert_eq!(s.poll_timeout(), Some(MIN));
    assert_eq!(std::iter::from_fn(|| s.poll_job(MIN)).count(), 3);
    // Normal mail is not limited.
    for n in 100..110 {
        s.add(Entry::new(id(n), Class::Normal, 0).rcpt(0, format!("mx:n{n}")), MIN);
    }
    assert_eq!(std::iter::from_fn(|| s.poll_job(MIN)).count(), 10);
}

#[test]
fn flush_makes_deferred_jobs_due() {
    let mut s = Scheduler::new(QueueConfig::default());
    s.add(Entry::new(id(1), Class::Normal, 0).rcpt(0, "mx:a"), 0);
    s.add(Entry::new(id(2), Class::Normal, 0).rcpt(0, "mx:b"), 0);
    while let Some(j) = s.poll_job(0) {
        s.done(j.clone(), temp(&j), 0);
    }
    assert_eq!(s.poll_job(1), None);
    // Flush one site.
    s.flush(Some(&|d: &str| d == "mx:b"), 1);
    let j = s.poll_job(1).expect("flushed");
    assert_eq!(j.id, id(2));
    assert_eq!(s.poll_job(1), None);
    s.done(j.clone(), ok(&j), 1);
    // Flush all.
    s.flush(None, 2);
    assert_eq!(s.poll_job(2).map(|j| j.id), Some(id(1)));
    // make_due (after `mailc queue flush`) on one id.
    let mut s = Scheduler::new(QueueConfig::default());
    s.add(Entry::new(id(3), Class::Normal, 0).rcpt(0, "mx:a"), 0);
    let j = s.poll_job(0).expect("job");
    s.done(j.clone(), temp(&j), 0);
    assert!(s.make_due(&id(3), 7));
    assert!(s.poll_job(7).is_some());
    assert!(!s.make_due(&id(99), 7));
}

#[test]
fn jobs_group_recipients_per_destination_and_reuse_connections() {
    let cfg = QueueConfig { destination_recipient_limit: 2, ..QueueConfig::default() };
    let mut s = Scheduler::new(cfg);
    s.add(Entry::new(id(1), Class::Normal, 0).rcpt(0, "mx:a").rcpt(1, "mx:b").rcpt(2, "mx:a").rcpt(3, "mx:a"), 0);
    s.add(Entry::new(id(2), Class::Normal, 0).rcpt(0, "mx:a"), 0);
    let j1 = s.poll_job(0).expect("job");
    assert_eq!((j1.destination.as_str(), j1.rcpts.clone()), ("mx:a", vec![0, 2]));
    let j2 = s.poll_job(0).expect("job");
    assert_eq!((j2.destination.as_str(), j2.rcpts.clone()), ("mx:b", vec![1]));
    // The worker of j1 keeps its connection to mx:a and asks for more there.
    s.done(j1.clone(), ok(&j1), 1);
    let j3 = s.poll_job_for("mx:a", 1).expect("same destination");
    assert_eq!((j3.id.clone(), j3.rcpts.clone()), (id(1), vec![3]));
    let j4 = s.poll_job_for("mx:a", 1).expect("same destination");
    assert_eq!(j4.id, id(2));
    assert_eq!(s.poll_job_for("mx:a", 1), None);
    assert_eq!(s.poll_job_for("mx:none", 1), None);
    s.done(j3.clone(), ok(&j3), 2);
    let cmds = s.done(j2.clone(), ok(&j2), 2);
    assert_eq!(cmds.last(), Some(&Command::Remove { id: id(1) }));
}

#[test]
fn hold_release_remove() {
    let mut s = Scheduler::new(QueueConfig::default());
    s.add(Entry::new(id(1), Class::Normal, 0).rcpt(0, "mx:a"), 0);
    let mut held = Entry::new(id(2), Class::Normal, 0).rcpt(0, "mx:a");
    held.held = true;
    s.add(held, 0);
    assert!(s.hold(&id(1)));
    assert_eq!(s.poll_job(0), None);
    assert!(s.release(&id(2), 5));
    assert_eq!(s.poll_job(5).map(|j| j.id), Some(id(2)));
    assert!(s.release(&id(1), 6));
    let j = s.poll_job(6).expect("released");
    assert_eq!(j.id, id(1));
    // Removed while in flight: done() accepts the job and asks for nothing.
    assert!(s.remove(&id(1)));
    assert_eq!(s.done(j.clone(), ok(&j), 7), vec![]);
    assert!(!s.hold(&id(1)));
    assert_eq!(s.stats().in_flight_jobs, 1);
}

#[test]
fn missing_result_counts_as_temporary_failure() {
    let mut s = Scheduler::new(QueueConfig::default());
    s.add(Entry::new(id(1), Class::Normal, 0).rcpt(0, "mx:a").rcpt(1, "mx:a"), 0);
    let j = s.poll_job(0).expect("job");
    let cmds = s.done(j, vec![(0, Delivery::Delivered("250 ok".into()))], 1);
    assert!(cmds.iter().any(|c| matches!(c, Command::Record { updates, .. }
        if matches!(updates[1], (1, RcptState::Deferred { .. })))));
    assert!(s.contains(&id(1)));
}

#[test]
fn entry_from_spool_summary() {
    use crate::record::RcptSummary;
    let summary = Summary {
        id: id(1),
        queue: QueueName::Deferred,
        class: Class::Normal,
        arrived_ms: 100,
        size: 10,
        sender: "a@x".into(),
        hold_reason: None,
        rcpts: vec![
            RcptSummary {
                address: "b@done.example".into(),
                state: RcptState::Delivered { at: 1, reply: "250".into() },
            },
            RcptSummary {
                address: "c@later.example".into(),
                state: RcptState::Deferred { attempts: 3, next_at: 900, last_reply: "451".into() },
            },
            RcptSummary { address: "d@new.example".into(), state: RcptState::Pending },
        ],
        attempts: 3,
        next_attempt_ms: 900,
        delay_warned: true,
    };
    let e = Entry::from_summary(&summary, |_, a| a.split('@').nth(1).map(|d| format!("mx:{d}")));
    assert_eq!(
        e.rcpts,
        vec![
            EntryRcpt { index: 1, destination: "mx:later.example".into(), attempts: 3 },
            EntryRcpt { index: 2, destination: "mx:new.example".into(), attempts: 0 },
        ]
    );
    assert!(e.in_deferred && e.delay_warned && !e.held);
    let mut s = Scheduler::new(QueueConfig::default());
    s.add(e, 0);
    assert_eq!(s.poll_job(899), None);
    let attempts: Vec<u32> = std::iter::from_fn(|| s.poll_job(900)).map(|j| j.attempt).collect();
    assert_eq!(attempts, vec![4, 1]);
}

#[test]
fn queue_runs_every_five_minutes() {
    let mut s = Scheduler::new(QueueConfig::default());
    assert!(!s.poll_scan(0));
    assert_eq!(s.poll_timeout(), Some(5 * MIN));
    assert!(!s.poll_scan(5 * MIN - 1));
    assert!(s.poll_scan(5 * MIN));
    assert!(!s.poll_scan(5 * MIN));
    assert_eq!(s.poll_timeout(), Some(10 * MIN));
}
