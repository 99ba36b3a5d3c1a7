//! Group commit: many threads share one directory fsync.
//!
//! Every caller has already written and fsynced its own file. What is left is to make a
//! directory change durable (a rename into place, or an unlink) and that costs a directory
//! fsync. Callers push their operation to a shared pending list; the first caller that finds
//! no commit in progress becomes the *leader*: it takes every pending operation, performs
//! them, fsyncs each touched directory once, publishes the results and wakes everyone.
//! Callers that arrived while a leader was busy wait, and one of them leads the next batch.
//! No thread is spawned and nothing waits on a timer: under no load a store pays exactly one
//! directory fsync, under load N stores pay far fewer than N.
//!
//! A waiter sleeps on its own thread (park/unpark), and a leader wakes only the callers whose
//! results it published plus the one caller that is to lead the next batch: a condition
//! variable's `notify_all` woke every waiter after every batch, most of them only to sleep
//! again (issue 13: task switches were the top entry of the daemon's profile).

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread::Thread;

/// One directory change to make durable.
#[derive(Debug)]
pub(crate) enum Op {
    /// Rename `from` to `to` (both in the spool, on one filesystem), then fsync the parent
    /// directory of `to` (and of `from` when `sync_from` is set).
    Rename { from: PathBuf, to: PathBuf, sync_from: bool },
    /// Remove `path` if present (a missing file is not an error), then fsync its directory.
    Unlink(PathBuf),
    /// Take `from` out of its directory as [`Op::Unlink`] does, but by renaming it to `to`
    /// (in `tmp/`, to be written again: [`super::Spool::remove`]); only `from`'s directory is
    /// fsynced, since what must be durable is that `from` is gone. Never rolled back.
    Retire { from: PathBuf, to: PathBuf },
}

/// Counters of the fsyncs the spool performed, for tests, metrics and benchmarks.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub file_syncs: AtomicU64,
    pub dir_syncs: AtomicU64,
    pub batches: AtomicU64,
}

#[derive(Default)]
struct State {
    next_ticket: u64,
    /// Operations waiting for a leader; each a ticket and the ops of one caller (all or none).
    pending: Vec<(u64, Vec<Op>)>,
    results: HashMap<u64, io::Result<()>>,
    /// The sleeping callers, by ticket.
    waiting: HashMap<u64, Thread>,
    leader: bool,
    /// Test hook: while set, nobody becomes leader, so callers accumulate.
    paused: bool,
}

#[derive(Default)]
pub(crate) struct Committer {
    state: Mutex<State>,
    pub counters: Counters,
    /// Test hook: the next directory fsync fails with this OS error.
    #[cfg(test)]
    pub fail_dir_sync: Mutex<Option<i32>>,
}

/// One caller's ticket, operations, result so far and the directories it touched.
type Outcome = (u64, Vec<Op>, io::Result<()>, BTreeSet<PathBuf>);

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Committer {
    /// Perform `ops` durably, sharing directory fsyncs with concurrent callers. On error
    /// the renames of this caller that took effect are undone (the renamed files are
    /// unlinked), so a failed commit leaves nothing visible behind.
    pub fn commit(&self, ops: Vec<Op>) -> io::Result<()> {
        let started = std::time::Instant::now();
        let r = self.commit_untimed(ops);
        crate::metrics::get().spool_commit(started.elapsed());
        r
    }

    fn commit_untimed(&self, ops: Vec<Op>) -> io::Result<()> {
        let mut st = lock(&self.state);
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.pending.push((ticket, ops));
        loop {
            if let Some(r) = st.results.remove(&ticket) {
                return r;
            }
            if !st.leader && !st.paused && !st.pending.is_empty() {
                st.leader = true;
                let batch = std::mem::take(&mut st.pending);
                drop(st);
                let results = self.run_batch(batch);
                st = lock(&self.state);
                st.leader = false;
                for (t, _) in &results {
                    if let Some(th) = st.waiting.remove(t) {
                        th.unpark();
                    }
                }
                st.results.extend(results);
                wake_next_leader(&mut st);
                continue;
            }
            st.waiting.insert(ticket, std::thread::current());
            drop(st);
            // A wake-up meant for an earlier wait of this thread, or none at all, only
            // costs one more look at the state.
            std::thread::park();
            st = lock(&self.state);
            st.waiting.remove(&ticket);
        }
    }

    fn run_batch(&self, batch: Vec<(u64, Vec<Op>)>) -> Vec<(u64, io::Result<()>)> {
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        // Phase 1: the directory operations. A caller whose op fails gets that error and
        // its earlier renames are rolled back.
        let mut outcome: Vec<Outcome> = Vec::new();
        for (ticket, ops) in batch {
            let mut dirs = BTreeSet::new();
            let mut done: Vec<&Path> = Vec::new();
            let mut res = Ok(());
            for op in &ops {
                match op {
                    Op::Rename { from, to, sync_from } => {
                        if let Err(e) = std::fs::rename(from, to) {
                            res = Err(e);
                            break;
                        }
                        done.push(to);
                        dirs.insert(parent(to));
                        if *sync_from {
                            dirs.insert(parent(from));
                        }
                    }
                    Op::Retire { from, to } => match std::fs::rename(from, to) {
                        Ok(()) => {
                            dirs.insert(parent(from));
                        }
                        Err(e) => {
                            res = Err(e);
                            break;
                        }
                    },
                    Op::Unlink(p) => match std::fs::remove_file(p) {
                        Ok(()) => {
                            dirs.insert(parent(p));
                        }
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => {
                            res = Err(e);
                            break;
                        }
                    },
                }
            }
            if res.is_err() {
                for p in done {
                    let _ = std::fs::remove_file(p);
                }
            }
            outcome.push((ticket, ops, res, dirs));
        }
        // Phase 2: one fsync per touched directory.
        let mut all: BTreeSet<PathBuf> = BTreeSet::new();
        for (_, _, res, dirs) in &outcome {
            if res.is_ok() {
                all.extend(dirs.iter().cloned());
            }
        }
        let mut failed: HashMap<PathBuf, io::Error> = HashMap::new();
        for d in all {
            if let Err(e) = self.sync_dir(&d) {
                failed.insert(d, e);
            }
        }
        // Phase 3: results; a caller whose directory did not sync is failed and its
        // renamed files are removed (it will answer 4xx, so the file must not survive).
        outcome
            .into_iter()
            .map(|(ticket, ops, res, dirs)| {
                let res = res.and_then(|()| match dirs.iter().find_map(|d| failed.get(d)) {
                    None => Ok(()),
                    Some(e) => {
                        for op in &ops {
                            if let Op::Rename { to, .. } = op {
                                let _ = std::fs::remove_file(to);
                            }
                        }
                        Err(copy_error(e))
                    }
                });
                (ticket, res)
            })
            .collect()
    }

    fn sync_dir(&self, d: &Path) -> io::Result<()> {
        #[cfg(test)]
        {
            let injected = self.fail_dir_sync.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(code) = injected {
                return Err(io::Error::from_raw_os_error(code));
            }
        }
        self.counters.dir_syncs.fetch_add(1, Ordering::Relaxed);
        File::open(d)?.sync_all()
    }

    /// Test hook: stop electing leaders (callers queue up) or resume.
    #[cfg(test)]
    pub fn set_paused(&self, paused: bool) {
        let mut st = lock(&self.state);
        st.paused = paused;
        wake_next_leader(&mut st);
    }

    #[cfg(test)]
    pub fn pending(&self) -> usize {
        lock(&self.state).pending.len()
    }
}

/// Wake the caller of the oldest pending operation, to lead the next batch (unless a
/// leader is at work, or nothing is pending).
fn wake_next_leader(st: &mut State) {
    if st.leader || st.paused {
        return;
    }
    let next = st.pending.iter().map(|(t, _)| *t).find(|t| st.waiting.contains_key(t));
    if let Some(th) = next.and_then(|t| st.waiting.get(&t)) {
        th.unpark();
    }
}

/// One directory error shared by several callers; the OS code (ENOSPC, EDQUOT) is kept.
fn copy_error(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(c) => io::Error::from_raw_os_error(c),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

fn parent(p: &Path) -> PathBuf {
    p.parent().map(Path::to_path_buf).unwrap_or_default()
}
