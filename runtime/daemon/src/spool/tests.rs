use super::*;
use crate::conn::QueuedRcpt;

/// A fresh directory under the system temp dir, removed on drop.
pub(crate) struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "mailpolicy-{tag}-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        ));
        fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn message(sender: &str, rcpts: &[&str], body: &[u8]) -> QueuedMessage {
    QueuedMessage {
        sender: sender.to_string(),
        recipients: rcpts
            .iter()
            .map(|a| QueuedRcpt {
                address: a.to_string(),
                notify: vec!["FAILURE".into()],
                orcpt: format!("rfc822;{a}"),
                ..Default::default()
            })
            .collect(),
        ret: "HDRS".into(),
        envid: "env-1".into(),
        data: body.to_vec(),
        hold: None,
        archive: vec![],
        filter: None,
        batv_sign: true,
        client_ip: "192.0.2.7".into(),
        helo: "client.example".into(),
        auth_user: String::new(),
        added_headers: vec![("X-Test".into(), "1".into())],
        session: Default::default(),
        copy: false,
        list: None,
        tail: 0,
    }
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn store_load_round_trip() {
    let t = TempDir::new("spool");
    let (spool, rec) = Spool::open(&t.0).expect("open");
    assert_eq!(rec, Recovered::default());
    let msg = message("a@x.example", &["b@y.example", "c@z.example"], b"Subject: hi\r\n\r\nbody\n");
    let id = spool.store(&msg, Class::Normal, 1_700_000_000_000).expect("store");
    assert!(id.as_str().starts_with("018BCFE56800"));
    let s = spool.load(&id).expect("load");
    assert_eq!(s.message, msg);
    assert_eq!(s.queue, QueueName::Incoming);
    assert_eq!(s.class, Class::Normal);
    assert_eq!(s.arrived_ms, 1_700_000_000_000);
    assert_eq!(s.states, vec![RcptState::Pending, RcptState::Pending]);
    assert_eq!((s.attempts, s.delay_warned), (0, false));
    assert!(files(&t.0.join("tmp")).is_empty());
    // Data with newlines, NULs and the trailer itself inside survives.
    let tricky = message("", &["p@q.example"], b"\nEND\n\0\r\n.\r\n\nEND\n");
    let id2 = spool.store(&tricky, Class::Bounce, 5).expect("store");
    let s2 = spool.load(&id2).expect("load");
    assert_eq!(s2.message, tricky);
    assert_eq!(s2.class, Class::Bounce);
    assert!(id < id2 || id2.as_str() < id.as_str());
}

#[test]
fn ids_are_unique_and_sortable() {
    let t = TempDir::new("spool");
    let (spool, _) = Spool::open(&t.0).expect("open");
    let a = spool.new_id(1000);
    let b = spool.new_id(1000);
    let c = spool.new_id(2000);
    assert_ne!(a, b);
    assert!(a < c && b < c);
    assert!(QueueId::parse("../etc").is_none());
    assert!(QueueId::parse("").is_none());
    assert!(QueueId::parse(a.as_str()).is_some());
}

#[test]
fn hold_goes_to_hold_and_states_persist() {
    let t = TempDir::new("spool");
    let (spool, _) = Spool::open(&t.0).expect("open");
    let mut msg = message("a@x.example", &["b@y.example", "c@y.example"], b"x");
    msg.hold = Some("suspicious".into());
    let id = spool.store(&msg, Class::Normal, 10).expect("store");
    assert_eq!(files(&t.0.join("hold")), vec![id.to_string()]);
    spool
        .record(
            &id,
            &[
                (0, RcptState::Delivered { at: 20, reply: "250 ok".into() }),
                (1, RcptState::Deferred { attempts: 1, next_at: 320, last_reply: "451 later".into() }),
            ],
            Some(320),
        )
        .expect("record");
    spool.set_delay_warned(&id).expect("warned");
    // A held message is not moved by a delivery attempt's defer; an admin move is.
    spool.defer(&id).expect("defer");
    assert_eq!(spool.summary(&id).expect("summary").queue, QueueName::Hold);
    spool.move_to(&id, QueueName::Incoming).expect("move");
    spool.defer(&id).expect("defer");
    drop(spool);
    let (spool, rec) = Spool::open(&t.0).expect("reopen");
    assert_eq!(rec.messages.len(), 1);
    let s = &rec.messages[0];
    assert_eq!(s.queue, QueueName::Deferred);
    assert_eq!(s.hold_reason.as_deref(), Some("suspicious"));
    assert_eq!(s.next_attempt_ms, 320);
    assert_eq!(s.attempts, 1);
    assert!(s.delay_warned);
    assert_eq!(s.last_reply(), Some("451 later"));
    let err = spool.record(&id, &[(7, RcptState::Pending)], None).expect_err("no rcpt 7");
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    spool.make_due(&id, 50).expect("due");
    let l = spool.load(&id).expect("load");
    assert_eq!(l.next_attempt_ms, 50);
    assert!(matches!(l.states[1], RcptState::Deferred { next_at: 50, .. }));
    spool.reset_deferred(&id, 60).expect("reset");
    assert_eq!(spool.load(&id).expect("load").states[1], RcptState::Pending);
    spool.remove(&id).expect("remove");
    assert_eq!(spool.load(&id).expect_err("gone").kind(), io::ErrorKind::NotFound);
    assert_eq!(spool.record(&id, &[], None).expect_err("gone").kind(), io::ErrorKind::NotFound);
    assert!(files(&t.0.join("state")).is_empty());
    assert!(spool.list().expect("list").is_empty());
}

#[test]
fn concurrent_stores_share_directory_fsyncs() {
    let t = TempDir::new("spool");
    let (spool, _) = Spool::open(&t.0).expect("open");
    let before = spool.sync_stats();
    let threads = 16;
    let per = 8;
    let ids: Vec<QueueId> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|i| {
                let spool = spool.clone();
                s.spawn(move || {
                    (0..per)
                        .map(|j| {
                            let m = message("a@x", &["b@y"], format!("m {i} {j}").as_bytes());
                            spool.store(&m, Class::Normal, 1000).expect("store")
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().expect("thread")).collect()
    });
    let stats = spool.sync_stats();
    let n = (threads * per) as u64;
    assert_eq!(ids.len() as u64, n);
    assert_eq!(stats.file_syncs - before.file_syncs, n);
    // Every store returned Ok, so every message must survive a reopen.
    drop(spool);
    let (_, rec) = Spool::open(&t.0).expect("reopen");
    assert_eq!(rec.messages.len() as u64, n);
    let mut got: Vec<QueueId> = rec.messages.iter().map(|m| m.id.clone()).collect();
    let mut want = ids;
    got.sort();
    want.sort();
    assert_eq!(got, want);
    // 16 threads on a real filesystem: callers pile up behind each directory fsync (a run
    // here typically shows 25-35 directory fsyncs for 128 stores).
    assert!(stats.dir_syncs - before.dir_syncs < n, "{stats:?}");
}

#[test]
fn group_commit_batches_waiting_callers() {
    // Deterministic: hold the committer until every caller is queued, then let it go.
    let t = TempDir::new("spool");
    let (spool, _) = Spool::open(&t.0).expect("open");
    let before = spool.sync_stats();
    let n = 12;
    spool.inner.committer.set_paused(true);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|i| {
                let spool = spool.clone();
                s.spawn(move || {
                    let m = message("a@x", &["b@y"], format!("m {i}").as_bytes());
                    spool.store(&m, Class::Normal, 1000).expect("store")
                })
            })
            .collect();
        while spool.inner.committer.pending() < n {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        spool.inner.committer.set_paused(false);
        for h in hs {
            h.join().expect("thread");
        }
    });
    let stats = spool.sync_stats();
    assert_eq!(stats.file_syncs - before.file_syncs, n as u64);
    assert_eq!(stats.dir_syncs - before.dir_syncs, 1, "{stats:?}");
    assert_eq!(stats.batches - before.batches, 1);
    assert_eq!(files(&t.0.join("incoming")).len(), n);
}

#[test]
fn recovery_after_crashes() {
    let t = TempDir::new("spool");
    let (spool, _) = Spool::open(&t.0).expect("open");
    let good = spool.store(&message("a@x", &["b@y"], b"good"), Class::Normal, 1).expect("store");
    let active = spool.store(&message("a@x", &["b@y"], b"active"), Class::Normal, 2).expect("store");
    spool.move_to(&active, QueueName::Active).expect("move");
    let cut = spool.store(&message("a@x", &["b@y"], b"cut short"), Class::Normal, 3).expect("store");
    let badstate = spool.store(&message("a@x", &["b@y"], b"bad state"), Class::Normal, 4).expect("store");
    spool
        .record(&badstate, &[(0, RcptState::Deferred { attempts: 1, next_at: 9, last_reply: "421".into() })], Some(9))
        .expect("record");
    drop(spool);
    // Crash leftovers: a temp message and a temp state file, a truncated message file, a
    // state file that does not parse, a stray file and an orphan state file.
    fs::write(t.0.join("tmp/0000000000010000010001"), b"MAILPOLICY-SPOOL 1\n{\"id").expect("w");
    fs::write(t.0.join("tmp/X.state.3"), b"{").expect("w");
    let cut_path = t.0.join("incoming").join(cut.as_str());
    let len = fs::metadata(&cut_path).expect("meta").len();
    let f = fs::OpenOptions::new().write(true).open(&cut_path).expect("open");
    f.set_len(len - 3).expect("truncate");
    fs::write(t.0.join("state").join(badstate.as_str()), b"{\"v\":1,").expect("w");
    fs::write(t.0.join("deferred/not-an-id.txt"), b"junk").expect("w");
    fs::write(t.0.join("state/00000000000000DEAD0001"), b"{}").expect("w");

    let (spool, rec) = Spool::open(&t.0).expect("recover");
    let ids: Vec<&QueueId> = rec.messages.iter().map(|m| &m.id).collect();
    assert_eq!(ids, vec![&good, &active]);
    assert_eq!(rec.temp_removed, 2);
    assert_eq!(rec.reactivated, 1);
    assert_eq!(rec.orphans_removed, 1);
    let mut bad: Vec<&str> = rec.corrupt.iter().map(|c| c.name.as_str()).collect();
    bad.sort();
    let mut want = vec![cut.as_str(), badstate.as_str(), "not-an-id.txt"];
    want.sort();
    assert_eq!(bad, want);
    assert!(files(&t.0.join("tmp")).is_empty());
    assert!(files(&t.0.join("active")).is_empty());
    let corrupt = spool.list_corrupt().expect("corrupt");
    assert!(corrupt.contains(&format!("{badstate}.state")));
    assert_eq!(corrupt.len(), 4);
    assert_eq!(spool.load(&active).expect("load").queue, QueueName::Incoming);
    // A second open finds a clean spool.
    drop(spool);
    let (_, rec) = Spool::open(&t.0).expect("again");
    assert_eq!(rec.messages.len(), 2);
    assert!(rec.corrupt.is_empty());
}

#[test]
fn empty_and_garbage_files_are_corrupt_not_panics() {
    let t = TempDir::new("spool");
    let (spool, _) = Spool::open(&t.0).expect("open");
    drop(spool);
    let cases: [&[u8]; 6] = [
        b"",
        b"MAILPOLICY-SPOOL 1\n",
        b"MAILPOLICY-SPOOL 2\n{}\n\nEND\n",
        b"MAILPOLICY-SPOOL 1\n{\"id\":\"A\"}\n\nEND\n",
        b"MAILPOLICY-SPOOL 1\nnot json at all\n",
        &[0xff; 40],
    ];
    for (i, c) in cases.iter().enumerate() {
        fs::write(t.0.join("incoming").join(format!("BAD{i}")), c).expect("w");
    }
    let (_, rec) = Spool::open(&t.0).expect("recover");
    assert!(rec.messages.is_empty());
    assert_eq!(rec.corrupt.len(), cases.len());
}

#[test]
fn full_disk_leaves_nothing_behind() {
    let t = TempDir::new("spool");
    let (spool, _) = Spool::open(&t.0).expect("open");
    let msg = message("a@x", &["b@y"], b"data");
    // ENOSPC while writing the file.
    *spool.inner.fail_write.lock().expect("lock") = Some(ENOSPC);
    match spool.store(&msg, Class::Normal, 1) {
        Err(StoreError::Full(_)) => {}
        other => panic!("expected Full, got {other:?}"),
    }
    // EDQUOT on the directory fsync, after the rename.
    *spool.inner.committer.fail_dir_sync.lock().expect("lock") = Some(EDQUOT);
    assert!(matches!(spool.store(&msg, Class::Normal, 1), Err(StoreError::Full(_))));
    // EIO is not "full".
    *spool.inner.fail_write.lock().expect("lock") = Some(5);
    assert!(matches!(spool.store(&msg, Class::Normal, 1), Err(StoreError::Io(_))));
    for d in ["tmp", "incoming", "hold", "state"] {
        assert!(files(&t.0.join(d)).is_empty(), "{d} not empty");
    }
    // And the spool still works.
    spool.store(&msg, Class::Normal, 1).expect("store");
    assert_eq!(spool.list().expect("list").len(), 1);
}

#[test]
fn attach_requires_a_spool_and_does_not_recover() {
    let t = TempDir::new("spool");
    assert!(Spool::attach(&t.0).is_err());
    let (spool, _) = Spool::open(&t.0).expect("open");
    drop(spool);
    fs::write(t.0.join("tmp/inflight"), b"x").expect("w");
    let s = Spool::attach(&t.0).expect("attach");
    assert!(s.list().expect("list").is_empty());
    assert_eq!(files(&t.0.join("tmp")), vec!["inflight".to_string()]);
}

#[test]
fn activate_moves_without_fsync_and_recovery_undoes_it() {
    let t = TempDir::new("spool");
    let (spool, _) = Spool::open(&t.0).expect("open");
    let id = spool.store(&message("a@x", &["b@y"], b"hot"), Class::Normal, 1).expect("store");
    let held = spool.store(&message("a@x", &["b@y"], b"held"), Class::Normal, 2).expect("store");
    spool.move_to(&held, QueueName::Hold).expect("hold");
    let before = spool.sync_stats();
    spool.activate(&id).expect("activate");
    spool.activate(&held).expect("a held message stays held");
    let after = spool.sync_stats();
    assert_eq!(after.dir_syncs, before.dir_syncs, "activate does not fsync");
    assert_eq!(spool.summary(&id).expect("summary").queue, QueueName::Active);
    assert_eq!(spool.summary(&held).expect("summary").queue, QueueName::Hold);
    let gone = QueueId::parse("NOSUCHID").expect("id");
    assert_eq!(spool.activate(&gone).expect_err("gone").kind(), io::ErrorKind::NotFound);
    drop(spool);
    let (_, rec) = Spool::open(&t.0).expect("reopen");
    let q: Vec<(QueueId, QueueName)> = rec.messages.iter().map(|m| (m.id.clone(), m.queue)).collect();
    assert!(q.contains(&(id, QueueName::Incoming)), "{q:?}");
    assert!(q.contains(&(held, QueueName::Hold)), "{q:?}");
}

#[test]
fn removed_message_files_are_written_over_by_the_next_stores() {
    use std::os::unix::fs::MetadataExt;
    let t = TempDir::new("spool");
    let (spool, _) = Spool::open(&t.0).expect("open");
    let long = vec![b'x'; 3000];
    let first = spool.store(&message("a@x.example", &["b@y.example"], &long), Class::Normal, 1).expect("store");
    let inode = fs::metadata(t.0.join("incoming").join(first.as_str())).expect("meta").ino();
    let dirs = spool.sync_stats().dir_syncs;
    spool.remove(&first).expect("remove");
    // Gone from its queue, durably (its directory fsynced), and kept in tmp/ for reuse.
    assert_eq!(spool.sync_stats().dir_syncs, dirs + 1);
    assert!(matches!(spool.load(&first), Err(e) if e.kind() == io::ErrorKind::NotFound));
    assert_eq!(files(&t.0.join("tmp")).len(), 1);
    // The next store writes over that file (same inode), shorter than before: nothing of
    // the old message is left in it.
    let msg = message("c@x.example", &["d@y.example"], b"Subject: short\r\n\r\nnew\n");
    let second = spool.store(&msg, Class::Normal, 2).expect("store");
    let path = t.0.join("incoming").join(second.as_str());
    assert_eq!(fs::metadata(&path).expect("meta").ino(), inode);
    assert_eq!(spool.load(&second).expect("load").message, msg);
    assert!(!fs::read(&path).expect("read").windows(16).any(|w| w == [b'x'; 16]));
    assert!(files(&t.0.join("tmp")).is_empty());
    // Large files are unlinked, not kept.
    let big = spool.store(&message("a@x.example", &["b@y.example"], &vec![b'y'; 100_000]), Class::Normal, 3);
    spool.remove(&big.expect("store")).expect("remove");
    assert!(files(&t.0.join("tmp")).is_empty());
    // What tmp/ keeps is deleted at the next start.
    spool.remove(&second).expect("remove");
    assert_eq!(files(&t.0.join("tmp")).len(), 1);
    drop(spool);
    let (_spool, rec) = Spool::open(&t.0).expect("reopen");
    assert_eq!((rec.temp_removed, rec.messages.len()), (1, 0));
    assert!(files(&t.0.join("tmp")).is_empty());
}

/// What a store leaves in memory for the queue manager's admission is what `load` reads
/// back; a change through the spool drops it; a large message is not kept.
#[test]
fn a_fresh_copy_is_what_load_reads_until_the_message_changes() {
    let t = TempDir::new("fresh");
    let (spool, _) = Spool::open(&t.0).expect("open");
    let mut msg = message("a@example.com", &["b@example.net", "c@example.net"], b"Subject: x\r\n\r\nbody\r\n");
    msg.client_ip = "192.0.2.1".into();
    msg.archive = vec!["copies".into()];
    let id = spool.store(&msg, Class::Normal, 1_000).expect("store");
    let fresh = spool.take_fresh(&id).expect("kept");
    assert_eq!(fresh, spool.load(&id).expect("load"));
    assert_eq!(spool.take_fresh(&id), None, "taken once");

    let id = spool.store(&msg, Class::Normal, 2_000).expect("store");
    spool.record(&id, &[(0, RcptState::Pending)], Some(5_000)).expect("record");
    assert_eq!(spool.take_fresh(&id), None, "a change drops the copy");

    let mut big = msg.clone();
    big.data = vec![b'x'; FRESH_SIZE + 1];
    let id = spool.store(&big, Class::Normal, 3_000).expect("store");
    assert_eq!(spool.take_fresh(&id), None, "too large to keep");
    assert_eq!(spool.load(&id).expect("load").message.data.len(), FRESH_SIZE + 1);

    let mut held = msg.clone();
    held.hold = Some("policy".into());
    let id = spool.store(&held, Class::Normal, 4_000).expect("store");
    assert_eq!(spool.take_fresh(&id).map(|s| s.queue), Some(QueueName::Hold));
}

/// Copies nobody took make room for new ones once the budget is spent and they are a
/// minute old.
#[test]
fn fresh_copies_nobody_took_make_room_after_a_minute() {
    let t = TempDir::new("fresh-budget");
    let (spool, _) = Spool::open(&t.0).expect("open");
    let mut msg = message("a@example.com", &["b@example.net"], b"");
    msg.data = vec![b'x'; FRESH_SIZE];
    let n = FRESH_BUDGET / FRESH_SIZE;
    let old: Vec<QueueId> = (0..n).map(|_| spool.store(&msg, Class::Normal, 1_000).expect("store")).collect();
    let full = spool.store(&msg, Class::Normal, 2_000).expect("store");
    assert_eq!(spool.take_fresh(&full), None, "over the budget");
    let later = spool.store(&msg, Class::Normal, 1_000 + FRESH_LIFE_MS).expect("store");
    assert!(spool.take_fresh(&later).is_some(), "the old copies made room");
    assert_eq!(spool.take_fresh(&old[0]), None);
}
