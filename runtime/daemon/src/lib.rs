//! `mailc serve`: the daemon. Listeners (SMTP, submission with STARTTLS, submissions with
//! implicit TLS) drive the sans-IO engine through [`crate::conn::Conn`]; messages are made
//! durable in the spool before the 250; the queue manager routes and delivers them.
//!
//! Signals: SIGTERM/SIGINT stop accepting, tell sessions to finish (421 to idle ones),
//! wait for them (at most `SHUTDOWN_GRACE`), then return. SIGHUP recompiles the policy: a
//! policy that fails `mailc check` is refused and logged, and the old one keeps running;
//! new sessions use the new one, and connections accepted after it their listener's new
//! settings (`Shared::swap_listeners`: certificates read again); sockets, queue and
//! backup settings need a restart (logged as `reload-partial`).

pub mod auth;
pub mod backup;
pub mod before_queue;
pub mod compiled;
pub mod control;
pub mod fault;
pub mod fuzzing;
pub mod ldap;
pub mod lists;
pub mod log;
pub mod lookup;
pub mod metrics;
pub mod milter;
pub mod notify;
pub mod pickup;
pub mod privileges;
pub mod proven;
pub mod qmgr;
pub mod route;
pub mod sasl;
pub mod scan;
pub mod session;
pub mod sql;
pub mod state;
pub mod tls;
pub mod web;

pub mod spool;
pub mod transport;

// The engine's modules under the names the daemon's modules use for them.
use mailpolicy_engine::{config, conn, date, eval, headers, paths, proxy, queue, record, routing, smtp};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use mailpolicy_lang::ir::{Program, Resource};
use mailpolicy_lang::settings::{ClientCerts, LogFormat, Protocol, Tls};
use mailpolicy_lang::{Compilation, FsLoader, MemLoader};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::conn::{QueuedMessage, QueuedRcpt};
use lookup::Lookups;

/// The policy `mailc serve` runs when given none.
pub const DEFAULT_POLICY: &str = include_str!("default.mailpolicy");
pub const DEFAULT_POLICY_NAME: &str = "<embedded default>";

/// How long sessions may take to finish after SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The machine's host name.
pub fn machine_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_ascii_lowercase())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Why a message could not be made durable.
#[derive(Debug)]
pub enum StoreFailure {
    /// No space: answered 452 4.3.1.
    Full,
    /// Anything else: answered 451 4.3.0.
    Io(String),
}

/// Durable storage of accepted messages (the spool). `store` returns only once the
/// message is on disk for good.
pub trait MessageStore: Send + Sync + 'static {
    fn store(&self, msg: &QueuedMessage) -> Result<String, StoreFailure> {
        self.store_with_tail(msg, None)
    }
    /// Store `msg`, whose last `msg.tail` bytes are in the file `tail`.
    fn store_with_tail(&self, msg: &QueuedMessage, tail: Option<&Path>) -> Result<String, StoreFailure>;
    /// A file for a session's spilled message bytes, on the store's file system.
    fn spill_path(&self, tag: &str) -> PathBuf;
    /// A queue id for a message not received yet (the milters' `i` macro), which
    /// [`MessageStore::store_as`] then stores under; `None` when the store makes ids only
    /// as it stores.
    fn reserve_id(&self) -> Option<String> {
        None
    }
    /// [`MessageStore::store_with_tail`] under the id [`MessageStore::reserve_id`] gave.
    fn store_as(&self, id: Option<&str>, msg: &QueuedMessage, tail: Option<&Path>) -> Result<String, StoreFailure> {
        let _ = id;
        self.store_with_tail(msg, tail)
    }
}

/// A listener as the sessions see it.
pub struct ListenerRt {
    pub name: String,
    pub address: SocketAddr,
    pub engine: smtp::Config,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub implicit_tls: bool,
    pub require_tls: bool,
    pub require_auth: bool,
    pub credentials: Option<Resource>,
    pub command_timeout: Duration,
    /// Idle time-out inside DATA/BDAT.
    pub data_timeout: Duration,
    pub sessions: Arc<Semaphore>,
    /// The listener's `max_sessions` (the size of `sessions`).
    pub max_sessions: usize,
    /// `proxy_protocol`: the load balancers' networks. Each connection must start with a
    /// PROXY header (v1 or v2), and only from them; `client.ip` is then the client it names.
    pub proxy: Option<Vec<mailpolicy_lang::ir::Cidr>>,
}

/// What every session shares.
pub struct Shared {
    prog: RwLock<Arc<Program>>,
    lookups: RwLock<Arc<Lookups>>,
    pub store: Arc<dyn MessageStore>,
    pub log: log::Logger,
    pub hostname: String,
    pub shutdown: watch::Receiver<bool>,
    queued: mpsc::UnboundedSender<String>,
    pub sessions: Arc<Semaphore>,
    /// The queue manager is running (its supervisor says so). While it is not, new mail
    /// is answered `451 4.3.0`: nothing is accepted that would go nowhere.
    qmgr_up: std::sync::atomic::AtomicBool,
    /// Free bytes of the spool's file system, measured twice a second (`u64::MAX`:
    /// unknown). Sessions refuse MAIL below `queue_minfree` plus SIZE.
    spool_free: Arc<std::sync::atomic::AtomicU64>,
    /// `max_sessions`: the size of `sessions`, to tell when most slots are taken.
    pub max_sessions: usize,
    /// Sessions per client address (`client_connection_limit`).
    per_client: Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    /// Addresses each login last authenticated from (at most 16 per login, 100,000
    /// logins): a login under attack stays open to them.
    auth_known: Mutex<std::collections::HashMap<String, Vec<(std::net::IpAddr, u64)>>>,
    /// One large message at a time is read back whole (DKIM, scanners): memory stays bounded.
    pub whole_message: Arc<Semaphore>,
    /// Shadow copies (`backup_peer`, `backup_listen`), set once privileges are dropped.
    pub backup: std::sync::OnceLock<Arc<backup::Backup>>,
    /// The listeners' settings by name, as the last good load made them: a connection
    /// takes the current ones when it is accepted (a reload swaps them in; a socket is
    /// bound once, at start).
    listeners: RwLock<std::collections::HashMap<String, Arc<ListenerRt>>>,
    /// The spool directory (a listener's self-signed certificate lives under it).
    spool_dir: PathBuf,
}

/// One session's place in its client's count, given back on drop.
pub struct ClientSlot {
    shared: Arc<Shared>,
    ip: std::net::IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut m = self.shared.per_client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Under pressure (most session slots taken) time-outs shrink to this, as postscreen and
/// Postfix's stress mode do.
pub const STRESS_TIMEOUT: Duration = Duration::from_secs(10);

impl Shared {
    pub fn program(&self) -> Arc<Program> {
        self.prog.read().map(|p| p.clone()).unwrap_or_else(|e| e.into_inner().clone())
    }
    /// A listener's settings as the last good load made them.
    pub fn listener(&self, name: &str) -> Option<Arc<ListenerRt>> {
        self.listeners.read().ok().and_then(|l| l.get(name).cloned())
    }
    /// Register a listener (the local one of the maildrop pickup; the sockets' at start).
    pub fn set_listener(&self, l: Arc<ListenerRt>) {
        if let Ok(mut all) = self.listeners.write() {
            all.insert(l.name.clone(), l);
        }
    }

    /// A reload's listener settings: every listener still declared at the address it was
    /// bound to takes the new ones (its TLS certificate and key read again,
    /// `proxy_protocol`, AUTH, limits, time-outs, greeting ...) for the connections
    /// accepted from now on; sessions under way keep theirs. What a reload cannot change
    /// (a socket: a new, moved or removed listener) or could not read is returned, to be
    /// logged as kept until restart.
    fn swap_listeners(&self, prog: &Program, policy_dir: &Path) -> Vec<String> {
        let new = match listeners(prog, policy_dir, &self.spool_dir, &self.hostname) {
            Ok(new) => new,
            Err(e) => return vec![format!("every listener's settings ({e})")],
        };
        let Ok(mut all) = self.listeners.write() else { return Vec::new() };
        let mut kept = Vec::new();
        let mut declared = std::collections::HashSet::new();
        for mut l in new.into_iter().chain(all.contains_key("local").then(|| local_listener(prog, &self.hostname))) {
            declared.insert(l.name.clone());
            match all.get(&l.name) {
                Some(old) if old.address == l.address => {
                    // The same limit keeps the count of the sessions under way.
                    if old.max_sessions == l.max_sessions {
                        l.sessions = old.sessions.clone();
                    }
                    all.insert(l.name.clone(), Arc::new(l));
                }
                Some(old) => kept.push(format!("listener {} at {} (not {})", l.name, old.address, l.address)),
                None => kept.push(format!("listener {} not started", l.name)),
            }
        }
        let mut gone: Vec<&String> = all.keys().filter(|n| !declared.contains(*n)).collect();
        gone.sort();
        kept.extend(gone.into_iter().map(|n| format!("listener {n} still open")));
        kept
    }

    pub fn lookups(&self) -> Arc<Lookups> {
        self.lookups.read().map(|p| p.clone()).unwrap_or_else(|e| e.into_inner().clone())
    }
    pub fn qmgr_up(&self) -> bool {
        self.qmgr_up.load(std::sync::atomic::Ordering::SeqCst)
    }
    /// Take a place for a session from `ip`, unless the address already has
    /// `client_connection_limit` sessions.
    pub fn client_slot(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<ClientSlot> {
        let limit = self.program().server.client_connection_limit as usize;
        let mut m = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if limit > 0 && *n >= limit {
            return None;
        }
        *n += 1;
        Some(ClientSlot { shared: self.clone(), ip })
    }

    /// `login` authenticated from `ip` now.
    pub fn auth_succeeded(&self, login: &str, ip: std::net::IpAddr, now: u64) {
        let mut m = self.auth_known.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= 100_000 && !m.contains_key(login) {
            return;
        }
        let v = m.entry(login.to_ascii_lowercase()).or_default();
        v.retain(|(a, _)| *a != ip);
        v.push((ip, now));
        if v.len() > 16 {
            v.remove(0);
        }
    }

    /// `login` authenticated from `ip` within `window_ms`.
    pub fn auth_known_from(&self, login: &str, ip: std::net::IpAddr, now: u64, window_ms: u64) -> bool {
        let m = self.auth_known.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&login.to_ascii_lowercase())
            .is_some_and(|v| v.iter().any(|(a, t)| *a == ip && now.saturating_sub(*t) <= window_ms))
    }

    /// Most session slots are taken (three quarters or more): time-outs shrink to
    /// [`STRESS_TIMEOUT`].
    pub fn under_pressure(&self) -> bool {
        let free = self.sessions.available_permits();
        free * 4 <= self.max_sessions
    }

    /// The spool's free space, None when it could not be measured.
    pub fn spool_free(&self) -> Option<u64> {
        match self.spool_free.load(std::sync::atomic::Ordering::Relaxed) {
            u64::MAX => None,
            n => Some(n),
        }
    }
    pub fn set_qmgr_up(&self, up: bool) {
        self.qmgr_up.store(up, std::sync::atomic::Ordering::SeqCst);
    }
    /// Tell the queue manager a message is in the spool.
    pub fn enqueued(&self, id: &str) {
        let _ = self.queued.send(id.to_string());
    }

    /// Mail the administrator once per window per (address, text) (R7); with a shared
    /// state store, once per window across the cluster.
    pub async fn alert(&self, to: &str, text: &str, every_ms: u64) {
        let now = now_ms();
        if !self.lookups().state.alert_claim(to, text, every_ms, now).await {
            return;
        }
        let prog = self.program();
        let from = prog.server.alert_from.clone().unwrap_or_else(|| format!("postmaster@{}", self.hostname));
        let subject: String = text.chars().filter(|c| !c.is_control()).take(200).collect();
        let data = format!(
            "From: <{from}>\r\nTo: <{to}>\r\nSubject: mailpolicy alert: {subject}\r\nDate: {}\r\nMessage-ID: <alert.{now}@{}>\r\nAuto-Submitted: auto-generated\r\n\r\n{text}\r\n",
            crate::date::rfc2822(now),
            self.hostname
        );
        let msg = QueuedMessage {
            sender: from,
            recipients: vec![QueuedRcpt {
                address: to.to_string(),
                notify: vec!["NEVER".into()],
                orcpt: String::new(),
                ..Default::default()
            }],
            ret: String::new(),
            envid: String::new(),
            data: data.into_bytes(),
            hold: None,
            archive: Vec::new(),
            filter: None,
            batv_sign: false,
            client_ip: "127.0.0.1".into(),
            helo: self.hostname.clone(),
            auth_user: String::new(),
            added_headers: Vec::new(),
            session: crate::conn::SessionRecord::internal(&prog, &self.hostname),
            copy: false,
            list: None,
            tail: 0,
        };
        match self.store.store(&msg) {
            Ok(id) => {
                self.log.event("alert", &[("id", &id), ("to", to), ("text", text)]);
                // Held by the backup peer too, like any accepted message (section 5.5),
                // then queued; the stage that raised the alert does not wait for the copy.
                match self.backup.get().filter(|b| b.peer.is_some()).cloned() {
                    Some(b) => {
                        let (log, queued) = (self.log, self.queued.clone());
                        tokio::spawn(async move {
                            b.shadow_own(log, &id, "alert").await;
                            let _ = queued.send(id);
                        });
                    }
                    None => self.enqueued(&id),
                }
            }
            Err(e) => self.log.event("alert-failed", &[("to", to), ("error", &format!("{e:?}"))]),
        }
    }
}

/// Memory goes back to the system after a burst: glibc's allocator otherwise raises its
/// mmap threshold after the first large free and keeps later large buffers (a message
/// read back whole, a spool load) in per-thread arenas for good. Large allocations are
/// always mapped (and unmapped when freed), and the arenas are few.
fn tame_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before the sessions start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

/// Give freed heap memory back to the system (glibc), after a burst.
fn trim_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Bytes available to an unprivileged writer on the file system holding `dir` (statvfs).
pub fn free_space(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statvfs buffer of the right type.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Options of `mailc serve`.
pub struct ServeOptions {
    /// None: the embedded default.
    pub policy: Option<PathBuf>,
    /// Overrides the policy's spool.
    pub spool: Option<PathBuf>,
    pub std_dir: Option<PathBuf>,
}

/// A policy that passed `mailc check`, as the daemon starts from it.
pub struct Loaded {
    pub prog: Program,
    /// The policy's directory: relative paths in it are read from here.
    pub dir: PathBuf,
    pub compilation: Compilation,
    /// The file tables' contents the open-relay proof read; a table's other contents are
    /// proven against these before they are used.
    pub proven: proven::Proven,
}

/// Compile the policy for the daemon: a policy with errors never runs (B6).
pub fn load_policy(opts: &ServeOptions) -> Result<Loaded, Compilation> {
    // The same checks as `mailc check`, the open-relay proof included: a policy it
    // refuses never runs (B1, B6).
    let began = std::time::SystemTime::now();
    let (c, _, rows) = with_policy(opts, mailpolicy_lang::analysis::check_keeping_tables);
    let dir = policy_dir(opts);
    match c.program.clone() {
        Some(prog) => {
            let proven = proven::Proven::after_check(&prog, &dir, rows, began);
            Ok(Loaded { prog, dir, compilation: c, proven })
        }
        None => Err(c),
    }
}

/// Compile the policy without the analyses (no open-relay proof, no table read): for
/// `mailc sendmail`, which only needs the spool and the server's names to hand a message
/// to the daemon, which proves the policy before it runs it.
pub fn compile_policy(opts: &ServeOptions) -> Result<(Program, PathBuf), Compilation> {
    let c = with_policy(opts, mailpolicy_lang::compile);
    match c.program {
        Some(prog) => Ok((prog, policy_dir(opts))),
        None => Err(c),
    }
}

/// `f` over the policy file `opts` names, else the embedded default.
fn with_policy<T>(opts: &ServeOptions, f: impl Fn(&str, &dyn mailpolicy_lang::Loader) -> T) -> T {
    match &opts.policy {
        Some(p) => f(&p.display().to_string(), &FsLoader { std_dir: opts.std_dir.clone() }),
        None => f(DEFAULT_POLICY_NAME, &MemLoader::single(DEFAULT_POLICY_NAME, DEFAULT_POLICY)),
    }
}

/// The policy's directory (`.` for the embedded default).
fn policy_dir(opts: &ServeOptions) -> PathBuf {
    let dir =
        opts.policy.as_ref().and_then(|p| p.parent().map(Path::to_path_buf)).unwrap_or_else(|| PathBuf::from("."));
    if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir
    }
}

/// The spool of a policy without a `spool` setting (the embedded default sets its own,
/// `./var/spool`).
pub const DEFAULT_SPOOL: &str = "/var/spool/mailpolicy";

/// The spool: `--spool`, else the policy's `spool` (relative to the policy's directory),
/// else [`DEFAULT_SPOOL`].
pub fn spool_dir(prog: &Program, policy_dir: &Path, over: Option<&Path>) -> PathBuf {
    if let Some(o) = over {
        return o.to_path_buf();
    }
    match &prog.server.spool {
        Some(s) => policy_dir.join(s),
        None => PathBuf::from(DEFAULT_SPOOL),
    }
}

/// Build the runtime view of every listener (the embedded default when none is declared).
pub fn listeners(prog: &Program, policy_dir: &Path, spool: &Path, hostname: &str) -> Result<Vec<ListenerRt>, String> {
    let mut out = Vec::new();
    let decls: Vec<(String, SocketAddr)> =
        if prog.listeners.iter().all(|l| l.protocol == mailpolicy_lang::settings::Protocol::Http) {
            vec![("default".into(), SocketAddr::from(([127, 0, 0, 1], 2525)))]
        } else {
            prog.listeners
                .iter()
                .filter(|l| l.protocol != mailpolicy_lang::settings::Protocol::Http)
                .map(|l| {
                    let name = l.name.clone();
                    let addr = l
                        .address
                        .as_deref()
                        .and_then(|a| a.parse().ok())
                        .ok_or_else(|| format!("listener {name}: bad address"))?;
                    Ok((name, addr))
                })
                .collect::<Result<_, String>>()?
        };
    for (name, address) in decls {
        let decl = prog.listener_or_default(Some(&name));
        let implicit_tls = decl.protocol == Protocol::Submissions;
        let hostname_l = crate::config::hostname(prog, Some(&name), hostname);
        let tls = if decl.tls() == Tls::None && !implicit_tls {
            None
        } else {
            let (cert, key) = match decl.cert.as_ref().zip(decl.key.as_ref()) {
                Some((c, k)) => (policy_dir.join(c), policy_dir.join(k)),
                None => tls::self_signed(&spool.join("tls"), &hostname_l)?,
            };
            let ca = decl.client_ca.as_ref().map(|c| policy_dir.join(c));
            let require_client = decl.client_certs == ClientCerts::Require;
            let cfg = tls::server_config(&cert, &key, ca.as_deref(), require_client)?;
            Some(tokio_rustls::TlsAcceptor::from(cfg))
        };
        let mut engine = crate::config::engine_config(prog, Some(&name), hostname, tls.is_some());
        // Plaintext mechanisms before TLS only on loopback, and only when the policy says so.
        if !engine.auth_requires_tls && !address.ip().is_loopback() {
            engine.auth_requires_tls = true;
        }
        let (require_tls, require_auth) = crate::config::requirements(prog, Some(&name));
        let credentials = decl.credentials.and_then(|id| prog.tables.get(id.index()).cloned());
        if !engine.auth_mechanisms.is_empty() && credentials.is_none() {
            engine.auth_mechanisms.clear();
        }
        let max = decl.max_sessions(&prog.server) as usize;
        out.push(ListenerRt {
            name: name.clone(),
            address,
            engine,
            tls,
            implicit_tls,
            require_tls,
            require_auth,
            credentials,
            command_timeout: session::command_timeout(prog, Some(&name)),
            data_timeout: session::data_timeout(prog, Some(&name)),
            sessions: Arc::new(Semaphore::new(max.max(1))),
            max_sessions: max.max(1),
            proxy: match &decl.proxy_protocol {
                Some(nets) => Some(
                    nets.iter()
                        .map(|n| {
                            mailpolicy_lang::ir::Cidr::parse(n)
                                .ok_or_else(|| format!("listener {name}: proxy_protocol: \"{n}\" is not a network"))
                        })
                        .collect::<Result<Vec<_>, String>>()?,
                ),
                None => None,
            },
        });
    }
    Ok(out)
}

/// The listener local submissions arrive on (`mailc sendmail`, the maildrop pickup): named
/// `local`, no socket, no TLS and no AUTH (the operating system vouches for the user); its
/// limits are the server's (a `listener local { ... }` block cannot be declared: every
/// declared listener has an address).
pub fn local_listener(prog: &Program, hostname: &str) -> ListenerRt {
    let mut engine = crate::config::engine_config(prog, Some("local"), hostname, false);
    engine.auth_mechanisms.clear();
    ListenerRt {
        name: "local".into(),
        address: SocketAddr::from(([127, 0, 0, 1], 0)),
        engine,
        tls: None,
        implicit_tls: false,
        require_tls: false,
        require_auth: false,
        credentials: None,
        command_timeout: session::command_timeout(prog, None),
        data_timeout: session::data_timeout(prog, None),
        sessions: Arc::new(Semaphore::new(1)),
        max_sessions: 1,
        proxy: None,
    }
}

/// A running daemon's handle: its bound addresses, and how to stop it.
pub struct Running {
    pub addresses: Vec<(String, SocketAddr)>,
    pub shutdown: watch::Sender<bool>,
    pub shared: Arc<Shared>,
}

/// Where the policy sends log lines (`log`, `syslog_socket`, `syslog_facility`,
/// `syslog_format`, `journal_socket`).
pub fn log_target(prog: &Program, policy_dir: &Path) -> log::Target {
    use mailpolicy_lang::settings::{LogTarget, SyslogFormat};
    let srv = &prog.server;
    let facility = log::facility(srv.syslog_facility.as_str()).unwrap_or(2);
    match srv.log {
        LogTarget::Syslog => log::Target::Syslog {
            socket: policy_dir.join(&srv.syslog_socket),
            facility,
            rfc5424: srv.syslog_format == SyslogFormat::Rfc5424,
        },
        LogTarget::Journal => log::Target::Journal { socket: policy_dir.join(&srv.journal_socket), facility },
        LogTarget::Stderr => log::Target::Stderr,
    }
}

/// Bind the listeners and start accepting. `queued` receives the ids of messages stored.
pub async fn start(
    prog: Program,
    policy_dir: PathBuf,
    spool: PathBuf,
    store: Arc<dyn MessageStore>,
    queued: mpsc::UnboundedSender<String>,
) -> Result<Running, String> {
    start_with(prog, policy_dir, spool, store, queued, None, || Ok(())).await
}

/// [`start`], calling `bound` once every listener is bound and before any is accepted from
/// (where `mailc serve` drops its privileges: no session ever runs as root).
pub async fn start_with(
    prog: Program,
    policy_dir: PathBuf,
    spool: PathBuf,
    store: Arc<dyn MessageStore>,
    queued: mpsc::UnboundedSender<String>,
    proven: Option<proven::Proven>,
    bound: impl FnOnce() -> Result<(), String>,
) -> Result<Running, String> {
    let hostname = crate::config::hostname(&prog, None, &machine_hostname());
    let log = log::Logger {
        format: match prog.server.log_format {
            LogFormat::Json => log::Format::Json,
            LogFormat::Text => log::Format::Text,
        },
    };
    log::configure(log_target(&prog, &policy_dir), &hostname);
    tame_allocator();
    let lookups = Arc::new(Lookups::new(&prog, &policy_dir, proven)?);
    let lsts = listeners(&prog, &policy_dir, &spool, &hostname)?;
    let (tx, rx) = watch::channel(false);
    let max_all = prog.server.max_sessions as usize;
    let shared = Arc::new(Shared {
        prog: RwLock::new(Arc::new(prog)),
        lookups: RwLock::new(lookups),
        store,
        log,
        hostname,
        shutdown: rx,
        queued,
        sessions: Arc::new(Semaphore::new(max_all.max(1))),
        qmgr_up: std::sync::atomic::AtomicBool::new(true),
        spool_free: Arc::new(std::sync::atomic::AtomicU64::new(free_space(&spool).unwrap_or(u64::MAX))),
        max_sessions: max_all.max(1),
        per_client: Mutex::new(Default::default()),
        auth_known: Mutex::new(Default::default()),
        whole_message: Arc::new(Semaphore::new(1)),
        backup: std::sync::OnceLock::new(),
        listeners: RwLock::new(Default::default()),
        spool_dir: spool.clone(),
    });
    {
        let (free, dir, mut stop) = (shared.spool_free.clone(), spool.clone(), shared.shutdown.clone());
        tokio::spawn(async move {
            let mut n: u64 = 0;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stop.changed() => break,
                }
                free.store(free_space(&dir).unwrap_or(u64::MAX), std::sync::atomic::Ordering::Relaxed);
                n += 1;
                if n % 20 == 0 {
                    trim_allocator();
                }
            }
        });
    }
    // The admin listener (`admin "IP:PORT"`): Prometheus metrics, no SMTP; bound with the
    // others, before privileges are dropped.
    let admin = match shared.program().server.admin.clone() {
        Some(a) => {
            let addr: SocketAddr = a.parse().map_err(|_| format!("admin: \"{a}\" is not an IP:port"))?;
            Some(TcpListener::bind(addr).await.map_err(|e| format!("admin: cannot bind {addr}: {e}"))?)
        }
        None => None,
    };
    // The backup listener (`backup_listen "IP:PORT"`): peers' shadow copies, no SMTP.
    let backup_sock = match shared.program().server.backup_listen.clone() {
        Some(a) => {
            let addr: SocketAddr = a.parse().map_err(|_| format!("backup_listen: \"{a}\" is not an IP:port"))?;
            Some(TcpListener::bind(addr).await.map_err(|e| format!("backup_listen: cannot bind {addr}: {e}"))?)
        }
        None => None,
    };
    let mut socks = Vec::new();
    for l in lsts {
        let sock = TcpListener::bind(l.address)
            .await
            .map_err(|e| format!("listener {}: cannot bind {}: {e}", l.name, l.address))?;
        socks.push((l, sock));
    }
    if let Err(e) = bound() {
        let _ = tx.send(true);
        return Err(e);
    }
    let mut addresses = Vec::new();
    {
        let prog = shared.program();
        let key = prog.server.backup_key.and_then(|id| prog.secrets.get(id.index())).map(|s| s.name.clone());
        let key = key.and_then(|k| shared.lookups().secret(&k).map(str::to_string));
        if let Some(b) = backup::Backup::new(&prog, &policy_dir, &spool, key.as_deref(), &shared.hostname)? {
            let b = Arc::new(b);
            if let Some(sock) = &backup_sock {
                let bound = sock.local_addr().map_err(|e| e.to_string())?;
                shared.log.event(
                    "listening",
                    &[("listener", "backup"), ("address", &bound.to_string()), ("serves", "shadow copies")],
                );
                addresses.push(("backup".to_string(), bound));
            }
            shared.log.event(
                "backup",
                &[
                    ("origin", &b.origin),
                    ("peer", &b.peer.map(|p| p.to_string()).unwrap_or_default()),
                    ("on_error", if b.tempfail { "tempfail" } else { "accept" }),
                ],
            );
            let _ = shared.backup.set(b.clone());
            // No mail is accepted before this host's first heartbeat was written (or
            // failed within `state_timeout`): its peer never holds a copy of a host it
            // could not see alive.
            if let Some(first) = b.spawn(shared.clone(), backup_sock) {
                let _ = first.await;
            }
        }
    }
    if let Some(sock) = admin {
        let bound = sock.local_addr().map_err(|e| e.to_string())?;
        let with_lists = shared.program().server.admin_lists;
        shared.log.event(
            "listening",
            &[
                ("listener", "admin"),
                ("address", &bound.to_string()),
                ("serves", if with_lists { "metrics, mailing lists" } else { "metrics" }),
            ],
        );
        addresses.push(("admin".to_string(), bound));
        if with_lists {
            // `admin_lists`: the lists' endpoint (web.rs), with /metrics kept.
            let mgr =
                lists::Manager { shared: shared.clone(), policy_dir: policy_dir.clone(), spool_dir: spool.clone() };
            let queue = crate::spool::Spool::attach(&spool).ok().map(Arc::new);
            tokio::spawn(web::serve(mgr, "admin".into(), sock, None, web::Mount::Admin(queue)));
        } else {
            tokio::spawn(metrics::serve(sock, spool.clone(), shared.shutdown.clone()));
        }
    }
    for (l, sock) in socks {
        let bound = sock.local_addr().map_err(|e| e.to_string())?;
        shared.log.event(
            "listening",
            &[
                ("listener", &l.name),
                ("address", &bound.to_string()),
                (
                    "tls",
                    if l.implicit_tls {
                        "implicit"
                    } else if l.tls.is_some() {
                        "starttls"
                    } else {
                        "none"
                    },
                ),
            ],
        );
        addresses.push((l.name.clone(), bound));
        let l = Arc::new(l);
        if let Ok(mut all) = shared.listeners.write() {
            all.insert(l.name.clone(), l.clone());
        }
        tokio::spawn(accept_loop(shared.clone(), l, sock));
    }
    // The mailing lists' web endpoint (`protocol http`, web.rs).
    let prog = shared.program();
    for l in prog.listeners.iter().filter(|l| l.protocol == mailpolicy_lang::settings::Protocol::Http) {
        let name = l.name.clone();
        let address: SocketAddr =
            l.address.as_deref().and_then(|a| a.parse().ok()).ok_or_else(|| format!("listener {name}: bad address"))?;
        let tls = if l.tls() == mailpolicy_lang::settings::Tls::Required {
            let (cert, key) = match l.cert.as_deref().zip(l.key.as_deref()) {
                Some((c, k)) => (policy_dir.join(c), policy_dir.join(k)),
                None => tls::self_signed(&spool.join("tls"), &shared.hostname)?,
            };
            Some(tokio_rustls::TlsAcceptor::from(tls::server_config(&cert, &key, None, false)?))
        } else {
            None
        };
        let sock =
            TcpListener::bind(address).await.map_err(|e| format!("listener {name}: cannot bind {address}: {e}"))?;
        let bound = sock.local_addr().map_err(|e| e.to_string())?;
        shared.log.event(
            "listening",
            &[
                ("listener", &name),
                ("address", &bound.to_string()),
                ("protocol", if tls.is_some() { "https" } else { "http" }),
            ],
        );
        addresses.push((name.clone(), bound));
        let mgr = lists::Manager { shared: shared.clone(), policy_dir: policy_dir.clone(), spool_dir: spool.clone() };
        tokio::spawn(web::serve(mgr, name, sock, tls, web::Mount::Lists));
    }
    Ok(Running { addresses, shutdown: tx, shared })
}

async fn accept_loop(shared: Arc<Shared>, first: Arc<ListenerRt>, sock: TcpListener) {
    let mut stop = shared.shutdown.clone();
    let mut n: u64 = 0;
    loop {
        let accepted = tokio::select! {
            a = sock.accept() => a,
            _ = stop.changed() => break,
        };
        let (mut tcp, remote) = match accepted {
            Ok(x) => x,
            Err(e) => {
                shared.log.event("accept-failed", &[("listener", &first.name), ("error", &e.to_string())]);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // The settings of the last good load when the connection came (a reload swaps them).
        let lst = shared.listener(&first.name).unwrap_or_else(|| first.clone());
        n += 1;
        let id = format!("{}-{n}", lst.name);
        let permits = (lst.sessions.clone().try_acquire_owned(), shared.sessions.clone().try_acquire_owned());
        let (Ok(p1), Ok(p2)) = permits else {
            shared.log.event(
                "refused",
                &[("listener", &lst.name), ("client", &remote.ip().to_string()), ("reason", "too many sessions")],
            );
            crate::metrics::get().reply(&lst.name, "421");
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let _ = tcp.write_all(b"421 4.7.0 Too many connections, try again later\r\n").await;
                let _ = tcp.shutdown().await;
            });
            continue;
        };
        let local = tcp.local_addr().unwrap_or(lst.address);
        let Some(trusted) = lst.proxy.clone() else {
            tokio::spawn(admit(shared.clone(), lst.clone(), tcp, remote, local, id, Vec::new(), (p1, p2)));
            continue;
        };
        // Behind a load balancer: only its networks may speak, and they say who the client is.
        if !trusted.iter().any(|c| c.contains(remote.ip())) {
            shared.log.event(
                "proxy-refused",
                &[("listener", &lst.name), ("client", &remote.ip().to_string()), ("reason", "not a trusted proxy")],
            );
            drop(tcp);
            continue;
        }
        let (s, l) = (shared.clone(), lst.clone());
        tokio::spawn(async move {
            match read_proxy_header(&mut tcp).await {
                Ok((header, early)) => {
                    let (client, to) = header.addresses.unwrap_or((remote, local));
                    s.log.event(
                        "proxied",
                        &[
                            ("session", &id),
                            ("proxy", &remote.to_string()),
                            ("client", &client.to_string()),
                            ("version", if header.version == crate::proxy::Version::V1 { "1" } else { "2" }),
                        ],
                    );
                    admit(s, l, tcp, client, to, id, early, (p1, p2)).await;
                }
                Err(why) => {
                    s.log.event(
                        "proxy-refused",
                        &[("listener", &l.name), ("client", &remote.ip().to_string()), ("reason", &why)],
                    );
                    drop((tcp, p1, p2));
                }
            }
        });
    }
}

/// Time a load balancer has to send its PROXY header.
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Read a connection's PROXY header (v1 or v2; `engine::proxy` parses): the header and the
/// client's bytes after it, or why the connection is refused. Reads at most one header's
/// worth plus one buffer, within [`PROXY_HEADER_TIMEOUT`].
async fn read_proxy_header(tcp: &mut tokio::net::TcpStream) -> Result<(crate::proxy::Header, Vec<u8>), String> {
    use tokio::io::AsyncReadExt;
    let mut buf: Vec<u8> = Vec::with_capacity(256);
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + PROXY_HEADER_TIMEOUT;
    loop {
        match crate::proxy::parse(&buf) {
            crate::proxy::Parse::Done { header, len } => return Ok((header, buf.split_off(len.min(buf.len())))),
            crate::proxy::Parse::Invalid(why) => return Err(why.to_string()),
            crate::proxy::Parse::Incomplete => {}
        }
        let n = match tokio::time::timeout_at(deadline, tcp.read(&mut chunk)).await {
            Err(_) => return Err("no PROXY header in time".into()),
            Ok(Err(e)) => return Err(e.to_string()),
            Ok(Ok(0)) => return Err("closed before a complete PROXY header".into()),
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
}

/// A connection with its session permits: the per-client limit, then the session (under
/// the task boundary that catches a panic).
#[allow(clippy::too_many_arguments)]
async fn admit(
    shared: Arc<Shared>,
    lst: Arc<ListenerRt>,
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    local: SocketAddr,
    id: String,
    early: Vec<u8>,
    permits: (tokio::sync::OwnedSemaphorePermit, tokio::sync::OwnedSemaphorePermit),
) {
    // One address cannot take every slot (Postfix anvil's per-client limit).
    let Some(slot) = shared.client_slot(canonical(remote.ip())) else {
        drop(permits);
        shared.log.event(
            "refused",
            &[
                ("listener", &lst.name),
                ("client", &remote.ip().to_string()),
                ("reason", "too many sessions from the address"),
            ],
        );
        crate::metrics::get().reply(&lst.name, "421");
        let mut tcp = tcp;
        use tokio::io::AsyncWriteExt;
        let _ = tcp.write_all(b"421 4.7.0 Too many connections from your address, try again later\r\n").await;
        let _ = tcp.shutdown().await;
        return;
    };
    use futures_util::FutureExt;
    // The task boundary is the last line of defence: a panic ends this session
    // only (its permits and counts are released by guards), with a log line.
    let log = shared.log;
    let sid = id.clone();
    let ended =
        std::panic::AssertUnwindSafe(session::run(shared, lst, session::Incoming::Tcp(tcp, early), remote, local, id))
            .catch_unwind()
            .await;
    if let Err(p) = ended {
        let why = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        log.event("session-failed", &[("session", &sid), ("client", &remote.ip().to_string()), ("error", &why)]);
    }
    drop((permits, slot));
}

fn canonical(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The settings of shadow copies (section 5.5), read once at start.
fn backup_settings(s: &mailpolicy_lang::settings::Server) -> impl PartialEq + '_ {
    (
        (&s.backup_peer, &s.backup_listen, &s.backup_key, &s.backup_on_error, &s.backup_timeout, &s.backup_takeover),
        (&s.backup_tls, &s.backup_tls_cert, &s.backup_tls_key, &s.backup_tls_ca, &s.backup_tls_name),
    )
}

impl Running {
    /// SIGHUP: recompile; keep the old policy when the new one has errors (B6).
    pub fn reload(&self, opts: &ServeOptions) -> Result<(), String> {
        match load_policy(opts) {
            Ok(Loaded { prog, dir, proven, .. }) => {
                let mut lookups = Lookups::new(&prog, &dir, Some(proven))?;
                // Rate windows, greylist triplets, ... of this process outlive a reload.
                lookups.state.adopt_local(&self.shared.lookups().state);
                let mut kept = self.shared.swap_listeners(&prog, &dir);
                if backup_settings(&self.shared.program().server) != backup_settings(&prog.server) {
                    kept.push("the backup settings (backup_*)".into());
                }
                if !kept.is_empty() {
                    self.shared.log.event("reload-partial", &[("kept", &format!("{} until restart", kept.join("; ")))]);
                }
                if let Ok(mut p) = self.shared.prog.write() {
                    *p = Arc::new(prog);
                }
                if let Ok(mut l) = self.shared.lookups.write() {
                    *l = Arc::new(lookups);
                }
                log::configure(log_target(&self.shared.program(), &dir), &self.shared.hostname);
                self.shared.log.event(
                    "reloaded",
                    &[("policy", &opts.policy.as_ref().map(|p| p.display().to_string()).unwrap_or_default())],
                );
                Ok(())
            }
            Err(c) => {
                let errs: Vec<String> =
                    c.diagnostics.iter().filter(|d| d.is_error()).map(|d| d.render_short(&c.sources)).collect();
                let msg = errs.join("; ");
                self.shared.log.event("reload-refused", &[("errors", &msg)]);
                Err(msg)
            }
        }
    }

    /// Stop accepting, ask sessions to finish, wait for them.
    pub async fn stop(&self) {
        let _ = self.shutdown.send(true);
        let all = self.shared.sessions.clone();
        let total = (self.shared.program().server.max_sessions.min(u32::MAX as u64) as u32).max(1);
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, all.acquire_many(total)).await;
        let (trips, writes) = self.shared.lookups().state.round_trips();
        let (trips, writes) =
            if trips == 0 { (String::new(), String::new()) } else { (trips.to_string(), writes.to_string()) };
        self.shared.log.event("stopped", &[("state_round_trips", &trips), ("state_count_writes", &writes)]);
    }
}

impl MessageStore for crate::spool::Spool {
    fn spill_path(&self, tag: &str) -> PathBuf {
        crate::spool::Spool::spill_path(self, tag)
    }
    fn store_with_tail(&self, msg: &QueuedMessage, tail: Option<&Path>) -> Result<String, StoreFailure> {
        self.store_as(None, msg, tail)
    }
    fn reserve_id(&self) -> Option<String> {
        Some(self.new_id(now_ms()).as_str().to_string())
    }
    fn store_as(&self, id: Option<&str>, msg: &QueuedMessage, tail: Option<&Path>) -> Result<String, StoreFailure> {
        let id = id.and_then(crate::spool::QueueId::parse);
        crate::spool::Spool::store_with_tail_as(self, id, msg, tail, crate::spool::Class::Normal, now_ms())
            .map(|id| id.as_str().to_string())
            .map_err(|e| match e {
                crate::spool::StoreError::Full(_) => StoreFailure::Full,
                crate::spool::StoreError::Io(e) => StoreFailure::Io(e.to_string()),
            })
    }
}
