//! One log line per event, readable by default (`key=value`), JSON on request
//! (`server { log_format json; }`), with a severity. Lines go to standard error, or to
//! syslog (`server { log syslog; }`: the local socket `/dev/log`, or `syslog_socket`;
//! RFC 3164 or, with `syslog_format rfc5424`, RFC 5424; facility `syslog_facility`,
//! default `mail`) or to the systemd journal (`log journal`: its native protocol on
//! `/run/systemd/journal/socket`, or `journal_socket`).
//!
//! Besides the events, each message gets Postfix-style summary lines (`Logger::summary`):
//! `QUEUEID: client=...` and `QUEUEID: from=<...>, size=N, nrcpt=N (queue active)` when it
//! is queued, one `QUEUEID: to=<...>, relay=..., delay=..., delays=a/b/c/d, dsn=X.Y.Z,
//! status=sent|deferred|bounced (REPLY)` per recipient per attempt, and `QUEUEID: removed`,
//! under the program names `mailpolicy/smtpd`, `mailpolicy/pickup`, `mailpolicy/qmgr`,
//! `mailpolicy/smtp`, `mailpolicy/lmtp` and `mailpolicy/local`, so log tooling written for
//! Postfix (pflogsumm with `--syslog-name=mailpolicy`) reads them.
//!
//! The sink is process-wide ([`configure`]): a process runs one daemon. When a datagram
//! cannot be sent (no syslog daemon), the line goes to standard error instead.

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// Syslog severities (RFC 5424 6.2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Crit = 2,
    Err = 3,
    Warning = 4,
    Notice = 5,
    Info = 6,
}

impl Severity {
    pub fn name(self) -> &'static str {
        match self {
            Severity::Crit => "crit",
            Severity::Err => "err",
            Severity::Warning => "warning",
            Severity::Notice => "notice",
            Severity::Info => "info",
        }
    }

    /// The severity of an event by its name.
    pub fn of(event: &str) -> Severity {
        match event {
            "qmgr-died" | "corrupt-failed" | "session-failed" | "delivery-task-failed" => Severity::Crit,
            "store-failed" | "record-failed" | "remove-failed" | "load-failed" | "dsn-failed" | "alert-failed"
            | "expand-failed" | "bcc-failed" | "pickup-failed" | "accept-failed" | "tls-ca-failed" | "corrupt"
            | "pickup-corrupt" | "dkim-sign-failed" => Severity::Err,
            "reload-refused" | "reload-partial" | "store-refused" | "refused" | "timeout" | "tls-failed"
            | "auth-failed" | "qmgr-restarted" | "pickup-deferred" => Severity::Warning,
            "started" | "stopped" | "reloaded" | "listening" | "alert" => Severity::Notice,
            _ => Severity::Info,
        }
    }
}

/// Where log lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Stderr,
    Syslog { socket: PathBuf, facility: u8, rfc5424: bool },
    Journal { socket: PathBuf, facility: u8 },
}

/// Syslog facility codes by name (RFC 5424 6.2.1).
pub fn facility(name: &str) -> Option<u8> {
    Some(match name {
        "mail" => 2,
        "daemon" => 3,
        "local0" => 16,
        "local1" => 17,
        "local2" => 18,
        "local3" => 19,
        "local4" => 20,
        "local5" => 21,
        "local6" => 22,
        "local7" => 23,
        _ => return None,
    })
}

struct Sink {
    target: Target,
    socket: Option<UnixDatagram>,
}

static SINK: OnceLock<Mutex<Sink>> = OnceLock::new();
/// Whether the target is standard error: then a line takes no lock of the sink's (issue
/// 13: the sink's mutex and stderr's were the most contended locks of the daemon).
static TO_STDERR: AtomicBool = AtomicBool::new(true);
static HOST: RwLock<Option<Arc<str>>> = RwLock::new(None);

/// Send log lines to `target` from now on (the daemon calls this once at start and on
/// reload).
pub fn configure(target: Target, host: &str) {
    let sink = SINK.get_or_init(|| Mutex::new(Sink { target: Target::Stderr, socket: None }));
    let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
    if s.target != target {
        s.socket = None;
    }
    TO_STDERR.store(target == Target::Stderr, Ordering::Release);
    s.target = target;
    *HOST.write().unwrap_or_else(|p| p.into_inner()) = Some(host.into());
}

/// The process id, read once: a system call per line otherwise (the daemon never forks
/// after it starts logging).
fn pid() -> u32 {
    static PID: OnceLock<u32> = OnceLock::new();
    *PID.get_or_init(std::process::id)
}

/// The host name of the summary lines: the configured one, else the machine's.
fn host() -> Arc<str> {
    if let Some(h) = HOST.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
        return h.clone();
    }
    let h: Arc<str> = crate::machine_hostname().into();
    HOST.write().unwrap_or_else(|p| p.into_inner()).get_or_insert(h).clone()
}

/// One line to standard error in one `write` (no lock of std's: the kernel keeps a write
/// of a line together, on a pipe up to PIPE_BUF and on a file, which is what stderr is).
fn write_stderr(line: &[u8]) {
    use std::os::fd::FromRawFd;
    // SAFETY: fd 2 is open for the life of the process; ManuallyDrop never closes it.
    let f = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(2) });
    let _ = (&*f).write_all(line);
}

#[derive(Clone, Copy, Debug)]
pub struct Logger {
    pub format: Format,
}

impl Logger {
    pub fn event(&self, event: &str, fields: &[(&str, &str)]) {
        let sev = Severity::of(event);
        let body = match self.format {
            Format::Json => {
                let mut m = serde_json::Map::new();
                m.insert("event".into(), event.into());
                m.insert("severity".into(), sev.name().into());
                for (k, v) in fields {
                    m.insert((*k).into(), (*v).into());
                }
                serde_json::Value::Object(m)
            }
            Format::Text => {
                let mut s = event.to_string();
                for (k, v) in fields {
                    if v.is_empty() {
                        continue;
                    }
                    s.push(' ');
                    s.push_str(k);
                    s.push('=');
                    s.push_str(&quote(v));
                }
                serde_json::Value::String(s)
            }
        };
        self.emit("mailpolicy", sev, event, body);
    }

    /// A Postfix-style summary line of `program` (`smtpd`, `qmgr`, `smtp`, ...):
    /// `QUEUEID: TEXT`.
    pub fn summary(&self, program: &str, sev: Severity, queue_id: &str, text: &str) {
        let line = format!("{queue_id}: {}", clean(text));
        let tag = format!("mailpolicy/{program}");
        let body = match self.format {
            Format::Json => serde_json::json!({
                "event": "summary", "severity": sev.name(), "program": tag, "id": queue_id, "line": line,
            }),
            Format::Text => serde_json::Value::String(line),
        };
        self.emit(&tag, sev, "summary", body);
    }

    fn emit(&self, tag: &str, sev: Severity, event: &str, body: serde_json::Value) {
        let now_ms = crate::now_ms();
        if !TO_STDERR.load(Ordering::Acquire) && self.send_to_socket(tag, sev, event, &body, now_ms) {
            return;
        }
        let (host, pid) = (host(), pid());
        let text = match &body {
            serde_json::Value::String(t) => t,
            _ => "",
        };
        let mut line = match body {
            serde_json::Value::Object(mut m) => {
                m.insert("time".into(), crate::date::rfc3339(now_ms).into());
                serde_json::Value::Object(m).to_string()
            }
            _ if event == "summary" => format!("{} {host} {tag}[{pid}]: {text}", crate::date::rfc3339(now_ms)),
            _ => format!("{} {text}", crate::date::rfc3339(now_ms)),
        };
        line.push('\n');
        write_stderr(line.as_bytes());
    }

    /// A line to syslog or the journal; false when it could not be sent (it goes to
    /// standard error then).
    fn send_to_socket(&self, tag: &str, sev: Severity, event: &str, body: &serde_json::Value, now_ms: u64) -> bool {
        let (host, pid) = (host(), pid());
        let sink = SINK.get_or_init(|| Mutex::new(Sink { target: Target::Stderr, socket: None }));
        let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
        let text = match body {
            serde_json::Value::String(t) => t.clone(),
            other => other.to_string(),
        };
        match s.target.clone() {
            Target::Stderr => false,
            Target::Syslog { socket, facility, rfc5424 } => {
                let pri = facility as u32 * 8 + sev as u32;
                let msg = if rfc5424 {
                    // <PRI>1 TIMESTAMP HOST APP PROCID MSGID SD MSG
                    let app: String = tag.chars().filter(|c| c.is_ascii_graphic()).take(48).collect();
                    let msgid: String = event.chars().filter(|c| c.is_ascii_graphic()).take(32).collect();
                    format!("<{pri}>1 {} {host} {app} {pid} {msgid} - {text}", crate::date::rfc3339(now_ms))
                } else {
                    // <PRI>Mmm dd hh:mm:ss TAG[PID]: MSG, as syslog(3) sends it to /dev/log.
                    format!("<{pri}>{} {tag}[{pid}]: {text}", rfc3164_time(now_ms))
                };
                send(&mut s, &socket, msg.as_bytes())
            }
            Target::Journal { socket, facility } => {
                let mut d = Vec::new();
                field(&mut d, "MESSAGE", &text);
                field(&mut d, "PRIORITY", &(sev as u8).to_string());
                field(&mut d, "SYSLOG_FACILITY", &facility.to_string());
                field(&mut d, "SYSLOG_IDENTIFIER", tag);
                field(&mut d, "SYSLOG_PID", &pid.to_string());
                field(&mut d, "MAILPOLICY_EVENT", event);
                send(&mut s, &socket, &d)
            }
        }
    }
}

/// A value for a `key=value` line: quoted (JSON string syntax) when it has a space, a
/// quote, `=` or a control character.
fn quote(v: &str) -> String {
    if v.contains([' ', '"', '=']) || v.chars().any(char::is_control) {
        serde_json::Value::from(v).to_string()
    } else {
        v.to_string()
    }
}

/// Control characters out of a summary line (replies and addresses come from peers).
fn clean(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

fn send(s: &mut Sink, path: &std::path::Path, bytes: &[u8]) -> bool {
    if s.socket.is_none() {
        s.socket = UnixDatagram::unbound().ok().filter(|u| u.connect(path).is_ok());
    }
    match s.socket.as_ref().map(|u| u.send(bytes)) {
        Some(Ok(_)) => true,
        _ => {
            // The syslog daemon may have restarted: connect again next time.
            s.socket = None;
            false
        }
    }
}

/// One field of the journal's native protocol: `KEY=VALUE\n`, or the length-prefixed form
/// for a value with a line break.
fn field(out: &mut Vec<u8>, key: &str, value: &str) {
    out.extend_from_slice(key.as_bytes());
    if value.contains('\n') {
        out.push(b'\n');
        out.extend_from_slice(&(value.len() as u64).to_le_bytes());
        out.extend_from_slice(value.as_bytes());
    } else {
        out.push(b'=');
        out.extend_from_slice(value.as_bytes());
    }
    out.push(b'\n');
}

/// `Mmm dd hh:mm:ss` in UTC (RFC 3164 4.1.2; the day space-padded).
fn rfc3164_time(ms: u64) -> String {
    let c = crate::date::Civil::from_secs(ms / 1000);
    format!("{} {:>2} {:02}:{:02}:{:02}", c.month_name(), c.day, c.hour, c.minute, c.second)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn severities_and_formats() {
        assert_eq!(Severity::of("store-failed"), Severity::Err);
        assert_eq!(Severity::of("verdict"), Severity::Info);
        assert_eq!(Severity::of("reload-refused"), Severity::Warning);
        assert_eq!(facility("mail"), Some(2));
        assert_eq!(facility("kern"), None);
        let t = rfc3164_time(0);
        assert_eq!(t, "Jan  1 00:00:00");
        let mut d = Vec::new();
        field(&mut d, "MESSAGE", "a\nb");
        assert_eq!(d, b"MESSAGE\n\x03\0\0\0\0\0\0\0a\nb\n");
    }
}
