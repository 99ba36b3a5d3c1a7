//! The session cache: idle sessions by [`SessionKey`] (transport, destination, TLS
//! parameters, login), reused under `connection_cache_time_limit` and
//! `connection_reuse_*_limit`.

use super::*;

/// What a cached session may be reused for: the same transport to the same destination
/// under the same TLS requirements and login. A session is never handed to a delivery
/// whose key differs in any field (a session verified against one `:ca`, or opened under a
/// weaker TLS policy, does not serve a route that asks for another).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey {
    /// `smtp` or `lmtp`.
    pub kind: &'static str,
    /// The destination as routed (`[host]:port`, `host`, a socket path).
    pub destination: String,
    /// The delivery target's TLS parameters.
    pub tls: TlsKey,
    /// The AUTH login, if any.
    pub auth_user: Option<String>,
}

/// The TLS parameters of a delivery target, as far as they decide whether a session may be
/// reused (part of [`SessionKey`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TlsKey {
    pub policy: TlsPolicy,
    pub implicit: bool,
    /// A digest of the trust roots (`:ca`, `tls_ca`); None: the system's.
    pub roots: Option<u64>,
    /// The client certificate file.
    pub client_cert: Option<String>,
    /// What the route asks for beyond the fixed policy (`:tls dane`, `:tls sts`).
    pub standards: Standards,
}

impl SessionKey {
    /// The key of a delivery with `opts` over `kind` to `destination`.
    pub fn new(kind: &'static str, destination: String, opts: &DeliveryOptions) -> SessionKey {
        use std::hash::{Hash, Hasher};
        let roots = opts.tls_roots.as_ref().map(|r| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            for a in &r.roots {
                a.subject.as_ref().hash(&mut h);
                a.subject_public_key_info.as_ref().hash(&mut h);
            }
            h.finish()
        });
        SessionKey {
            kind,
            destination,
            tls: TlsKey {
                policy: opts.tls,
                implicit: opts.implicit_tls,
                roots,
                client_cert: opts.client_cert.as_ref().map(|c| c.path.clone()),
                standards: opts.standards,
            },
            auth_user: opts.auth.as_ref().map(|a| a.user.clone()),
        }
    }
}

/// Idle sessions by [`SessionKey`], for reuse by the next delivery to the same destination
/// (Postfix's connection cache: several messages per session, RSET between them).
pub struct ConnectionCache {
    idle: Mutex<HashMap<SessionKey, Vec<(Instant, Connection)>>>,
    /// How long an idle session is kept (`connection_cache_time_limit`; Postfix keeps 2s;
    /// default 5s); zero: no session is kept.
    pub max_idle: Duration,
    /// Most idle sessions per destination.
    pub max_per_key: usize,
    /// Most messages over one session, then it is closed; 0: no limit
    /// (`connection_reuse_count_limit`).
    pub max_uses: u64,
    /// A session opened longer ago than this is closed, not reused (`connection_reuse_time_limit`).
    pub max_age: Duration,
    /// Sessions taken from the cache (reuses), for tests and logs.
    reused: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for ConnectionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionCache")
            .field("max_idle", &self.max_idle)
            .field("max_uses", &self.max_uses)
            .field("max_age", &self.max_age)
            .field("idle", &self.len())
            .finish()
    }
}

impl Default for ConnectionCache {
    fn default() -> Self {
        ConnectionCache::new(Duration::from_secs(5))
    }
}

impl ConnectionCache {
    /// An empty cache keeping sessions for `max_idle`.
    pub fn new(max_idle: Duration) -> ConnectionCache {
        ConnectionCache {
            idle: Mutex::new(HashMap::new()),
            max_idle,
            max_per_key: 4,
            max_uses: 0,
            max_age: Duration::from_secs(300),
            reused: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many times a cached session was taken for another message or question.
    pub fn reused(&self) -> u64 {
        self.reused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a session that has just finished a message may wait for another.
    fn keeps(&self, c: &Connection) -> bool {
        !self.max_idle.is_zero() && (self.max_uses == 0 || c.uses < self.max_uses) && c.opened.elapsed() < self.max_age
    }

    /// Number of idle sessions held.
    pub fn len(&self) -> usize {
        self.idle.lock().map(|m| m.values().map(Vec::len).sum()).unwrap_or(0)
    }

    /// True when no session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn take(&self, key: &SessionKey) -> Option<Connection> {
        let mut m = self.idle.lock().ok()?;
        let v = m.get_mut(key)?;
        let now = Instant::now();
        while let Some((t, c)) = v.pop() {
            if now.duration_since(t) <= self.max_idle && c.opened.elapsed() < self.max_age {
                self.reused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Some(c);
            }
            // expired: dropped (the server will see the connection close)
        }
        None
    }

    pub(super) fn put(&self, key: SessionKey, c: Connection) -> Option<Connection> {
        if !self.keeps(&c) {
            return Some(c);
        }
        let Ok(mut m) = self.idle.lock() else {
            return Some(c);
        };
        let v = m.entry(key).or_default();
        if v.len() >= self.max_per_key {
            return Some(c);
        }
        v.push((Instant::now(), c));
        None
    }

    /// QUITs and drops every idle session.
    pub async fn close_all(&self, t: &Timeouts) {
        let all: Vec<Connection> = match self.idle.lock() {
            Ok(mut m) => m.drain().flat_map(|(_, v)| v).map(|(_, c)| c).collect(),
            Err(_) => Vec::new(),
        };
        for c in all {
            c.close(t).await;
        }
    }
}
