//! The policy's state (spec section "State store"): `rate` windows, `concurrent` counts,
//! greylist triplets, call-ahead answers and alert windows. In this process by default;
//! shared by every host of a cluster in Redis with `server { state "redis://..."; }`.
//!
//! The engine never sees the store: it asks (`Request::Rate`, `Concurrent`, `Greylist`,
//! `Callahead`) and records (`Note::Count`, `Note::Alert`), and the daemon answers from
//! here. The local store is always kept as well, so `state_on_error local` has something
//! to answer from while Redis is away. Every Redis call is bounded by `state_timeout`;
//! after a failure Redis is left alone for [`PAUSE_MS`] (sessions get the fallback at
//! once instead of each waiting out the time-out), then the connection manager
//! reconnects on the next call.
//!
//! Round trips: a stage that records an event makes one (the event and every count the
//! stage may ask, `concurrent` included); the `concurrent` counts of this host are
//! published by one task ([`publish_counts`]), changes coalesced to at most one write per
//! [`PUBLISH_GAP_MS`], renewed every third of `state_lease`; a session costs no round
//! trip of its own to open or close.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use mailpolicy_lang::ir::Program;
use mailpolicy_stdlib::{greylist::Greylist, ratelimit::RateStore};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::eval::Answer;

/// How long Redis is left alone after a failure before it is tried again.
pub const PAUSE_MS: u64 = 1_000;
/// A key keeps at most this many events per rate window (as the local store).
const MAX_EVENTS: u64 = 100_000;
/// A Redis rate window is trimmed (to the horizon and to [`MAX_EVENTS`]) by about one
/// event in this many, chosen at random, instead of by every one: two commands fewer per
/// event. The answers are the same: a window's count starts no earlier than the horizon
/// and is capped at [`MAX_EVENTS`] (the events past the cap are the oldest, so a window
/// holding any of them holds every kept one), and the set outgrows the cap by the events
/// since its last trim alone.
const TRIM_EVERY: u32 = 16;
/// The `ZREMRANGEBYRANK` bound that keeps the newest [`MAX_EVENTS`]: `-(MAX_EVENTS + 1)`.
const RANK_BOUND: &str = "-100001";
/// This host's `concurrent` counts are written to Redis once per this on average when
/// they change faster (the changes in between are one write); up to [`PUBLISH_BURST`]
/// changes after a quiet spell are written at once, each.
pub const PUBLISH_GAP_MS: u64 = 5;
pub const PUBLISH_BURST: f64 = 8.0;

/// What a Redis failure gives the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// The lookup fails like any other back end: 451 4.4.3 (421 at connect).
    Tempfail,
    /// This host's own state answers until Redis is back.
    Local,
}

/// The state this process keeps (the whole store when no Redis is named).
#[derive(Default)]
pub struct Local {
    pub rates: Mutex<RateStore>,
    greylist: Mutex<Greylist>,
    /// recipient -> (code, text, valid until)
    callaheads: Mutex<HashMap<String, (u16, String, u64)>>,
    /// (address, text) -> when it was last sent
    alerts: Mutex<HashMap<(String, String), u64>>,
    /// This process among the cluster's: its events' ids and its field in the shared
    /// `concurrent` counts (kept across a reload, which keeps the counts).
    id: String,
    /// The random part of `id` (an event's member in a shared window is `SEQ.TAG`).
    tag: String,
    /// Events recorded in the shared store (their ids).
    seq: AtomicU64,
    /// Raised, under the `rates` lock, at every change of the open-session counts: a count
    /// written to Redis carries it, and Redis keeps the newest (two writes of one host
    /// that cross on the way cannot leave the older one).
    conc_version: AtomicU64,
    /// The `concurrent` keys whose count changed since it was last published (changed
    /// and taken under the `rates` lock, with the counts and their version).
    conc_dirty: Mutex<HashSet<String>>,
    conc_wake: tokio::sync::Notify,
    /// The newest version of the counts written to Redis: every change up to it is there.
    conc_published: tokio::sync::watch::Sender<u64>,
}

impl Local {
    fn new(hostname: &str) -> Local {
        let tag = format!("{:016x}", rand::random::<u64>());
        Local { id: format!("{hostname}/{}/{tag}", std::process::id()), tag, ..Local::default() }
    }

    /// The open-session counts of `keys` and their version, read together.
    fn open_counts(&self, keys: &[&str]) -> (Vec<u64>, u64) {
        let r = self.rates.lock().unwrap_or_else(|p| p.into_inner());
        (keys.iter().map(|k| r.concurrent(k)).collect(), self.conc_version.load(Ordering::Relaxed))
    }

    /// The changed keys (and, `renewing`, every open key the policy reads, in `names`) with
    /// their counts and version, taken together: a version published covers every change
    /// made up to it.
    fn take_dirty(&self, renewing: Option<&HashSet<String>>) -> (Vec<String>, Vec<u64>, u64) {
        let r = self.rates.lock().unwrap_or_else(|p| p.into_inner());
        let mut keys: HashSet<String> = std::mem::take(&mut *self.conc_dirty.lock().unwrap_or_else(|p| p.into_inner()));
        if let Some(names) = renewing {
            keys.extend(r.open_counts().filter(|(k, _)| names.contains(key_name(k))).map(|(k, _)| k.to_string()));
        }
        let keys: Vec<String> = keys.into_iter().collect();
        let counts = keys.iter().map(|k| r.concurrent(k)).collect();
        (keys, counts, self.conc_version.load(Ordering::Relaxed))
    }
}

#[derive(Debug)]
enum Fail {
    Timeout,
    Error(String),
}

impl Fail {
    fn answer(self) -> Answer {
        match self {
            Fail::Timeout => Answer::Timeout,
            Fail::Error(e) => Answer::Error(format!("state store: {e}")),
        }
    }
}

struct Scripts {
    stage: redis::Script,
    greylist: redis::Script,
}

/// The one script of a stage (and of the count publisher). KEYS: first ARGV[5] rate
/// windows, then `concurrent` count hashes. ARGV (built by [`Redis::stage_args`], every
/// bound already a string: the script does no arithmetic on them): 1 the event's time
/// (its score), 2 the trim bound `(T` or empty, 3 the event's member, 4 the rank bound
/// `-(cap + 1)`, 5 the number of rate keys, 6 this host's field, 7 the life of its counts
/// (ms), 8 the window's horizon (ms). For each rate key: trim it when ARGV[2] is set
/// (about one event in [`TRIM_EVERY`]: to the horizon and the cap), record the event,
/// and answer the events in each window the policy reads (ARGV: `nwin, from1 .. fromn`
/// per key). For each count hash: write this host's count of open sessions and its
/// version (ARGV: `count, version` per key; an older version than the one there is not
/// written), live for ARGV[7] ms on Redis's clock, and answer the sum over the hosts
/// whose counts are live (the expired ones, a dead host's, are dropped).
const STAGE: &str = r"
local n, score, member, trim, horizon = tonumber(ARGV[5]), ARGV[1], ARGV[3], ARGV[2], ARGV[8]
local host, ttl = ARGV[6], tonumber(ARGV[7])
local out, a = {}, 9
for i = 1, n do
  local k = KEYS[i]
  if trim ~= '' then
    redis.call('ZREMRANGEBYSCORE', k, '-inf', trim)
    redis.call('ZREMRANGEBYRANK', k, 0, ARGV[4])
  end
  redis.call('ZADD', k, score, member)
  redis.call('PEXPIRE', k, horizon)
  local nw = tonumber(ARGV[a]); a = a + 1
  for _ = 1, nw do
    out[#out + 1] = redis.call('ZCOUNT', k, ARGV[a], '+inf'); a = a + 1
  end
end
if #KEYS > n then
  local t = redis.call('TIME')
  local tnow = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  for i = n + 1, #KEYS do
    local k, mine, ver = KEYS[i], tonumber(ARGV[a]), tonumber(ARGV[a + 1]); a = a + 2
    local all, sum, newer = redis.call('HGETALL', k), 0, false
    for j = 1, #all, 2 do
      local e, c, v = string.match(all[j + 1], '^(%d+) (%d+) (%d+)$')
      e, c, v = tonumber(e), tonumber(c), tonumber(v)
      if all[j] == host and v and v > ver then
        newer = true
        if e > tnow then sum = sum + c end
      elseif all[j] ~= host then
        if e and e > tnow then sum = sum + c else redis.call('HDEL', k, all[j]) end
      end
    end
    if not newer then
      redis.call('HSET', k, host, string.format('%d %d %d', tnow + ttl, mine, ver))
      redis.call('PEXPIRE', k, ttl)
      sum = sum + mine
    end
    out[#out + 1] = sum
  end
end
return out
";

/// The greylist rule of `stdlib::greylist::Greylist::check`, on one hash: 1 = wait.
const GREYLIST: &str = r"
local now, delay, expire = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local e = redis.call('HMGET', KEYS[1], 'first', 'last', 'passed')
local first, last, passed = tonumber(e[1]), tonumber(e[2]), e[3] == '1'
if not first or not last or now - last > expire then
  first = now
  passed = false
end
local wait = 1
if passed or now - first >= delay then
  passed = true
  wait = 0
end
redis.call('HSET', KEYS[1], 'first', string.format('%d', first), 'last', string.format('%d', now), 'passed', passed and '1' or '0')
redis.call('PEXPIRE', KEYS[1], expire)
return wait
";

struct Redis {
    client: redis::Client,
    conn: OnceLock<ConnectionManager>,
    prefix: String,
    timeout: Duration,
    /// Life of this host's published `concurrent` counts (`state_lease`).
    lease_ms: u64,
    /// Redis is not asked before this (ms since the epoch) after a failure.
    down_until: AtomicU64,
    down: AtomicBool,
    scripts: Scripts,
    log: crate::log::Logger,
    /// Redis calls made (one round trip each; the benchmark reads it), and how many of
    /// them were the publisher's writes of this host's `concurrent` counts.
    round_trips: AtomicU64,
    count_writes: AtomicU64,
    /// The key names of the `concurrent` counts the policy reads (`client.ip`); none: this
    /// host publishes no count.
    concurrent_names: HashSet<String>,
    /// The count publisher was started; the store is gone (the publisher stops).
    publishing: AtomicBool,
    retired: AtomicBool,
}

/// The daemon's state store (one per policy load; the local part carries over a reload).
pub struct StateStore {
    pub local: Arc<Local>,
    redis: Option<Arc<Redis>>,
    on_error: OnError,
    /// The (counter, key name) windows the policy reads (`rate messages by client.ip per
    /// 1h`: ("messages", "client.ip") -> [3600000]): only these are kept in Redis (the
    /// local store keeps all), and recording an event answers their counts at once.
    read_windows: HashMap<(String, String), Vec<u64>>,
}

impl Drop for StateStore {
    fn drop(&mut self) {
        if let Some(r) = &self.redis {
            r.retired.store(true, Ordering::Relaxed);
            self.local.conc_wake.notify_waiters();
        }
    }
}

/// The lower bound of a window's `ZCOUNT`: the events after `now - window`, a window
/// longer than the horizon counting the horizon (as the local store), so events past it
/// that no trim removed yet ([`TRIM_EVERY`]) are never counted.
fn window_from(now_ms: u64, window_ms: u64, horizon_ms: u64) -> String {
    let window_ms = window_ms.min(horizon_ms);
    if now_ms >= window_ms {
        format!("({}", now_ms - window_ms)
    } else {
        "-inf".to_string()
    }
}

/// The name of a session or event key (`client.ip=192.0.2.1`: `client.ip`).
fn key_name(k: &str) -> &str {
    k.split_once('=').map(|(n, _)| n).unwrap_or("value")
}

/// The counts a recorded event answered in its round trip (`StateStore::record`), for the
/// session to answer the same stage's `rate` and `concurrent` requests from.
#[derive(Debug, Default)]
pub struct Counted {
    /// (counter, key, window) -> events in the window, this one included.
    rates: HashMap<(String, String, u64), u64>,
    /// key -> live leases of every host.
    concurrent: HashMap<String, u64>,
}

impl Counted {
    /// The answer to `req` if the last event of this stage already counted it (taken:
    /// each is used once).
    pub fn take(&mut self, req: &crate::eval::Request) -> Option<u64> {
        match req {
            crate::eval::Request::Rate { counter, key, window_ms } => {
                self.rates.remove(&(counter.name().to_string(), key.clone(), *window_ms))
            }
            crate::eval::Request::Concurrent { key } => self.concurrent.remove(key),
            _ => None,
        }
    }

    /// Counts of a new event replace those of the last.
    pub fn absorb(&mut self, newer: Counted) {
        self.rates.extend(newer.rates);
        self.concurrent.extend(newer.concurrent);
    }

    /// A stage ended: what it counted is not the next stage's.
    pub fn clear(&mut self) {
        self.rates.clear();
        self.concurrent.clear();
    }
}

/// What state the policy reads: the windows of its `rate` values and the keys of its
/// `concurrent` values, found in its IR wherever they are (every stage, every condition).
#[allow(clippy::type_complexity)]
fn reads(prog: &Program) -> (HashMap<(String, String), Vec<u64>>, std::collections::HashSet<String>) {
    use mailpolicy_lang::ir::{Counter, Val};
    type Windows = HashMap<(String, String), Vec<u64>>;
    fn name(key: Option<&serde_json::Value>) -> String {
        match key.and_then(|k| serde_json::from_value::<Val>(k.clone()).ok()) {
            Some(Val::Fact(f)) => f.info().name.to_string(),
            _ => "value".to_string(),
        }
    }
    fn walk(v: &serde_json::Value, out: &mut Windows, conc: &mut std::collections::HashSet<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(r) = m.get("Rate") {
                    let counter = r.get("counter").and_then(|c| serde_json::from_value::<Counter>(c.clone()).ok());
                    if let Some(c) = counter {
                        let w = out.entry((c.name().to_string(), name(r.get("key")))).or_default();
                        if let Some(ms) = r.get("window_ms").and_then(|w| w.as_u64()) {
                            if !w.contains(&ms) {
                                w.push(ms);
                            }
                        }
                    }
                }
                if let Some(c) = m.get("Concurrent") {
                    conc.insert(name(c.get("key")));
                }
                m.values().for_each(|x| walk(x, out, conc));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out, conc)),
            _ => {}
        }
    }
    let (mut out, mut conc) = (HashMap::new(), std::collections::HashSet::new());
    if let Ok(v) = serde_json::to_value(prog) {
        walk(&v, &mut out, &mut conc);
    }
    (out, conc)
}

impl StateStore {
    /// The store the policy names: `state "local"` (the default) or `state "redis://..."`.
    /// `password` is the `state_password` secret's value: it replaces any in the URL.
    pub fn new(prog: &Program, hostname: &str, password: Option<&str>) -> Result<StateStore, String> {
        let server = &prog.server;
        let timeout = server.state_timeout.max(Duration::from_millis(1));
        let lease_ms = (server.state_lease.as_millis() as u64).max(1_000);
        let on_error = match server.state_on_error {
            mailpolicy_lang::settings::StateOnError::Local => OnError::Local,
            mailpolicy_lang::settings::StateOnError::Tempfail => OnError::Tempfail,
        };
        let redis = match server.state.as_str() {
            "" | "local" => None,
            url => {
                let mut info = redis::IntoConnectionInfo::into_connection_info(url)
                    .map_err(|e| format!("server state \"{url}\": {e}"))?;
                if let Some(p) = password {
                    let settings = info.redis_settings().clone().set_password(p);
                    info = info.set_redis_settings(settings);
                }
                let client = redis::Client::open(info).map_err(|e| format!("server state \"{url}\": {e}"))?;
                let log = crate::log::Logger {
                    format: match server.log_format {
                        mailpolicy_lang::settings::LogFormat::Json => crate::log::Format::Json,
                        mailpolicy_lang::settings::LogFormat::Text => crate::log::Format::Text,
                    },
                };
                let (_, concurrent_names) = reads(prog);
                Some(Arc::new(Redis {
                    client,
                    conn: OnceLock::new(),
                    prefix: server.state_prefix.clone(),
                    timeout,
                    lease_ms,
                    down_until: AtomicU64::new(0),
                    down: AtomicBool::new(false),
                    scripts: Scripts { stage: redis::Script::new(STAGE), greylist: redis::Script::new(GREYLIST) },
                    log,
                    round_trips: AtomicU64::new(0),
                    count_writes: AtomicU64::new(0),
                    concurrent_names,
                    publishing: AtomicBool::new(false),
                    retired: AtomicBool::new(false),
                }))
            }
        };
        let (read_windows, _) = reads(prog);
        Ok(StateStore { local: Arc::new(Local::new(hostname)), redis, on_error, read_windows })
    }

    /// Keep the local state of the store this one replaces (a reload): its windows, its
    /// open-session counts and this process's id in the shared store.
    pub fn adopt_local(&mut self, old: &StateStore) {
        self.local = old.local.clone();
    }

    /// Redis calls made, and how many of them published this host's `concurrent` counts.
    pub fn round_trips(&self) -> (u64, u64) {
        self.redis
            .as_ref()
            .map(|r| (r.round_trips.load(Ordering::Relaxed), r.count_writes.load(Ordering::Relaxed)))
            .unwrap_or((0, 0))
    }
}

impl Redis {
    /// The connection to use now, or why not (paused after a failure).
    fn conn(&self) -> Result<ConnectionManager, Fail> {
        if crate::now_ms() < self.down_until.load(Ordering::Relaxed) {
            return Err(Fail::Error("unavailable (retried shortly)".into()));
        }
        if let Some(c) = self.conn.get() {
            return Ok(c.clone());
        }
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(PAUSE_MS));
        let m = ConnectionManager::new_lazy_with_config(self.client.clone(), cfg)
            .map_err(|e| Fail::Error(e.to_string()))?;
        Ok(self.conn.get_or_init(|| m).clone())
    }

    /// One Redis round trip, bounded by the time-out; a failure pauses Redis.
    async fn bounded<T>(&self, fut: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, Fail> {
        let r = self;
        r.round_trips.fetch_add(1, Ordering::Relaxed);
        let out = match tokio::time::timeout(r.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Fail::Error(e.to_string())),
            Err(_) => Err(Fail::Timeout),
        };
        match &out {
            Ok(_) => {
                if r.down.swap(false, Ordering::Relaxed) {
                    r.log.event("state-up", &[("store", "redis")]);
                }
            }
            Err(f) => {
                r.down_until.store(crate::now_ms() + PAUSE_MS, Ordering::Relaxed);
                if !r.down.swap(true, Ordering::Relaxed) {
                    let why = match f {
                        Fail::Timeout => "timed out".to_string(),
                        Fail::Error(e) => e.clone(),
                    };
                    r.log.event("state-down", &[("store", "redis"), ("error", &why)]);
                }
            }
        }
        out
    }

    fn key(&self, kind: &str, parts: &[&str]) -> String {
        let mut k = format!("{}{kind}:", self.prefix);
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                k.push('\u{0}');
            }
            k.push_str(&p.to_ascii_lowercase());
        }
        k
    }

    /// The stage script's first eight ARGV ([`STAGE`]): an event at `now_ms` (member
    /// `member`; none for `rated` 0) and this host's field and the life of its counts.
    fn stage_args(
        &self,
        inv: &mut redis::ScriptInvocation<'_>,
        local: &Local,
        now_ms: u64,
        member: &str,
        rated: usize,
        horizon_ms: u64,
    ) {
        let trim = if rated > 0 && rand::random::<u32>() % TRIM_EVERY == 0 {
            format!("({}", now_ms.saturating_sub(horizon_ms))
        } else {
            String::new()
        };
        inv.arg(now_ms).arg(trim).arg(member).arg(RANK_BOUND).arg(rated);
        inv.arg(&local.id).arg(self.lease_ms).arg(horizon_ms);
    }
}

/// The task that publishes this host's `concurrent` counts (one per store that has Redis
/// and a policy reading `concurrent`, started by its first session): the keys whose count
/// changed (a burst at once, then one write per [`PUBLISH_GAP_MS`]), and every key with open sessions
/// every third of `state_lease`, so that a host that dies stops counting when they run
/// out. Counts are absolute and versioned: a write repeated or reordered is harmless, and
/// one that failed is retried (after [`PAUSE_MS`]).
async fn publish_counts(r: Arc<Redis>, local: Arc<Local>) {
    use tokio::time::{sleep_until, Instant};
    let every = Duration::from_millis((r.lease_ms / 3).max(300));
    let gap = Duration::from_millis(PUBLISH_GAP_MS);
    // A store taking over from another (a reload) publishes every open count first.
    let mut renew_at = Instant::now();
    // A token bucket: a write takes one, one comes back every gap, at most PUBLISH_BURST.
    let (mut tokens, mut filled) = (PUBLISH_BURST, Instant::now());
    loop {
        let renewing = tokio::select! {
            _ = local.conc_wake.notified() => false,
            _ = sleep_until(renew_at) => true,
        };
        if r.retired.load(Ordering::Relaxed) {
            // Its successor (same `Local`) takes what is left.
            local.conc_wake.notify_one();
            return;
        }
        let now = Instant::now();
        tokens = (tokens + now.duration_since(filled).as_secs_f64() / gap.as_secs_f64()).min(PUBLISH_BURST);
        filled = now;
        if tokens < 1.0 {
            sleep_until(now + gap.mul_f64(1.0 - tokens)).await;
            tokens = 1.0;
            filled = Instant::now();
        }
        let renewing = renewing || Instant::now() >= renew_at;
        let (keys, counts, version) = local.take_dirty(renewing.then_some(&r.concurrent_names));
        if renewing {
            renew_at = Instant::now() + every;
        }
        if keys.is_empty() {
            local.conc_published.send_if_modified(|p| std::mem::replace(p, (*p).max(version)) < version);
            continue;
        }
        tokens -= 1.0;
        let Ok(mut c) = r.conn() else {
            retry(&r, &local, keys, &mut renew_at);
            continue;
        };
        let mut inv = r.scripts.stage.prepare_invoke();
        for k in &keys {
            inv.key(r.key("conc", &[k]));
        }
        r.stage_args(&mut inv, &local, crate::now_ms(), "", 0, 0);
        for n in &counts {
            inv.arg(*n).arg(version);
        }
        r.count_writes.fetch_add(1, Ordering::Relaxed);
        if r.bounded(async move { inv.invoke_async::<Vec<u64>>(&mut c).await }).await.is_err() {
            retry(&r, &local, keys, &mut renew_at);
        } else {
            local.conc_published.send_if_modified(|p| std::mem::replace(p, (*p).max(version)) < version);
        }
    }
}

/// A publication that failed: its keys are dirty again, tried when Redis may be back.
fn retry(r: &Redis, local: &Local, keys: Vec<String>, renew_at: &mut tokio::time::Instant) {
    local.conc_dirty.lock().unwrap_or_else(|p| p.into_inner()).extend(keys);
    let wait = r.down_until.load(Ordering::Relaxed).saturating_sub(crate::now_ms()).max(PAUSE_MS / 10);
    *renew_at = (*renew_at).min(tokio::time::Instant::now() + Duration::from_millis(wait));
}

impl StateStore {
    /// A failed Redis answer: the configured behaviour.
    fn failed(&self, f: Fail, local: impl FnOnce() -> Answer) -> Answer {
        match self.on_error {
            OnError::Tempfail => f.answer(),
            OnError::Local => local(),
        }
    }

    // ---- rate windows --------------------------------------------------------------

    /// Events of `counter` for `key` in the window ending now.
    pub async fn rate(&self, counter: &str, key: &str, window_ms: u64, now_ms: u64) -> Answer {
        let local = || {
            self.local
                .rates
                .lock()
                .map(|r| Answer::Count(r.count(counter, key, window_ms, now_ms)))
                .unwrap_or_else(|_| Answer::Error("rate store poisoned".into()))
        };
        let Some(r) = &self.redis else { return local() };
        let k = r.key("rate", &[counter, key]);
        let q = match r.conn() {
            Ok(mut c) => {
                let mut cmd = redis::cmd("ZCOUNT");
                let horizon = self.local.rates.lock().map(|r| r.horizon_ms).unwrap_or(86_400_000);
                cmd.arg(&k).arg(window_from(now_ms, window_ms, horizon)).arg("+inf");
                r.bounded(async move { cmd.query_async::<u64>(&mut c).await }).await
            }
            Err(f) => Err(f),
        };
        match q {
            Ok(n) => Answer::Count(n.min(MAX_EVENTS)),
            Err(f) => self.failed(f, local),
        }
    }

    /// One event of `counter` for each of `keys` (recorded locally and in Redis). With
    /// Redis, the same round trip answers the counts this stage may ask next (the windows
    /// the policy reads for these keys, and the `concurrent` counts of the keys among
    /// them): the session answers its `rate`/`concurrent` requests from them.
    pub async fn record(&self, counter: &str, keys: &[String], now_ms: u64) -> Counted {
        if let Ok(mut r) = self.local.rates.lock() {
            keys.iter().for_each(|k| r.record(counter, k, now_ms));
        }
        let mut counted = Counted::default();
        let Some(r) = &self.redis else { return counted };
        // Only the windows the policy reads go to Redis: an event nobody counts costs no
        // round trip.
        let rated: Vec<(&String, &Vec<u64>)> = keys
            .iter()
            .filter_map(|k| self.read_windows.get(&(counter.to_string(), key_name(k).to_string())).map(|w| (k, w)))
            .collect();
        if rated.is_empty() {
            return counted;
        }
        let conc: Vec<&str> =
            keys.iter().map(String::as_str).filter(|k| r.concurrent_names.contains(key_name(k))).collect();
        let Ok(mut c) = r.conn() else { return counted };
        let horizon = self.local.rates.lock().map(|r| r.horizon_ms).unwrap_or(86_400_000);
        // Unique in the cluster: this process's random tag and its count of events.
        let member = format!("{:x}.{}", self.local.seq.fetch_add(1, Ordering::Relaxed), self.local.tag);
        let mut inv = r.scripts.stage.prepare_invoke();
        for (k, _) in &rated {
            inv.key(r.key("rate", &[counter, k]));
        }
        for k in &conc {
            inv.key(r.key("conc", &[k]));
        }
        r.stage_args(&mut inv, &self.local, now_ms, &member, rated.len(), horizon);
        for (_, windows) in &rated {
            inv.arg(windows.len());
            for w in windows.iter() {
                inv.arg(window_from(now_ms, *w, horizon));
            }
        }
        let (open, version) = self.local.open_counts(&conc);
        for n in open {
            inv.arg(n).arg(version);
        }
        let Ok(counts) = r.bounded(async move { inv.invoke_async::<Vec<u64>>(&mut c).await }).await else {
            return counted;
        };
        let mut counts = counts.into_iter();
        for (k, windows) in rated {
            for w in windows {
                if let Some(n) = counts.next() {
                    // Capped as the set is by its trim (see TRIM_EVERY).
                    counted.rates.insert((counter.to_string(), k.clone(), *w), n.min(MAX_EVENTS));
                }
            }
        }
        for k in conc {
            if let Some(n) = counts.next() {
                counted.concurrent.insert(k.to_string(), n);
            }
        }
        counted
    }

    // ---- concurrent counts ---------------------------------------------------------

    /// [`StateStore::rate`] when it needs no await: the in-memory store alone (no Redis).
    pub fn rate_now(&self, counter: &str, key: &str, window_ms: u64, now_ms: u64) -> Option<Answer> {
        if self.redis.is_some() {
            return None;
        }
        Some(
            self.local
                .rates
                .lock()
                .map(|r| Answer::Count(r.count(counter, key, window_ms, now_ms)))
                .unwrap_or_else(|_| Answer::Error("rate store poisoned".into())),
        )
    }

    /// Sessions counted under `key` now: this host's, and with Redis every host's live
    /// count (this host's own written in the same script, so hosts racing on one key
    /// each see the other).
    pub async fn concurrent(&self, key: &str) -> Answer {
        let local = || {
            self.local
                .rates
                .lock()
                .map(|r| Answer::Count(r.concurrent(key)))
                .unwrap_or_else(|_| Answer::Error("rate store poisoned".into()))
        };
        let Some(r) = &self.redis else { return local() };
        let q = match r.conn() {
            Ok(mut c) => {
                let mut inv = r.scripts.stage.prepare_invoke();
                inv.key(r.key("conc", &[key]));
                r.stage_args(&mut inv, &self.local, crate::now_ms(), "", 0, 0);
                let (open, version) = self.local.open_counts(&[key]);
                inv.arg(open.first().copied().unwrap_or(0)).arg(version);
                r.bounded(async move { inv.invoke_async::<Vec<u64>>(&mut c).await }).await
            }
            Err(f) => Err(f),
        };
        match q {
            Ok(n) => Answer::Count(n.first().copied().unwrap_or(0)),
            Err(f) => self.failed(f, local),
        }
    }

    /// A session starts (`open`) or ends: this host's counts of `keys` change at once, and
    /// the shared ones are left to the publisher (no round trip of the session's own).
    /// Synchronous: the end runs in a drop guard. The version of the change when the
    /// publisher is to write it ([`StateStore::published`] awaits it).
    pub fn session(&self, keys: &[String], open: bool) -> Option<u64> {
        let shared = self.redis.as_ref().filter(|r| !r.concurrent_names.is_empty());
        let version = {
            let mut rates = self.local.rates.lock().unwrap_or_else(|p| p.into_inner());
            for k in keys {
                if open {
                    rates.open(k);
                } else {
                    rates.close(k);
                }
            }
            if let Some(r) = shared {
                let mut dirty = self.local.conc_dirty.lock().unwrap_or_else(|p| p.into_inner());
                dirty.extend(keys.iter().filter(|k| r.concurrent_names.contains(key_name(k))).cloned());
            }
            self.local.conc_version.fetch_add(1, Ordering::Relaxed) + 1
        };
        let r = shared?;
        if !r.publishing.swap(true, Ordering::Relaxed) {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(publish_counts(r.clone(), self.local.clone()));
                }
                Err(_) => r.publishing.store(false, Ordering::Relaxed),
            }
        }
        self.local.conc_wake.notify_one();
        keys.iter().any(|k| r.concurrent_names.contains(key_name(k))).then_some(version)
    }

    /// This host's counts as of `version` are on Redis (the publisher wrote them), or
    /// `state_timeout` has passed, or Redis is known down (its counts expire with their
    /// lease and are written again when it is back).
    pub async fn published(&self, version: u64) {
        let Some(r) = self.redis.as_ref().filter(|r| !r.down.load(Ordering::Relaxed)) else { return };
        let mut seen = self.local.conc_published.subscribe();
        let _ = tokio::time::timeout(r.timeout, seen.wait_for(|p| *p >= version)).await;
    }

    // ---- greylist ------------------------------------------------------------------

    /// True when the triplet must wait.
    pub async fn greylist(
        &self,
        client: &str,
        sender: &str,
        recipient: &str,
        now_ms: u64,
        delay_ms: u64,
        expire_ms: u64,
    ) -> Answer {
        let local = || {
            self.local
                .greylist
                .lock()
                .map(|mut g| Answer::Bool(g.check(client, sender, recipient, now_ms, delay_ms, expire_ms)))
                .unwrap_or_else(|_| Answer::Error("greylist poisoned".into()))
        };
        let Some(r) = &self.redis else { return local() };
        let q = match r.conn() {
            Ok(mut c) => {
                let mut inv = r.scripts.greylist.prepare_invoke();
                inv.key(r.key("grey", &[client, sender, recipient]));
                inv.arg(now_ms).arg(delay_ms).arg(expire_ms.max(1));
                r.bounded(async move { inv.invoke_async::<i64>(&mut c).await }).await
            }
            Err(f) => Err(f),
        };
        match q {
            Ok(wait) => {
                // This host's own record follows, for the time Redis may be away.
                let _ = local();
                Answer::Bool(wait == 1)
            }
            Err(f) => self.failed(f, local),
        }
    }

    // ---- call-ahead answers --------------------------------------------------------

    /// A remembered call-ahead answer for the recipient. A store failure is "none
    /// remembered": the call-ahead is made again, which is always correct.
    pub async fn callahead_get(&self, recipient: &str, now_ms: u64) -> Option<(u16, String)> {
        let key = recipient.to_ascii_lowercase();
        if let Some(r) = &self.redis {
            if let Ok(mut c) = r.conn() {
                let k = r.key("callahead", &[&key]);
                let got = r.bounded(async move { c.send_packed_command(redis::cmd("GET").arg(k)).await }).await;
                if let Ok(v) = got {
                    if let Ok(Some(s)) = redis::from_redis_value::<Option<String>>(v) {
                        let (code, text) = s.split_once(' ').unwrap_or((s.as_str(), ""));
                        if let Ok(code) = code.parse::<u16>() {
                            return Some((code, text.to_string()));
                        }
                    }
                    return None;
                }
            }
        }
        let cache = self.local.callaheads.lock().ok()?;
        let (code, text, until) = cache.get(&key)?;
        (*until > now_ms).then(|| (*code, text.clone()))
    }

    pub async fn callahead_put(&self, recipient: &str, code: u16, text: &str, now_ms: u64, ttl_ms: u64) {
        let key = recipient.to_ascii_lowercase();
        if let Ok(mut cache) = self.local.callaheads.lock() {
            if cache.len() > 100_000 {
                cache.retain(|_, v| v.2 > now_ms);
            }
            cache.insert(key.clone(), (code, text.to_string(), now_ms + ttl_ms));
        }
        let Some(r) = &self.redis else { return };
        let Ok(mut c) = r.conn() else { return };
        let mut cmd = redis::cmd("SET");
        cmd.arg(r.key("callahead", &[&key])).arg(format!("{code} {text}")).arg("PX").arg(ttl_ms.max(1));
        let _ = r.bounded(async move { cmd.query_async::<()>(&mut c).await }).await;
    }

    // ---- alert windows -------------------------------------------------------------

    /// Whether this host sends the alert now: the first in its window across the cluster.
    /// With Redis away the local window decides (an alert twice rather than never).
    pub async fn alert_claim(&self, to: &str, text: &str, every_ms: u64, now_ms: u64) -> bool {
        let local = || {
            let Ok(mut sent) = self.local.alerts.lock() else { return false };
            let key = (to.to_ascii_lowercase(), text.to_string());
            if sent.get(&key).is_some_and(|t| now_ms.saturating_sub(*t) < every_ms) {
                return false;
            }
            if sent.len() > 10_000 {
                sent.retain(|_, t| now_ms.saturating_sub(*t) < 86_400_000);
            }
            sent.insert(key, now_ms);
            true
        };
        let Some(r) = &self.redis else { return local() };
        let q = match r.conn() {
            Ok(mut c) => {
                let mut cmd = redis::cmd("SET");
                cmd.arg(r.key("alert", &[to, text])).arg(now_ms).arg("NX").arg("PX").arg(every_ms.max(1));
                r.bounded(async move { cmd.query_async::<Option<String>>(&mut c).await }).await
            }
            Err(f) => Err(f),
        };
        match q {
            Ok(v) => {
                let first = v.is_some();
                if first {
                    // Keep the local window too, for the time Redis may be away.
                    if let Ok(mut sent) = self.local.alerts.lock() {
                        sent.insert((to.to_ascii_lowercase(), text.to_string()), now_ms);
                    }
                }
                first
            }
            Err(_) => local(),
        }
    }

    // ---- shadow copies (backup.rs) ---------------------------------------------------

    fn shared_conn(&self) -> Result<(&Redis, ConnectionManager), Fail> {
        let r = self.redis.as_ref().ok_or_else(|| Fail::Error("no shared state store".into()))?;
        Ok((r, r.conn()?))
    }

    /// This host is alive: its heartbeat key, for `ttl_ms`.
    pub async fn heartbeat(&self, origin: &str, ttl_ms: u64) -> Result<(), String> {
        let (r, mut c) = self.shared_conn().map_err(|f| format!("{f:?}"))?;
        let mut cmd = redis::cmd("SET");
        cmd.arg(r.key("alive", &[origin])).arg(crate::now_ms()).arg("PX").arg(ttl_ms.max(1));
        r.bounded(async move { cmd.query_async::<()>(&mut c).await }).await.map_err(|f| format!("{f:?}"))
    }

    /// The messages `ids` of this host are final (`what` "1": their copies may go) or
    /// unusable here (`what` "lost": their copies are to be delivered now), one pipeline.
    pub async fn confirm(&self, origin: &str, ids: &[String], what: &str, ttl_ms: u64) -> Result<(), String> {
        let (r, mut c) = self.shared_conn().map_err(|f| format!("{f:?}"))?;
        let mut p = redis::pipe();
        for id in ids {
            p.cmd("SET").arg(r.key("done", &[origin, id])).arg(what).arg("PX").arg(ttl_ms.max(1)).ignore();
        }
        r.bounded(async move { p.query_async::<()>(&mut c).await }).await.map_err(|f| format!("{f:?}"))
    }

    /// Whether `origin`'s heartbeat is there, and what it said of each of `ids` (none yet,
    /// or [`StateStore::confirm`]'s word), one pipeline.
    pub async fn shadow_status(&self, origin: &str, ids: &[String]) -> Result<(bool, Vec<Option<String>>), String> {
        let (r, mut c) = self.shared_conn().map_err(|f| format!("{f:?}"))?;
        let mut p = redis::pipe();
        p.cmd("EXISTS").arg(r.key("alive", &[origin]));
        let mut get = redis::cmd("MGET");
        for id in ids {
            get.arg(r.key("done", &[origin, id]));
        }
        if !ids.is_empty() {
            p.add_command(get);
        }
        let (alive, said): (u64, Vec<Option<String>>) = if ids.is_empty() {
            let v: (u64,) =
                r.bounded(async move { p.query_async(&mut c).await }).await.map_err(|f| format!("{f:?}"))?;
            (v.0, Vec::new())
        } else {
            r.bounded(async move { p.query_async(&mut c).await }).await.map_err(|f| format!("{f:?}"))?
        };
        let said = (0..ids.len()).map(|i| said.get(i).cloned().flatten()).collect();
        Ok((alive > 0, said))
    }

    /// The confirmations of `ids`, seen and acted on: gone.
    pub async fn forget_confirmed(&self, origin: &str, ids: &[String]) {
        let Ok((r, mut c)) = self.shared_conn() else { return };
        let mut p = redis::pipe();
        for id in ids {
            p.cmd("DEL").arg(r.key("done", &[origin, id])).ignore();
        }
        let _ = r.bounded(async move { p.query_async::<()>(&mut c).await }).await;
    }
}

#[cfg(test)]
mod tests {
    //! The shared store against a real `redis-server` (Debian's redis-server, which
    //! tests/run.sh installs), started on a port and in a directory of its own: two stores
    //! stand for two hosts of a cluster.
    use super::*;
    use mailpolicy_test_support::{free_port, listening, need, Peer, TempDir};

    const REDIS: &str = "/usr/bin/redis-server";

    fn redis(dir: &TempDir, port: u16) -> Peer {
        need(REDIS, "redis-server");
        let child = std::process::Command::new(REDIS)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server");
        let peer = Peer(child);
        for _ in 0..200 {
            if listening(port) {
                return peer;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server did not listen on {port}");
    }

    fn store(host: &str, port: u16, extra: &str) -> StateStore {
        let rules =
            "if rate messages by client.ip per 1h > 3 { tempfail; } if concurrent by client.ip > 100 { tempfail; }";
        store_with(host, port, extra, rules)
    }

    fn store_with(host: &str, port: u16, extra: &str, rules: &str) -> StateStore {
        let policy = format!(
            "require [\"ratelimit\"];\nserver {{ state \"redis://127.0.0.1:{port}/0\"; state_timeout 300ms; {extra} }}\n\
             on mail {{ {rules} }}\n"
        );
        let c = mailpolicy_lang::compile("p.mailpolicy", &mailpolicy_lang::MemLoader::single("p.mailpolicy", &policy));
        StateStore::new(&c.program.expect("compiles"), host, None).expect("store")
    }

    /// Polls the other host's count until it is `want` (the publisher writes within
    /// milliseconds; the bound only keeps a broken store from hanging the test).
    async fn count_becomes(s: &StateStore, key: &str, want: u64) {
        let mut last = Answer::Count(u64::MAX);
        for _ in 0..250 {
            last = s.concurrent(key).await;
            if last == Answer::Count(want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("concurrent({key}) stays {last:?}, not {want}");
    }

    const IP: &str = "client.ip=192.0.2.1";

    /// Sessions opened on one host count on the other without a round trip of their own;
    /// a count written late with an older version never replaces a newer one; a host that
    /// stops publishing (it died) stops counting when its lease runs out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hosts_publish_their_counts_versioned_and_leased() {
        let dir = TempDir::new("state-conc");
        let port = free_port();
        let _redis = redis(&dir, port);
        let a = store("mx-a", port, "state_lease 1s;");
        let b = store("mx-b", port, "state_lease 1s;");
        let keys = vec![IP.to_string(), "client.network=192.0.2.0/24".to_string()];
        a.session(&keys, true);
        a.session(&keys, true);
        b.session(&keys, true);
        count_becomes(&b, IP, 3).await;
        a.session(&keys, false);
        count_becomes(&b, IP, 2).await;
        // Only the keys the policy reads are published: `client.network` is not.
        count_becomes(&b, "client.network=192.0.2.0/24", 1).await;

        // An older write of A's (version 0) arriving late: A's newer count stands.
        let r = a.redis.as_ref().expect("redis");
        let mut c = r.conn().expect("conn");
        let mut inv = r.scripts.stage.prepare_invoke();
        inv.key(r.key("conc", &[IP]));
        r.stage_args(&mut inv, &a.local, 0, "", 0, 0);
        inv.arg(10).arg(0);
        let sum: Vec<u64> = inv.invoke_async(&mut c).await.expect("script");
        assert_eq!(sum, vec![2], "the stale count of 10 is not written");
        assert_eq!(b.concurrent(IP).await, Answer::Count(2));

        // A dies with its session open: nothing renews its count, which runs out.
        drop(a);
        count_becomes(&b, IP, 1).await;
        b.session(&keys, false);
        count_becomes(&b, IP, 0).await;
        let (trips, writes) = b.round_trips();
        assert!(writes >= 2 && trips > writes, "{trips} round trips, {writes} of them count writes");
    }

    /// Events recorded on two hosts in one window: each answer counts every event before
    /// it on either host, itself included (the stage's one script is atomic), and the
    /// `concurrent` count comes in the same round trip.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_script_per_stage_counts_the_events_of_both_hosts() {
        let dir = TempDir::new("state-rate");
        let port = free_port();
        let _redis = redis(&dir, port);
        let (a, b) = (Arc::new(store("mx-a", port, "")), Arc::new(store("mx-b", port, "")));
        let keys = vec![IP.to_string()];
        a.session(&keys, true);
        let now = crate::now_ms();
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let (s, keys) = (if i % 2 == 0 { a.clone() } else { b.clone() }, keys.clone());
                tokio::spawn(async move { s.record("messages", &keys, now).await })
            })
            .collect();
        let mut seen = Vec::new();
        for t in tasks {
            let mut counted = t.await.expect("task");
            let req = crate::eval::Request::Rate {
                counter: mailpolicy_lang::ir::Counter::Messages,
                key: IP.to_string(),
                window_ms: 3_600_000,
            };
            seen.push(counted.take(&req).expect("the window's count came with the event"));
            let conc = counted.take(&crate::eval::Request::Concurrent { key: IP.to_string() });
            assert!(conc.is_some(), "the concurrent count came in the same round trip");
        }
        seen.sort_unstable();
        assert_eq!(seen, (1..=20).collect::<Vec<u64>>(), "each event saw all the earlier ones, on both hosts");
        assert_eq!(a.round_trips().0 + b.round_trips().0 - a.round_trips().1 - b.round_trips().1, 20);
    }

    /// The shared windows answer as the local store does, for windows inside the day kept
    /// and past it, whether or not an event's script trimmed the set (one in
    /// TRIM_EVERY does, at random): by the stage's script and by a lone `ZCOUNT`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn windows_answer_as_the_local_store_whether_trimmed_or_not() {
        let dir = TempDir::new("state-trim");
        let port = free_port();
        let _redis = redis(&dir, port);
        let rules = "if rate messages by client.ip per 90m > 1000 { tempfail; } if rate messages by client.ip per 2d > 1000 { tempfail; }";
        let s = store_with("mx-a", port, "", rules);
        let keys = vec![IP.to_string()];
        let (hour, windows) = (3_600_000u64, [5_400_000u64, 172_800_000]);
        let start = 20 * 86_400_000u64;
        // 400 events over 40 hours, so that the day kept is passed; then counts a day later.
        let n = 400u64;
        for i in 0..n {
            let now = start + i * hour / 10;
            let mut counted = s.record("messages", &keys, now).await;
            for w in windows {
                let local = s.local.rates.lock().map(|r| r.count("messages", IP, w, now)).unwrap_or(u64::MAX);
                let req = crate::eval::Request::Rate {
                    counter: mailpolicy_lang::ir::Counter::Messages,
                    key: IP.to_string(),
                    window_ms: w,
                };
                assert_eq!(counted.take(&req), Some(local), "event {i}, window {w}: the script's count");
                assert_eq!(s.rate("messages", IP, w, now).await, Answer::Count(local), "event {i}, window {w}: ZCOUNT");
            }
        }
        // Some script trimmed the set (none of 400 draws of one in 16 did: 1 in 10^11),
        // and not below the day kept.
        let r = s.redis.as_ref().expect("redis");
        let mut c = r.conn().expect("conn");
        let mut card = redis::cmd("ZCARD");
        card.arg(r.key("rate", &["messages", IP]));
        let kept: u64 = card.query_async(&mut c).await.expect("ZCARD");
        let last = start + (n - 1) * hour / 10;
        let day = s.local.rates.lock().map(|r| r.count("messages", IP, 86_400_000, last)).unwrap_or(0);
        assert!(kept < n && kept >= day, "{kept} events kept of {n}, {day} in the last day");
        assert_eq!(RANK_BOUND, format!("-{}", MAX_EVENTS + 1));
        let later = start + 80 * hour;
        for w in windows {
            let local = s.local.rates.lock().map(|r| r.count("messages", IP, w, later)).unwrap_or(u64::MAX);
            assert_eq!(s.rate("messages", IP, w, later).await, Answer::Count(local), "window {w}, later");
        }
    }

    /// Redis down: the publisher's write fails and is retried; when Redis is back (empty:
    /// no persistence) the open sessions are counted again without any new session.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_written_while_redis_is_down_are_retried() {
        let dir = TempDir::new("state-down");
        let port = free_port();
        let redis1 = redis(&dir, port);
        let (a, b) = (store("mx-a", port, ""), store("mx-b", port, ""));
        let keys = vec![IP.to_string()];
        a.session(&keys, true);
        count_becomes(&b, IP, 1).await;
        drop(redis1);
        a.session(&keys, true);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(matches!(b.concurrent(IP).await, Answer::Error(_) | Answer::Timeout), "state_on_error tempfail");
        let _redis2 = redis(&dir, port);
        count_becomes(&b, IP, 2).await;
    }
}
