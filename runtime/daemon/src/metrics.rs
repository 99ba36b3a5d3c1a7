//! The daemon's Prometheus metrics and the admin listener that serves them
//! (`server { admin "127.0.0.1:9025"; }`): `GET /metrics` in the text exposition format
//! (OpenMetrics, as the prometheus-client crate writes it).
//!
//! The counters and histograms live in one process-wide registry ([`get`]): a process runs
//! one daemon. Queue sizes are not counted as events: they are read from the spool's files
//! at each scrape (the files are the queue's source of truth, `mailc queue` changes them
//! too), as Postfix's `qshape` reads its queue directories.
//!
//! The HTTP side is a minimal HTTP/1.1 responder over tokio (one request per connection,
//! `Connection: close`; the request head is bounded to 8 KiB and 10 s): hyper is not a
//! dependency of the daemon and one GET needs no more.

use std::path::PathBuf;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::record::{QueueName, RcptState};

type Labels = Vec<(&'static str, String)>;

#[derive(Clone)]
struct Buckets;

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        // 0.5 ms .. ~33 s.
        Histogram::new(exponential_buckets(0.0005, 2.0, 17))
    }
}

pub struct Metrics {
    registry: Registry,
    sessions_current: Family<Labels, Gauge>,
    sessions: Family<Labels, Counter>,
    replies: Family<Labels, Counter>,
    verdicts: Family<Labels, Counter>,
    deliveries: Family<Labels, Counter>,
    lookups: Family<Labels, Histogram, Buckets>,
    spool_commit: Histogram,
    queue_messages: Family<Labels, Gauge>,
    queue_recipients: Family<Labels, Gauge>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mailpolicy");
        let m = Metrics {
            sessions_current: Family::default(),
            sessions: Family::default(),
            replies: Family::default(),
            verdicts: Family::default(),
            deliveries: Family::default(),
            lookups: Family::new_with_constructor(Buckets),
            spool_commit: Buckets.new_metric(),
            queue_messages: Family::default(),
            queue_recipients: Family::default(),
            registry: Registry::default(),
        };
        registry.register("sessions_current", "SMTP sessions open now, by listener", m.sessions_current.clone());
        registry.register("sessions", "SMTP sessions started, by listener", m.sessions.clone());
        registry.register(
            "replies",
            "SMTP replies sent to clients, by listener, code class (2xx..5xx) and code",
            m.replies.clone(),
        );
        registry.register(
            "verdicts",
            "policy verdicts, by stage, outcome and deciding rule (FILE:LINE, or default)",
            m.verdicts.clone(),
        );
        registry.register(
            "deliveries",
            "delivery attempts per recipient, by result (delivered, deferred, bounced)",
            m.deliveries.clone(),
        );
        registry.register(
            "lookup_duration_seconds",
            "time of one lookup, by back end kind (dns, table, ldap, sql, callahead, scanner)",
            m.lookups.clone(),
        );
        registry.register(
            "spool_commit_duration_seconds",
            "time of one durable spool commit (writes, renames and fsyncs, group-committed)",
            m.spool_commit.clone(),
        );
        registry.register(
            "queue_messages",
            "messages in the spool, by queue (incoming, active, deferred, hold, corrupt)",
            m.queue_messages.clone(),
        );
        registry.register(
            "queue_recipients",
            "recipients not yet done, by queue and destination (the recipient's domain)",
            m.queue_recipients.clone(),
        );
        Metrics { registry, ..m }
    }

    /// A session of `listener` began; the guard ends it on drop (every path included).
    pub fn session(&'static self, listener: &str) -> SessionGuard {
        let l = vec![("listener", listener.to_string())];
        self.sessions.get_or_create(&l).inc();
        self.sessions_current.get_or_create(&l).inc();
        SessionGuard { labels: l, metrics: self }
    }

    /// Count the replies in `bytes`, a piece of what the server sent. `at_line_start`
    /// carries whether the next piece begins a line.
    pub fn replies_in(&self, listener: &str, bytes: &[u8], at_line_start: &mut bool) {
        for line in bytes.split_inclusive(|b| *b == b'\n') {
            if *at_line_start {
                // The final line of a reply: three digits and a space (RFC 5321 4.2).
                if let (Some(code), Some(b' ')) = (line.get(..3), line.get(3)) {
                    if code.iter().all(u8::is_ascii_digit) {
                        self.reply(listener, std::str::from_utf8(code).unwrap_or("000"));
                    }
                }
            }
            *at_line_start = line.ends_with(b"\n");
        }
    }

    /// One reply with `code` (three digits) sent on `listener`.
    pub fn reply(&self, listener: &str, code: &str) {
        let class = format!("{}xx", code.chars().next().unwrap_or('0'));
        self.replies
            .get_or_create(&vec![("listener", listener.to_string()), ("class", class), ("code", code.to_string())])
            .inc();
    }

    pub fn verdict(&self, stage: &str, outcome: &str, rule: &str) {
        self.verdicts
            .get_or_create(&vec![
                ("stage", stage.to_string()),
                ("outcome", outcome.to_string()),
                ("rule", rule.to_string()),
            ])
            .inc();
    }

    /// `result`: delivered, deferred or bounced.
    pub fn delivery(&self, result: &str) {
        self.deliveries.get_or_create(&vec![("result", result.to_string())]).inc();
    }

    pub fn lookup(&self, backend: &str, took: Duration) {
        self.lookups.get_or_create(&vec![("backend", backend.to_string())]).observe(took.as_secs_f64());
    }

    pub fn spool_commit(&self, took: Duration) {
        self.spool_commit.observe(took.as_secs_f64());
    }

    /// Read the queue's sizes from the spool's files.
    fn read_queue(&self, spool: &crate::spool::Spool) {
        self.queue_messages.clear();
        self.queue_recipients.clear();
        for q in QueueName::ALL {
            self.queue_messages.get_or_create(&vec![("queue", q.as_str().to_string())]).set(0);
        }
        if let Ok(all) = spool.list() {
            for s in &all {
                self.queue_messages.get_or_create(&vec![("queue", s.queue.as_str().to_string())]).inc();
                for r in s
                    .rcpts
                    .iter()
                    .filter(|r| !matches!(r.state, RcptState::Delivered { .. } | RcptState::Failed { .. }))
                {
                    let dest = mailpolicy_stdlib::address::split(&r.address).1.to_ascii_lowercase();
                    self.queue_recipients
                        .get_or_create(&vec![("queue", s.queue.as_str().to_string()), ("destination", dest)])
                        .inc();
                }
            }
        }
        if let Ok(c) = spool.list_corrupt() {
            self.queue_messages
                .get_or_create(&vec![("queue", QueueName::Corrupt.as_str().to_string())])
                .set(c.len() as i64);
        }
    }

    /// The exposition text.
    pub fn render(&self, spool: Option<&crate::spool::Spool>) -> String {
        if let Some(s) = spool {
            self.read_queue(s);
        }
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// A session being counted in `sessions_current`.
pub struct SessionGuard {
    labels: Labels,
    metrics: &'static Metrics,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.metrics.sessions_current.get_or_create(&self.labels).dec();
    }
}

/// The outcome of a verdict as a metric label: its kind, never its text.
pub fn outcome_kind(text: &str) -> &str {
    text.split_whitespace().next().unwrap_or("default")
}

/// Serve `GET /metrics` on `sock` until shutdown.
pub async fn serve(sock: TcpListener, spool_dir: PathBuf, mut stop: tokio::sync::watch::Receiver<bool>) {
    let spool = crate::spool::Spool::attach(&spool_dir).ok().map(Arc::new);
    loop {
        let accepted = tokio::select! {
            a = sock.accept() => a,
            _ = stop.changed() => break,
        };
        let Ok((tcp, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let spool = spool.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(tcp, spool)).await;
        });
    }
}

async fn answer(mut tcp: tokio::net::TcpStream, spool: Option<Arc<crate::spool::Spool>>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(buf.get(..n).unwrap_or(&[]));
        if head.len() > 8192 {
            return respond(
                &mut tcp,
                "431 Request Header Fields Too Large",
                "text/plain",
                b"request too large\n",
                true,
            )
            .await;
        }
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let body_too = method != "HEAD";
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let s = spool.clone();
            let text = tokio::task::spawn_blocking(move || get().render(s.as_deref())).await.unwrap_or_default();
            respond(
                &mut tcp,
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text.as_bytes(),
                body_too,
            )
            .await
        }
        ("GET" | "HEAD", "/") => {
            respond(&mut tcp, "200 OK", "text/plain; charset=utf-8", b"mailpolicy admin: GET /metrics\n", body_too)
                .await
        }
        ("GET" | "HEAD", _) => respond(&mut tcp, "404 Not Found", "text/plain", b"not found\n", body_too).await,
        _ => respond(&mut tcp, "405 Method Not Allowed", "text/plain", b"only GET and HEAD\n", true).await,
    }
}

async fn respond(
    tcp: &mut tokio::net::TcpStream,
    status: &str,
    ctype: &str,
    body: &[u8],
    with_body: bool,
) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if with_body {
        out.extend_from_slice(body);
    }
    tcp.write_all(&out).await?;
    tcp.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_counted_once_per_reply_across_pieces() {
        let m = Metrics::new();
        let mut start = true;
        m.replies_in("t", b"250-first\r\n250-SIZE 10\r\n250 HELP\r\n", &mut start);
        m.replies_in("t", b"550 5.1.1 no", &mut start);
        // The rest of that line: "250 " inside it is no reply.
        m.replies_in("t", b" such 250 user\r\n354 go\r\n", &mut start);
        let c = |code: &str, class: &str| {
            m.replies
                .get_or_create(&vec![("listener", "t".into()), ("class", class.into()), ("code", code.into())])
                .get()
        };
        assert_eq!(c("250", "2xx"), 1);
        assert_eq!(c("550", "5xx"), 1);
        assert_eq!(c("354", "3xx"), 1);
        let text = m.render(None);
        assert!(text.contains("mailpolicy_replies_total{listener=\"t\",class=\"2xx\",code=\"250\"} 1"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
