//! The durable spool: where an accepted message lives until every recipient is final.
//!
//! Blocking std I/O only; the daemon calls it from `spawn_blocking`. [`Spool`] is cheap to
//! clone and shared between threads.
//!
//! # Layout
//!
//! ```text
//! DIR/incoming/ID   stored, not yet taken by a queue manager (also: `mailc queue requeue`)
//! DIR/active/ID     taken by the running queue manager (moved back to incoming/ on start)
//! DIR/deferred/ID   had a temporary failure, waits for its next attempt
//! DIR/hold/ID       held by policy (`hold`) or by the administrator; never delivered
//! DIR/corrupt/ID    could not be read at start; kept for the administrator, never delivered
//! DIR/state/ID      per-recipient delivery state (absent = nobody tried yet)
//! DIR/tmp/...       files being written; everything here is garbage after a crash
//! ```
//!
//! A queue id is `TTTTTTTTTTTTCCCCCCRRRR` in upper-case hex: 12 digits of the arrival time in
//! ms, a 24-bit counter, 16 random bits per process. Ids sort by arrival.
//!
//! A **message file** is immutable once in place:
//!
//! ```text
//! MAILPOLICY-SPOOL 1\n
//! {"id":..,"class":"normal"|"bounce","arrived_ms":..,"data_len":N,"envelope":{QueuedMessage, data []}}\n
//! N bytes of message data
//! \nEND\n
//! ```
//!
//! A file whose length is not exactly header + N + trailer, or without the trailer, or whose
//! envelope line does not parse, is corrupt. The **state file** is one JSON object:
//! `{"v":1,"attempts":..,"next_attempt_ms":..,"delay_warned":..,"rcpts":[RcptState..]}`
//! with one entry per envelope recipient. It is replaced as a whole, never edited in place.
//!
//! # Durability argument
//!
//! Every change that makes something visible follows *write temp, fsync file, rename, fsync
//! directory*:
//!
//! 1. [`Spool::store`] writes the whole message file to `tmp/ID` and fsyncs it, then renames it
//!    to `incoming/ID` (or `hold/ID`) and fsyncs that directory. Only then does `store` return
//!    Ok, which is when the daemon may answer 250. A crash before the rename leaves only a
//!    file in `tmp/`, which recovery deletes: the client got no 250 and will retry. A crash
//!    after the rename but before the directory fsync may lose the entry, but `store` had not
//!    returned, so nothing acknowledged is lost. Since rename is atomic and the file was
//!    fsynced before it, a file in a queue directory is always complete: a reader never sees a
//!    half-written message. An error anywhere (ENOSPC included) removes the temp file, and a
//!    failed directory fsync unlinks the renamed file again, so a failed store leaves nothing.
//! 2. [`Spool::record`] writes a new state file to `tmp/`, fsyncs it, renames it over
//!    `state/ID` and fsyncs `state/`. A crash leaves either the old or the new state, whole;
//!    the worst case is the old one, which makes a recipient be tried again (a duplicate,
//!    never a loss). The host records *after* delivering and after storing any DSN.
//! 3. [`Spool::move_to`] is one rename, then both directories are fsynced; a crash leaves the
//!    file in exactly one of the two queues, and every queue but `corrupt/` is recovered.
//!    [`Spool::activate`] (incoming to active, the queue manager's hot path) is a rename
//!    without fsync: after a crash the file is in `incoming/` or `active/`, and recovery
//!    moves `active/` back to `incoming/`, so both outcomes are the same.
//! 4. [`Spool::remove`] unlinks the message file first, then the state file, and fsyncs
//!    both directories. A crash in between leaves an orphan state file, which recovery
//!    deletes; a crash before the fsync may resurrect the message (a duplicate, not a loss).
//!
//! **Group commit.** The per-file fsync is done by the calling thread (many run in parallel,
//! and the filesystem journal batches them); the rename and the directory fsync go through a
//! shared committer ([`commit`]): whichever caller finds no commit running takes every pending
//! rename, performs them, fsyncs each touched directory once and wakes all the callers of the
//! batch. N concurrent stores pay N file fsyncs but far fewer than N directory fsyncs.
//!
//! **Recovery** ([`Spool::open`]): `tmp/` is emptied; `active/` is moved back to `incoming/`
//! (as Postfix does: "active" only means "in a running queue manager's memory"); every file
//! in `incoming/`, `deferred/`, `hold/` is checked (header parse, exact length, trailer,
//! state file) and returned in [`Recovered::messages`], or moved to `corrupt/` with its
//! state file and reported; state files without a message are deleted. Nothing panics on
//! bad input. Only one process, the daemon, may `open` a spool (recovery deletes temp files);
//! `mailc queue` uses [`Spool::attach`], which does no recovery.

mod commit;
mod format;
pub mod maildrop;

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::conn::QueuedMessage;
use commit::{Committer, Op};
use format::StateFile;
pub use mailpolicy_engine::record::{Class, QueueId, QueueName, RcptState, RcptSummary, Summary};

/// A whole stored message, as [`Spool::load`] returns it.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    pub id: QueueId,
    pub queue: QueueName,
    pub class: Class,
    pub arrived_ms: u64,
    /// The envelope and the data.
    pub message: QueuedMessage,
    /// One per `message.recipients`.
    pub states: Vec<RcptState>,
    /// Delivery attempts recorded (calls of [`Spool::record`] with updates).
    pub attempts: u32,
    /// When the message is due next (arrival time if never tried).
    pub next_attempt_ms: u64,
    pub delay_warned: bool,
}

/// A file recovery moved to `corrupt/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorruptFile {
    /// File name (the queue id when it was one).
    pub name: String,
    pub from: QueueName,
    pub reason: String,
}

/// What [`Spool::open`] found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recovered {
    /// Every acknowledged message still to deliver or on hold, sorted by id (arrival).
    pub messages: Vec<Summary>,
    /// Files moved to `corrupt/` by this recovery.
    pub corrupt: Vec<CorruptFile>,
    /// Half-written files deleted from `tmp/`.
    pub temp_removed: usize,
    /// State files without a message, deleted.
    pub orphans_removed: usize,
    /// Messages moved from `active/` back to `incoming/`.
    pub reactivated: usize,
}

/// Why a store failed. The daemon answers `Full` with 452 4.3.1, `Io` with 451 4.3.0.
#[derive(Debug)]
pub enum StoreError {
    /// ENOSPC or EDQUOT.
    Full(io::Error),
    Io(io::Error),
}

impl StoreError {
    fn from_io(e: io::Error) -> StoreError {
        if is_full(&e) {
            StoreError::Full(e)
        } else {
            StoreError::Io(e)
        }
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Full(e) => write!(f, "spool full: {e}"),
            StoreError::Io(e) => write!(f, "spool I/O error: {e}"),
        }
    }
}

impl std::error::Error for StoreError {}

const ENOSPC: i32 = 28;
#[cfg(target_os = "linux")]
const EDQUOT: i32 = 122;
#[cfg(not(target_os = "linux"))]
const EDQUOT: i32 = 69;

fn is_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(ENOSPC | EDQUOT))
}

/// How many fsyncs the spool has done (since open).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub file_syncs: u64,
    pub dir_syncs: u64,
    /// Group commits (each one or more directory fsyncs shared by its callers).
    pub batches: u64,
}

const STRIPES: usize = 32;

struct Inner {
    dir: PathBuf,
    committer: Committer,
    counter: AtomicU32,
    tmp_counter: AtomicU64,
    node: u16,
    /// Serialise read-modify-write of one message's state (striped by id).
    locks: Vec<Mutex<()>>,
    /// Files of removed messages in `tmp/`, to be written over by the next stores.
    reusable: Mutex<Vec<PathBuf>>,
    /// What the last stores wrote, as [`Spool::load`] would read it back ([`Spool::take_fresh`]).
    fresh: Mutex<Fresh>,
    /// Test hook: the next file write fails with this OS error after writing a little.
    #[cfg(test)]
    fail_write: Mutex<Option<i32>>,
}

/// The spool. Clone it freely; all clones share the committer.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

const STATE_DIR: &str = "state";
const TMP_DIR: &str = "tmp";
/// Most files of removed messages kept in `tmp/` for reuse ([`Spool::remove`]).
const REUSE_MAX: usize = 256;
/// Only files up to this size are kept for reuse; larger ones are unlinked.
const REUSE_SIZE: u64 = 64 << 10;
/// Messages up to this size are kept in memory after their store for the queue manager's
/// admission ([`Spool::take_fresh`]), at most [`FRESH_BUDGET`] bytes of them in all.
const FRESH_SIZE: usize = 64 << 10;
const FRESH_BUDGET: usize = 8 << 20;
const FRESH_LIFE_MS: u64 = 60_000;

/// Copies of messages just stored, until the queue manager admits them: the admission of a
/// message a session has just written needs no read of the file it wrote (issue 13: one
/// blocking-pool hand-off, an open, a read and a parse less per message). Bounded by
/// [`FRESH_BUDGET`]; a copy that does not fit is simply not kept (the admission reads the
/// file). Every change of a message through the spool drops its copy first, so a copy is
/// never older than the files.
#[derive(Default)]
struct Fresh {
    copies: std::collections::HashMap<QueueId, Stored>,
    bytes: usize,
}

impl Spool {
    /// Open (creating if needed) the spool in `dir` and recover it. Only the process that
    /// owns the spool (the daemon) may call this: it deletes temp files.
    pub fn open(dir: impl AsRef<Path>) -> io::Result<(Spool, Recovered)> {
        let spool = Spool::new(dir.as_ref());
        spool.create_dirs()?;
        let recovered = spool.recover()?;
        Ok((spool, recovered))
    }

    /// Use an existing spool without recovery (for `mailc queue`, next to a running daemon).
    pub fn attach(dir: impl AsRef<Path>) -> io::Result<Spool> {
        let spool = Spool::new(dir.as_ref());
        for q in QueueName::ALL {
            let p = spool.queue_dir(q);
            if !p.is_dir() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} is not a spool (no {})", dir.as_ref().display(), p.display()),
                ));
            }
        }
        Ok(spool)
    }

    fn new(dir: &Path) -> Spool {
        let counter: u32 = rand::random::<u32>() & 0xFF_FFFF;
        Spool {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                committer: Committer::default(),
                counter: AtomicU32::new(counter),
                tmp_counter: AtomicU64::new(0),
                node: rand::random(),
                locks: (0..STRIPES).map(|_| Mutex::new(())).collect(),
                reusable: Mutex::new(Vec::new()),
                fresh: Mutex::new(Fresh::default()),
                #[cfg(test)]
                fail_write: Mutex::new(None),
            }),
        }
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// fsync counters since this spool was opened.
    pub fn sync_stats(&self) -> SyncStats {
        let c = &self.inner.committer.counters;
        SyncStats {
            file_syncs: c.file_syncs.load(Ordering::Relaxed),
            dir_syncs: c.dir_syncs.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
        }
    }

    fn queue_dir(&self, q: QueueName) -> PathBuf {
        self.inner.dir.join(q.as_str())
    }

    fn state_path(&self, id: &QueueId) -> PathBuf {
        self.inner.dir.join(STATE_DIR).join(id.as_str())
    }

    fn tmp_path(&self, name: &str) -> PathBuf {
        self.inner.dir.join(TMP_DIR).join(name)
    }

    fn create_dirs(&self) -> io::Result<()> {
        let mut created = !self.inner.dir.is_dir();
        fs::create_dir_all(&self.inner.dir)?;
        let names = QueueName::ALL.iter().map(|q| q.as_str()).chain([STATE_DIR, TMP_DIR]);
        for name in names {
            let p = self.inner.dir.join(name);
            if !p.is_dir() {
                // Queue files are the mail itself: the queue's directories are the daemon's
                // alone (the spool directory stays searchable, for the maildrop in it).
                std::os::unix::fs::DirBuilderExt::mode(&mut fs::DirBuilder::new(), 0o700).create(&p)?;
                created = true;
            }
        }
        if created {
            self.sync_dir(&self.inner.dir)?;
            if let Some(parent) = self.inner.dir.parent() {
                // The spool directory's own entry; best effort (the parent may not be ours).
                let _ = self.sync_dir(parent);
            }
        }
        Ok(())
    }

    fn sync_dir(&self, d: &Path) -> io::Result<()> {
        self.inner.committer.counters.dir_syncs.fetch_add(1, Ordering::Relaxed);
        File::open(d)?.sync_all()
    }

    /// A fresh queue id, for a message stored later with [`Spool::store_with_tail_as`].
    pub fn new_id(&self, now_ms: u64) -> QueueId {
        let n = self.inner.counter.fetch_add(1, Ordering::Relaxed) & 0xFF_FFFF;
        QueueId::generate(now_ms, n, self.inner.node)
    }

    /// Write `parts` to a new file at `path` and fsync it; on error the file is removed.
    fn write_file(&self, path: &Path, parts: &[&[u8]]) -> io::Result<()> {
        match fs::OpenOptions::new().write(true).create_new(true).open(path) {
            Ok(f) => self.fill(f, path, parts),
            Err(e) => Err(e),
        }
    }

    /// Write `parts` to the empty file `f` (at `path`) and fsync it; on error the file is removed.
    fn fill(&self, mut f: File, path: &Path, parts: &[&[u8]]) -> io::Result<()> {
        let res = (|| {
            #[cfg(test)]
            {
                let injected = self.inner.fail_write.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(code) = injected {
                    f.write_all(b"partial")?;
                    return Err(io::Error::from_raw_os_error(code));
                }
            }
            for p in parts {
                f.write_all(p)?;
            }
            f.sync_all()?;
            self.inner.committer.counters.file_syncs.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })();
        if res.is_err() {
            let _ = fs::remove_file(path);
        }
        res
    }

    /// Make `msg` durable. When this returns Ok the message is on disk and will be found
    /// by recovery after any crash; on error nothing of it remains. A message with
    /// `msg.hold` set goes to `hold/`, any other to `incoming/`.
    pub fn store(&self, msg: &QueuedMessage, class: Class, now_ms: u64) -> Result<QueueId, StoreError> {
        self.store_with_tail(msg, None, class, now_ms)
    }

    /// A file of the spool's own for a session's message bytes past its in-memory part
    /// (`Session::take_spill`), on the spool's file system so storing it is a copy within
    /// one disk. The caller removes it.
    pub fn spill_path(&self, tag: &str) -> PathBuf {
        let seq = self.inner.tmp_counter.fetch_add(1, Ordering::Relaxed);
        self.tmp_path(&format!("spill.{tag}.{seq}"))
    }

    /// [`Spool::store`] for a message whose last `msg.tail` bytes are in the file `tail`
    /// (streamed there as they arrived): they are copied after `msg.data`, never read into
    /// memory whole.
    pub fn store_with_tail(
        &self,
        msg: &QueuedMessage,
        tail: Option<&Path>,
        class: Class,
        now_ms: u64,
    ) -> Result<QueueId, StoreError> {
        self.store_with_tail_as(None, msg, tail, class, now_ms)
    }

    /// [`Spool::store_with_tail`] under `id`, an id of [`Spool::new_id`] not used yet (the
    /// one a session reserved, which its milters already know), or a new one.
    pub fn store_with_tail_as(
        &self,
        id: Option<QueueId>,
        msg: &QueuedMessage,
        tail: Option<&Path>,
        class: Class,
        now_ms: u64,
    ) -> Result<QueueId, StoreError> {
        let id = id.unwrap_or_else(|| self.new_id(now_ms));
        let header = format::encode_header(&id, class, now_ms, msg).map_err(StoreError::Io)?;
        let (tmp, mut f) = self.message_file(&id).map_err(StoreError::from_io)?;
        match tail.filter(|_| msg.tail > 0) {
            None => self.fill(f, &tmp, &[&header, &msg.data, format::TRAILER]).map_err(StoreError::from_io)?,
            Some(t) => {
                let res = (|| {
                    f.write_all(&header)?;
                    f.write_all(&msg.data)?;
                    let mut src = fs::File::open(t)?;
                    let copied = io::copy(&mut io::Read::take(&mut src, msg.tail), &mut f)?;
                    if copied != msg.tail {
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the spill file is short"));
                    }
                    f.write_all(format::TRAILER)?;
                    f.sync_all()?;
                    self.inner.committer.counters.file_syncs.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                })();
                if let Err(e) = res {
                    let _ = fs::remove_file(&tmp);
                    return Err(StoreError::from_io(e));
                }
            }
        }
        let queue = if msg.hold.is_some() { QueueName::Hold } else { QueueName::Incoming };
        let to = self.queue_dir(queue).join(id.as_str());
        let res = self.inner.committer.commit(vec![Op::Rename { from: tmp.clone(), to, sync_from: false }]);
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::from_io(e));
        }
        if msg.tail == 0 {
            self.keep_fresh(&id, queue, class, now_ms, msg);
        }
        Ok(id)
    }

    /// Whether `id` is in any queue (`corrupt/` included).
    pub fn holds(&self, id: &QueueId) -> bool {
        self.locate(id).is_some()
    }

    /// A message file made elsewhere, checked as recovery checks one (header, exact length,
    /// trailer): its queue id and arrival time.
    pub fn inspect(path: &Path) -> io::Result<(QueueId, u64)> {
        let (meta, _) = format::read_meta(path)?;
        Ok((meta.id, meta.arrived_ms))
    }

    /// Take a complete message file made by another host's spool (a peer's shadow copy,
    /// section 5.5 of the language spec) into this one under its own queue id: renamed
    /// into `incoming/` (`hold/` when it is held), both directories fsynced. Refused when
    /// the file does not check or this spool already has that id.
    pub fn adopt(&self, file: &Path) -> io::Result<QueueId> {
        let (meta, _) = format::read_meta(file)?;
        let id = meta.id;
        let _guard = self.lock(&id);
        if self.locate(&id).is_some() {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{id} is already in the spool")));
        }
        let queue = if meta.envelope.hold.is_some() { QueueName::Hold } else { QueueName::Incoming };
        let to = self.queue_dir(queue).join(id.as_str());
        self.inner.committer.commit(vec![Op::Rename { from: file.to_path_buf(), to, sync_from: true }])?;
        Ok(id)
    }

    /// A new, empty file in `tmp/` for the message `id`: the file of a removed message when
    /// one is kept ([`Spool::remove`]), truncated, else a new one. Writing over a file the
    /// spool already has saves the file system an inode allocated and one freed per message
    /// (under a steady flow of mail ext4 spends more time finding a free inode that was not
    /// freed in the last seconds than on anything else the queue does).
    fn message_file(&self, id: &QueueId) -> io::Result<(PathBuf, File)> {
        loop {
            let reused = self.inner.reusable.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some(p) = reused else { break };
            match fs::OpenOptions::new().write(true).truncate(true).open(&p) {
                Ok(f) => return Ok((p, f)),
                Err(_) => {
                    let _ = fs::remove_file(&p);
                }
            }
        }
        let p = self.tmp_path(id.as_str());
        let f = fs::OpenOptions::new().write(true).create_new(true).open(&p)?;
        Ok((p, f))
    }

    /// Where the message file of `id` is, if anywhere.
    fn locate(&self, id: &QueueId) -> Option<(QueueName, PathBuf)> {
        QueueName::ALL.into_iter().find_map(|q| {
            let p = self.queue_dir(q).join(id.as_str());
            p.is_file().then_some((q, p))
        })
    }

    fn not_found(id: &QueueId) -> io::Error {
        io::Error::new(io::ErrorKind::NotFound, format!("no message {id} in the spool"))
    }

    fn lock(&self, id: &QueueId) -> std::sync::MutexGuard<'_, ()> {
        // Whoever changes a message's files makes its in-memory copy stale.
        self.forget_fresh(id);
        let h =
            id.as_str().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        self.inner.locks[(h % STRIPES as u64) as usize].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The message [`Spool::store`] (or a store with a tail) has just written, as
    /// [`Spool::load`] would read it, taken out of memory: `None` when it was not kept (too
    /// large, over the budget, a tail from a file), was changed since, or was taken already.
    pub fn take_fresh(&self, id: &QueueId) -> Option<Stored> {
        let mut f = self.inner.fresh.lock().unwrap_or_else(|e| e.into_inner());
        let s = f.copies.remove(id)?;
        f.bytes = f.bytes.saturating_sub(s.message.data.len());
        Some(s)
    }

    fn forget_fresh(&self, id: &QueueId) {
        let mut f = self.inner.fresh.lock().unwrap_or_else(|e| e.into_inner());
        if f.copies.is_empty() {
            return;
        }
        if let Some(s) = f.copies.remove(id) {
            f.bytes = f.bytes.saturating_sub(s.message.data.len());
        }
    }

    /// Keep what a store wrote (data all in memory) for [`Spool::take_fresh`], if it fits.
    fn keep_fresh(&self, id: &QueueId, queue: QueueName, class: Class, now_ms: u64, msg: &QueuedMessage) {
        let n = msg.data.len();
        if n > FRESH_SIZE {
            return;
        }
        let mut f = self.inner.fresh.lock().unwrap_or_else(|e| e.into_inner());
        if f.bytes + n > FRESH_BUDGET {
            // Copies nobody took within a minute (their message was removed through another
            // `Spool` of the same directory, or its admission never came) make room.
            f.copies.retain(|_, s| now_ms.saturating_sub(s.arrived_ms) < FRESH_LIFE_MS);
            f.bytes = f.copies.values().map(|s| s.message.data.len()).sum();
            if f.bytes + n > FRESH_BUDGET {
                return;
            }
        }
        let st = StateFile::initial(msg.recipients.len(), now_ms);
        let stored = Stored {
            id: id.clone(),
            queue,
            class,
            arrived_ms: now_ms,
            message: msg.clone(),
            states: st.rcpts,
            attempts: st.attempts,
            next_attempt_ms: st.next_attempt_ms,
            delay_warned: st.delay_warned,
        };
        f.bytes += n;
        f.copies.insert(id.clone(), stored);
    }

    /// The whole message with its state. `NotFound` if it is in no queue; `InvalidData` if
    /// its files do not parse.
    pub fn load(&self, id: &QueueId) -> io::Result<Stored> {
        let (queue, path) = self.locate(id).ok_or_else(|| Spool::not_found(id))?;
        let (meta, message) = format::read_message(&path)?;
        let st = format::read_state(&self.state_path(id), message.recipients.len())?
            .unwrap_or_else(|| StateFile::initial(message.recipients.len(), meta.arrived_ms));
        Ok(Stored {
            id: id.clone(),
            queue,
            class: meta.class,
            arrived_ms: meta.arrived_ms,
            message,
            states: st.rcpts,
            attempts: st.attempts,
            next_attempt_ms: st.next_attempt_ms,
            delay_warned: st.delay_warned,
        })
    }

    /// The summary of one message (header and state only).
    pub fn summary(&self, id: &QueueId) -> io::Result<Summary> {
        let (queue, path) = self.locate(id).ok_or_else(|| Spool::not_found(id))?;
        self.summarise(id, queue, &path)
    }

    fn summarise(&self, id: &QueueId, queue: QueueName, path: &Path) -> io::Result<Summary> {
        let (meta, _) = format::read_meta(path)?;
        let n = meta.envelope.recipients.len();
        let st = format::read_state(&self.state_path(id), n)?.unwrap_or_else(|| StateFile::initial(n, meta.arrived_ms));
        Ok(Summary {
            id: id.clone(),
            queue,
            class: meta.class,
            arrived_ms: meta.arrived_ms,
            size: meta.data_len,
            sender: meta.envelope.sender,
            hold_reason: meta.envelope.hold,
            rcpts: meta
                .envelope
                .recipients
                .into_iter()
                .zip(st.rcpts)
                .map(|(r, state)| RcptSummary { address: r.address, state })
                .collect(),
            attempts: st.attempts,
            next_attempt_ms: st.next_attempt_ms,
            delay_warned: st.delay_warned,
        })
    }

    /// Read-modify-write the state file of `id` durably.
    fn update_state(&self, id: &QueueId, f: impl FnOnce(&mut StateFile) -> io::Result<()>) -> io::Result<()> {
        let _guard = self.lock(id);
        let (_, path) = self.locate(id).ok_or_else(|| Spool::not_found(id))?;
        let (meta, _) = format::read_meta(&path)?;
        let n = meta.envelope.recipients.len();
        let state_path = self.state_path(id);
        let mut st = format::read_state(&state_path, n)?.unwrap_or_else(|| StateFile::initial(n, meta.arrived_ms));
        f(&mut st)?;
        let bytes = serde_json::to_vec(&st).map_err(io::Error::other)?;
        let seq = self.inner.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self.tmp_path(&format!("{id}.state.{seq}"));
        self.write_file(&tmp, &[&bytes])?;
        let res = self.inner.committer.commit(vec![Op::Rename { from: tmp.clone(), to: state_path, sync_from: false }]);
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    /// Mark recipients delivered durably as soon as the next hop said 250, from the delivery
    /// itself (group-committed like acceptance), so a crash before the queue manager's own
    /// [`Spool::record`] does not deliver them again. Counts no attempt (`record` does).
    pub fn mark_delivered(&self, id: &QueueId, updates: &[(usize, RcptState)]) -> io::Result<()> {
        if updates.is_empty() {
            return Ok(());
        }
        self.update_state(id, |st| {
            for (i, s) in updates {
                if let Some(slot) = st.rcpts.get_mut(*i) {
                    *slot = s.clone();
                }
            }
            Ok(())
        })
    }

    /// Record delivery results durably: set recipient `i` to `state` for each update, and the
    /// time the message is next due when `next_attempt_ms` is given. Counts one attempt
    /// when `updates` is not empty. `NotFound` if the message is gone (removed by the
    /// administrator meanwhile): then nothing is written.
    pub fn record(&self, id: &QueueId, updates: &[(usize, RcptState)], next_attempt_ms: Option<u64>) -> io::Result<()> {
        self.update_state(id, |st| {
            for (i, s) in updates {
                let slot = st.rcpts.get_mut(*i).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("message {id} has no recipient {i}"))
                })?;
                *slot = s.clone();
            }
            if !updates.is_empty() {
                st.attempts = st.attempts.saturating_add(1);
            }
            if let Some(t) = next_attempt_ms {
                st.next_attempt_ms = t;
            }
            Ok(())
        })
    }

    /// Remember durably that the delay warning for `id` was sent.
    pub fn set_delay_warned(&self, id: &QueueId) -> io::Result<()> {
        self.update_state(id, |st| {
            st.delay_warned = true;
            Ok(())
        })
    }

    /// Make `id` due at `at_ms`: its next attempt and every deferred recipient's. This is
    /// what `mailc queue flush` does; a running daemon notices at its next queue scan.
    pub fn make_due(&self, id: &QueueId, at_ms: u64) -> io::Result<()> {
        self.update_state(id, |st| {
            st.next_attempt_ms = at_ms;
            for r in &mut st.rcpts {
                if let RcptState::Deferred { next_at, .. } = r {
                    *next_at = at_ms;
                }
            }
            Ok(())
        })
    }

    /// Reset every deferred recipient to pending and make the message due at `at_ms`
    /// (for `requeue`: the next attempt routes these recipients afresh).
    pub fn reset_deferred(&self, id: &QueueId, at_ms: u64) -> io::Result<()> {
        self.update_state(id, |st| {
            st.next_attempt_ms = at_ms;
            for r in &mut st.rcpts {
                if matches!(r, RcptState::Deferred { .. }) {
                    *r = RcptState::Pending;
                }
            }
            Ok(())
        })
    }

    /// Move the message to another queue, durably. Moving to where it is is a no-op.
    pub fn move_to(&self, id: &QueueId, queue: QueueName) -> io::Result<()> {
        let _guard = self.lock(id);
        let (from_q, from) = self.locate(id).ok_or_else(|| Spool::not_found(id))?;
        if from_q == queue {
            return Ok(());
        }
        let to = self.queue_dir(queue).join(id.as_str());
        self.inner.committer.commit(vec![Op::Rename { from, to, sync_from: true }])
    }

    /// Take a message from `incoming/` into `active/` (the queue manager has it in memory
    /// now). A plain rename with no fsync: recovery moves `active/` back to `incoming/`, so
    /// whether or not this rename survives a crash the message is found in `incoming/`
    /// after it; making the rename durable would buy nothing and cost two directory
    /// fsyncs per message. A message in any other queue is left where it is.
    pub fn activate(&self, id: &QueueId) -> io::Result<()> {
        let _guard = self.lock(id);
        let from = self.queue_dir(QueueName::Incoming).join(id.as_str());
        let to = self.queue_dir(QueueName::Active).join(id.as_str());
        match fs::rename(&from, &to) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if self.locate(id).is_some() {
                    Ok(())
                } else {
                    Err(Spool::not_found(id))
                }
            }
            r => r,
        }
    }

    /// Move the message to `deferred/` after a failed attempt, durably; a message on hold
    /// (or in `corrupt/`) stays where it is, so an administrator's hold wins over a
    /// delivery attempt that was running meanwhile.
    pub fn defer(&self, id: &QueueId) -> io::Result<()> {
        let _guard = self.lock(id);
        let (from_q, from) = self.locate(id).ok_or_else(|| Spool::not_found(id))?;
        if matches!(from_q, QueueName::Deferred | QueueName::Hold | QueueName::Corrupt) {
            return Ok(());
        }
        let to = self.queue_dir(QueueName::Deferred).join(id.as_str());
        self.inner.committer.commit(vec![Op::Rename { from, to, sync_from: true }])
    }

    /// Delete the message and its state, durably. `NotFound` if it is in no queue.
    ///
    /// The message file leaves its queue directory by a rename into `tmp/` instead of an
    /// unlink when it is small and fewer than [`REUSE_MAX`] are kept: the next store writes
    /// over it ([`Spool::message_file`]). Either way the queue directory is fsynced before
    /// this returns, so the message is as durably gone; recovery deletes whatever `tmp/`
    /// holds.
    pub fn remove(&self, id: &QueueId) -> io::Result<()> {
        let _guard = self.lock(id);
        let (_, path) = self.locate(id).ok_or_else(|| Spool::not_found(id))?;
        let room = self.inner.reusable.lock().map(|v| v.len() < REUSE_MAX).unwrap_or(false);
        let reuse = (room && fs::metadata(&path).is_ok_and(|m| m.len() <= REUSE_SIZE)).then(|| {
            let seq = self.inner.tmp_counter.fetch_add(1, Ordering::Relaxed);
            self.tmp_path(&format!("reuse.{seq}"))
        });
        let first = match &reuse {
            Some(to) => Op::Retire { from: path, to: to.clone() },
            None => Op::Unlink(path),
        };
        let res = self.inner.committer.commit(vec![first, Op::Unlink(self.state_path(id))]);
        if let Some(to) = reuse {
            match &res {
                Ok(()) => self.inner.reusable.lock().unwrap_or_else(|e| e.into_inner()).push(to),
                Err(_) => {
                    let _ = fs::remove_file(&to);
                }
            }
        }
        res
    }

    /// Every readable message in every queue but `corrupt/`, sorted by id. Files that do not
    /// parse (recovery will move them to `corrupt/`) and files removed while listing are
    /// skipped.
    pub fn list(&self) -> io::Result<Vec<Summary>> {
        let mut out = Vec::new();
        for q in [QueueName::Incoming, QueueName::Active, QueueName::Deferred, QueueName::Hold] {
            for (id, path) in self.entries(q)? {
                if let Ok(s) = self.summarise(&id, q, &path) {
                    out.push(s);
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Names of the files in `corrupt/`.
    pub fn list_corrupt(&self) -> io::Result<Vec<String>> {
        let mut out: Vec<String> = fs::read_dir(self.queue_dir(QueueName::Corrupt))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        out.sort();
        Ok(out)
    }

    /// The files of queue `q` whose names are queue ids.
    fn entries(&self, q: QueueName) -> io::Result<Vec<(QueueId, PathBuf)>> {
        let mut out = Vec::new();
        for e in fs::read_dir(self.queue_dir(q))? {
            let e = e?;
            if let Some(id) = e.file_name().to_str().and_then(QueueId::parse) {
                out.push((id, e.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    fn recover(&self) -> io::Result<Recovered> {
        let mut rec = Recovered::default();
        // 1. Half-written files.
        let tmp_dir = self.inner.dir.join(TMP_DIR);
        for e in fs::read_dir(&tmp_dir)? {
            let e = e?;
            let p = e.path();
            if p.is_dir() {
                fs::remove_dir_all(&p)?;
            } else {
                fs::remove_file(&p)?;
            }
            rec.temp_removed += 1;
        }
        if rec.temp_removed > 0 {
            self.sync_dir(&tmp_dir)?;
        }
        // 2. active/ back to incoming/.
        for (id, path) in self.entries(QueueName::Active)? {
            fs::rename(&path, self.queue_dir(QueueName::Incoming).join(id.as_str()))?;
            rec.reactivated += 1;
        }
        if rec.reactivated > 0 {
            self.sync_dir(&self.queue_dir(QueueName::Active))?;
            self.sync_dir(&self.queue_dir(QueueName::Incoming))?;
        }
        // 3. Check every message.
        let mut live = std::collections::HashSet::new();
        let mut corrupted = false;
        for q in [QueueName::Incoming, QueueName::Deferred, QueueName::Hold] {
            for e in fs::read_dir(self.queue_dir(q))? {
                let e = e?;
                let path = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                let parsed = match QueueId::parse(&name) {
                    None => Err(io::Error::new(io::ErrorKind::InvalidData, "file name is not a queue id")),
                    Some(id) if live.contains(&id) => {
                        Err(io::Error::new(io::ErrorKind::InvalidData, "the same id is in another queue"))
                    }
                    Some(id) => self.summarise(&id, q, &path),
                };
                match parsed {
                    Ok(s) => {
                        live.insert(s.id.clone());
                        rec.messages.push(s);
                    }
                    Err(err) if err.kind() == io::ErrorKind::InvalidData => {
                        let dup = QueueId::parse(&name).is_some_and(|id| live.contains(&id));
                        self.quarantine(&name, &path, !dup)?;
                        corrupted = true;
                        rec.corrupt.push(CorruptFile { name, from: q, reason: err.to_string() });
                    }
                    Err(err) => return Err(err),
                }
            }
        }
        if corrupted {
            for q in [QueueName::Incoming, QueueName::Deferred, QueueName::Hold, QueueName::Corrupt] {
                self.sync_dir(&self.queue_dir(q))?;
            }
        }
        // 4. State files without a message.
        let state_dir = self.inner.dir.join(STATE_DIR);
        for e in fs::read_dir(&state_dir)? {
            let e = e?;
            let keep = e.file_name().to_str().and_then(QueueId::parse).is_some_and(|id| live.contains(&id));
            if !keep {
                fs::remove_file(e.path())?;
                rec.orphans_removed += 1;
            }
        }
        if rec.orphans_removed > 0 || corrupted {
            self.sync_dir(&state_dir)?;
        }
        rec.messages.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(rec)
    }

    /// Move a bad file (and its state file, if any) to `corrupt/`, never overwriting.
    fn quarantine(&self, name: &str, path: &Path, with_state: bool) -> io::Result<()> {
        let cdir = self.queue_dir(QueueName::Corrupt);
        let mut target = cdir.join(name);
        let mut n = 1;
        while target.exists() {
            target = cdir.join(format!("{name}.{n}"));
            n += 1;
        }
        fs::rename(path, &target)?;
        if with_state && QueueId::parse(name).is_some() {
            let st = self.inner.dir.join(STATE_DIR).join(name);
            if st.is_file() {
                let mut t = target.into_os_string();
                t.push(".state");
                fs::rename(&st, PathBuf::from(t))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
