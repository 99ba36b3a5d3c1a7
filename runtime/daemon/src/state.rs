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

use std::collections::HashMap;
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
const MAX_EVENTS: usize = 100_000;

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
    record: redis::Script,
    lease: redis::Script,
    leases: redis::Script,
    greylist: redis::Script,
}

/// Record one event in the first ARGV[5] keys (trimmed to the horizon and the cap), and
/// answer, in the same round trip, the counts the stage may ask next: for each of those
/// keys the events in each of its windows (ARGV: `nwin, w1 .. wn` per key), and for the
/// remaining keys (`concurrent` lease sets) the live leases, on Redis's clock.
const RECORD: &str = r"
local now, horizon, max, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4]), tonumber(ARGV[5])
local out, a = {}, 6
for i = 1, n do
  local k = KEYS[i]
  redis.call('ZREMRANGEBYSCORE', k, '-inf', '(' .. (now - horizon))
  redis.call('ZADD', k, now, ARGV[3])
  local c = redis.call('ZCARD', k)
  if c > max then redis.call('ZREMRANGEBYRANK', k, 0, c - max - 1) end
  redis.call('PEXPIRE', k, horizon)
  local nw = tonumber(ARGV[a]); a = a + 1
  for _ = 1, nw do
    local w = tonumber(ARGV[a]); a = a + 1
    local from = '-inf'
    if now >= w then from = '(' .. (now - w) end
    out[#out + 1] = redis.call('ZCOUNT', k, from, '+inf')
  end
end
if #KEYS > n then
  local t = redis.call('TIME')
  local tnow = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  for i = n + 1, #KEYS do
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', tnow)
    out[#out + 1] = redis.call('ZCARD', KEYS[i])
  end
end
return out
";

/// Take (or renew) lease ARGV[1] for ARGV[2] ms in every key, on Redis's clock.
const LEASE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
for _, k in ipairs(KEYS) do
  redis.call('ZADD', k, now + ttl, ARGV[1])
  redis.call('PEXPIRE', k, ttl)
end
return now
";

/// The live leases of KEYS[1]: the expired ones (a crashed host's) are dropped first.
const LEASES: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
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
    /// This process among the cluster's: lease and event ids.
    host_id: String,
    seq: AtomicU64,
    /// Redis is not asked before this (ms since the epoch) after a failure.
    down_until: AtomicU64,
    down: AtomicBool,
    scripts: Scripts,
    log: crate::log::Logger,
}

/// The daemon's state store (one per policy load; the local part carries over a reload).
pub struct StateStore {
    pub local: Arc<Local>,
    redis: Option<Redis>,
    on_error: OnError,
    timeout: Duration,
    lease_ms: u64,
    /// Redis commands sent (one round trip each; the benchmark reads it).
    round_trips: AtomicU64,
    /// The (counter, key name) windows the policy reads (`rate messages by client.ip per
    /// 1h`: ("messages", "client.ip") -> [3600000]): only these are kept in Redis (the
    /// local store keeps all), and recording an event answers their counts at once.
    read_windows: HashMap<(String, String), Vec<u64>>,
    /// The key names of the `concurrent` counts the policy reads (`client.ip`); none: no
    /// lease is taken.
    concurrent_names: std::collections::HashSet<String>,
    reads_concurrent: bool,
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
                Some(Redis {
                    client,
                    conn: OnceLock::new(),
                    prefix: server.state_prefix.clone(),
                    host_id: format!("{hostname}/{}/{:016x}", std::process::id(), rand::random::<u64>()),
                    seq: AtomicU64::new(0),
                    down_until: AtomicU64::new(0),
                    down: AtomicBool::new(false),
                    scripts: Scripts {
                        record: redis::Script::new(RECORD),
                        lease: redis::Script::new(LEASE),
                        leases: redis::Script::new(LEASES),
                        greylist: redis::Script::new(GREYLIST),
                    },
                    log,
                })
            }
        };
        let (read_windows, concurrent_names) = reads(prog);
        let reads_concurrent = !concurrent_names.is_empty();
        Ok(StateStore {
            local: Arc::default(),
            redis,
            on_error,
            timeout,
            lease_ms,
            round_trips: AtomicU64::new(0),
            read_windows,
            concurrent_names,
            reads_concurrent,
        })
    }

    /// Keep the local state of the store this one replaces (a reload).
    pub fn adopt_local(&mut self, old: &StateStore) {
        self.local = old.local.clone();
    }

    /// Whether sessions take leases in a shared store (it is shared and the policy reads
    /// `concurrent`).
    pub fn is_shared(&self) -> bool {
        self.redis.is_some() && self.reads_concurrent
    }

    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    pub fn lease_ms(&self) -> u64 {
        self.lease_ms
    }

    /// The connection to use now, or why not (paused after a failure).
    fn conn(&self, r: &Redis) -> Result<ConnectionManager, Fail> {
        if crate::now_ms() < r.down_until.load(Ordering::Relaxed) {
            return Err(Fail::Error("unavailable (retried shortly)".into()));
        }
        if let Some(c) = r.conn.get() {
            return Ok(c.clone());
        }
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(PAUSE_MS));
        let m =
            ConnectionManager::new_lazy_with_config(r.client.clone(), cfg).map_err(|e| Fail::Error(e.to_string()))?;
        Ok(r.conn.get_or_init(|| m).clone())
    }

    /// One Redis round trip, bounded by the time-out; a failure pauses Redis.
    async fn bounded<T>(
        &self,
        r: &Redis,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Fail> {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        let out = match tokio::time::timeout(self.timeout, fut).await {
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

    /// A failed Redis answer: the configured behaviour.
    fn failed(&self, f: Fail, local: impl FnOnce() -> Answer) -> Answer {
        match self.on_error {
            OnError::Tempfail => f.answer(),
            OnError::Local => local(),
        }
    }

    fn key(r: &Redis, kind: &str, parts: &[&str]) -> String {
        let mut k = format!("{}{kind}:", r.prefix);
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                k.push('\u{0}');
            }
            k.push_str(&p.to_ascii_lowercase());
        }
        k
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
        let k = Self::key(r, "rate", &[counter, key]);
        let q = match self.conn(r) {
            Ok(mut c) => {
                let mut cmd = redis::cmd("ZCOUNT");
                cmd.arg(&k);
                if now_ms < window_ms {
                    cmd.arg("-inf");
                } else {
                    cmd.arg(format!("({}", now_ms - window_ms));
                }
                cmd.arg("+inf");
                self.bounded(r, async move { cmd.query_async::<u64>(&mut c).await }).await
            }
            Err(f) => Err(f),
        };
        match q {
            Ok(n) => Answer::Count(n),
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
        let name = |k: &str| k.split_once('=').map(|(n, _)| n.to_string()).unwrap_or_else(|| "value".into());
        // Only the windows the policy reads go to Redis: an event nobody counts costs no
        // round trip.
        let rated: Vec<(&String, &Vec<u64>)> = keys
            .iter()
            .filter_map(|k| self.read_windows.get(&(counter.to_string(), name(k))).map(|w| (k, w)))
            .collect();
        if rated.is_empty() {
            return counted;
        }
        let conc: Vec<&String> = keys.iter().filter(|k| self.concurrent_names.contains(&name(k))).collect();
        let Ok(mut c) = self.conn(r) else { return counted };
        let horizon = self.local.rates.lock().map(|r| r.horizon_ms).unwrap_or(86_400_000);
        let member = format!("{now_ms}/{}/{}", r.host_id, r.seq.fetch_add(1, Ordering::Relaxed));
        let mut inv = r.scripts.record.prepare_invoke();
        for (k, _) in &rated {
            inv.key(Self::key(r, "rate", &[counter, k]));
        }
        for k in &conc {
            inv.key(Self::key(r, "conc", &[k]));
        }
        inv.arg(now_ms).arg(horizon).arg(member).arg(MAX_EVENTS).arg(rated.len());
        for (_, windows) in &rated {
            inv.arg(windows.len());
            for w in windows.iter() {
                inv.arg(*w);
            }
        }
        let Ok(counts) = self.bounded(r, async move { inv.invoke_async::<Vec<u64>>(&mut c).await }).await else {
            return counted;
        };
        let mut counts = counts.into_iter();
        for (k, windows) in rated {
            for w in windows {
                if let Some(n) = counts.next() {
                    counted.rates.insert((counter.to_string(), k.clone(), *w), n);
                }
            }
        }
        for k in conc {
            if let Some(n) = counts.next() {
                counted.concurrent.insert(k.clone(), n);
            }
        }
        counted
    }

    // ---- concurrent leases ---------------------------------------------------------

    /// Sessions counted under `key` now (this host's and, with Redis, every host's live leases).
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

    pub async fn concurrent(&self, key: &str) -> Answer {
        let local = || {
            self.local
                .rates
                .lock()
                .map(|r| Answer::Count(r.concurrent(key)))
                .unwrap_or_else(|_| Answer::Error("rate store poisoned".into()))
        };
        let Some(r) = &self.redis else { return local() };
        let q = match self.conn(r) {
            Ok(mut c) => {
                let mut inv = r.scripts.leases.prepare_invoke();
                inv.key(Self::key(r, "conc", &[key]));
                self.bounded(r, async move { inv.invoke_async::<u64>(&mut c).await }).await
            }
            Err(f) => Err(f),
        };
        match q {
            Ok(n) => Answer::Count(n),
            Err(f) => self.failed(f, local),
        }
    }

    /// A session starts: count it locally (its lease in Redis is taken with `renew`).
    pub fn open_local(&self, keys: &[String]) {
        if let Ok(mut r) = self.local.rates.lock() {
            keys.iter().for_each(|k| r.open(k));
        }
    }

    /// Take or renew a session's leases (the guard renews them every third of their life).
    pub async fn renew(&self, keys: &[String], lease: &str) {
        let Some(r) = self.redis.as_ref().filter(|_| self.reads_concurrent) else { return };
        let Ok(mut c) = self.conn(r) else { return };
        let mut inv = r.scripts.lease.prepare_invoke();
        for k in keys {
            inv.key(Self::key(r, "conc", &[k]));
        }
        inv.arg(format!("{}/{lease}", r.host_id)).arg(self.lease_ms);
        let _ = self.bounded(r, async move { inv.invoke_async::<i64>(&mut c).await }).await;
    }

    /// The local half of a session's end (synchronous: it runs in a drop guard).
    pub fn close_local(&self, keys: &[String]) {
        let mut r = self.local.rates.lock().unwrap_or_else(|p| p.into_inner());
        keys.iter().for_each(|k| r.close(k));
    }

    /// The Redis half of a session's end: its leases go (or expire if this never runs).
    pub async fn close_shared(&self, keys: &[String], lease: &str) {
        let Some(r) = self.redis.as_ref().filter(|_| self.reads_concurrent) else { return };
        let Ok(mut c) = self.conn(r) else { return };
        let mut p = redis::pipe();
        let member = format!("{}/{lease}", r.host_id);
        for k in keys {
            p.cmd("ZREM").arg(Self::key(r, "conc", &[k])).arg(&member).ignore();
        }
        let _ = self.bounded(r, async move { p.query_async::<()>(&mut c).await }).await;
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
        let q = match self.conn(r) {
            Ok(mut c) => {
                let mut inv = r.scripts.greylist.prepare_invoke();
                inv.key(Self::key(r, "grey", &[client, sender, recipient]));
                inv.arg(now_ms).arg(delay_ms).arg(expire_ms.max(1));
                self.bounded(r, async move { inv.invoke_async::<i64>(&mut c).await }).await
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
            if let Ok(mut c) = self.conn(r) {
                let k = Self::key(r, "callahead", &[&key]);
                let got = self.bounded(r, async move { c.send_packed_command(redis::cmd("GET").arg(k)).await }).await;
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
        let Ok(mut c) = self.conn(r) else { return };
        let mut cmd = redis::cmd("SET");
        cmd.arg(Self::key(r, "callahead", &[&key])).arg(format!("{code} {text}")).arg("PX").arg(ttl_ms.max(1));
        let _ = self.bounded(r, async move { cmd.query_async::<()>(&mut c).await }).await;
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
        let q = match self.conn(r) {
            Ok(mut c) => {
                let mut cmd = redis::cmd("SET");
                cmd.arg(Self::key(r, "alert", &[to, text])).arg(now_ms).arg("NX").arg("PX").arg(every_ms.max(1));
                self.bounded(r, async move { cmd.query_async::<Option<String>>(&mut c).await }).await
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
        Ok((r, self.conn(r)?))
    }

    /// This host is alive: its heartbeat key, for `ttl_ms`.
    pub async fn heartbeat(&self, origin: &str, ttl_ms: u64) -> Result<(), String> {
        let (r, mut c) = self.shared_conn().map_err(|f| format!("{f:?}"))?;
        let mut cmd = redis::cmd("SET");
        cmd.arg(Self::key(r, "alive", &[origin])).arg(crate::now_ms()).arg("PX").arg(ttl_ms.max(1));
        self.bounded(r, async move { cmd.query_async::<()>(&mut c).await }).await.map_err(|f| format!("{f:?}"))
    }

    /// The messages `ids` of this host are final: their copies may go (one pipeline).
    pub async fn confirm(&self, origin: &str, ids: &[String], ttl_ms: u64) -> Result<(), String> {
        let (r, mut c) = self.shared_conn().map_err(|f| format!("{f:?}"))?;
        let mut p = redis::pipe();
        for id in ids {
            p.cmd("SET").arg(Self::key(r, "done", &[origin, id])).arg(1).arg("PX").arg(ttl_ms.max(1)).ignore();
        }
        self.bounded(r, async move { p.query_async::<()>(&mut c).await }).await.map_err(|f| format!("{f:?}"))
    }

    /// Whether `origin`'s heartbeat is there, and which of `ids` it confirmed (one pipeline).
    pub async fn shadow_status(&self, origin: &str, ids: &[String]) -> Result<(bool, Vec<bool>), String> {
        let (r, mut c) = self.shared_conn().map_err(|f| format!("{f:?}"))?;
        let mut p = redis::pipe();
        p.cmd("EXISTS").arg(Self::key(r, "alive", &[origin]));
        for id in ids {
            p.cmd("EXISTS").arg(Self::key(r, "done", &[origin, id]));
        }
        let v: Vec<u64> =
            self.bounded(r, async move { p.query_async(&mut c).await }).await.map_err(|f| format!("{f:?}"))?;
        let alive = v.first().copied().unwrap_or(0) > 0;
        let done = (0..ids.len()).map(|i| v.get(i + 1).copied().unwrap_or(0) > 0).collect();
        Ok((alive, done))
    }

    /// The confirmations of `ids`, seen and acted on: gone.
    pub async fn forget_confirmed(&self, origin: &str, ids: &[String]) {
        let Ok((r, mut c)) = self.shared_conn() else { return };
        let mut p = redis::pipe();
        for id in ids {
            p.cmd("DEL").arg(Self::key(r, "done", &[origin, id])).ignore();
        }
        let _ = self.bounded(r, async move { p.query_async::<()>(&mut c).await }).await;
    }
}
