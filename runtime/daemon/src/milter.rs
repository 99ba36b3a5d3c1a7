//! The daemon's side of the milters (spec/language.md, "Milters"): one connection per
//! milter per SMTP session, opened at the session's first milter step (inet or unix
//! socket), driven by the engine's sans-IO [`mailpolicy_engine::milter::Client`], every
//! read and connect under the milter's time-outs. A milter that cannot be reached, is
//! slow or breaks the protocol answers `Err` for that stage and every later one of the
//! session (it is not asked again); `Conn` applies its `default_action`.

use std::time::Duration;

use mailpolicy_engine::conn::{Conn, MilterAnswer, MilterCall};
use mailpolicy_engine::milter::{split_message, Client, Step};
use mailpolicy_lang::ir::{Resource, Stage};
use mailpolicy_lang::resources::{MilterOptions, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A connection to a filter (a milter, or the before-queue filter): TCP or a unix socket.
pub(crate) enum Sock {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Sock {
    pub(crate) async fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Sock::Tcp(s) => s.write_all(b).await,
            Sock::Unix(s) => s.write_all(b).await,
        }
    }
    pub(crate) async fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(b).await,
            Sock::Unix(s) => s.read(b).await,
        }
    }
}

struct One {
    res: Resource,
    opts: MilterOptions,
    sock: Option<Sock>,
    client: Client,
    /// Why this milter is out of the session.
    failed: Option<String>,
}

/// The milters of one session.
pub struct Milters {
    all: Vec<One>,
}

/// A milter's options (every milter scanner has them; the checker lowers them).
fn options(r: &Resource) -> MilterOptions {
    match &r.options {
        Options::Milter(o) => o.clone(),
        _ => MilterOptions::default(),
    }
}

/// Connects to `unix:/path`, `inet:HOST:PORT`, `inet6:[ADDR]:PORT` or `HOST:PORT`.
pub(crate) async fn connect(addr: &str) -> Result<Sock, String> {
    if let Some(path) = addr.strip_prefix("unix:") {
        return tokio::net::UnixStream::connect(path).await.map(Sock::Unix).map_err(|e| format!("connect {addr}: {e}"));
    }
    let hostport = addr.strip_prefix("inet6:").or_else(|| addr.strip_prefix("inet:")).unwrap_or(addr);
    let (host, port) = hostport.rsplit_once(':').ok_or_else(|| format!("{addr}: no port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().map_err(|_| format!("{addr}: bad port"))?;
    tokio::net::TcpStream::connect((host, port)).await.map(Sock::Tcp).map_err(|e| format!("connect {addr}: {e}"))
}

impl One {
    /// Write what the client has queued, then read until it has an outcome.
    async fn pump(&mut self, timeout: Duration) -> Result<Option<mailpolicy_engine::milter::MilterReply>, String> {
        let sock = self.sock.as_mut().ok_or("not connected")?;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            while let Some(b) = self.client.poll_transmit() {
                tokio::time::timeout(timeout, sock.write_all(&b))
                    .await
                    .map_err(|_| "timed out writing".to_string())?
                    .map_err(|e| format!("write: {e}"))?;
            }
            if let Some(o) = self.client.poll_outcome() {
                return Ok(Some(o));
            }
            if self.client.ready() {
                return Ok(None);
            }
            let n = tokio::time::timeout(timeout, sock.read(&mut buf))
                .await
                .map_err(|_| format!("timed out after {}s", timeout.as_secs_f64()))?
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("the milter closed the connection".into());
            }
            self.client.handle_input(buf.get(..n).unwrap_or_default()).map_err(|e| e.0)?;
        }
    }

    async fn open(&mut self) -> Result<(), String> {
        let source = self.res.source.clone().unwrap_or_default();
        let t = self.opts.connect_timeout;
        let sock =
            tokio::time::timeout(t, connect(&source)).await.map_err(|_| format!("connect {source}: timed out"))??;
        self.sock = Some(sock);
        self.pump(t).await.map(|_| ())
    }

    async fn step(&mut self, step: Step, macros: &[(String, String)], message: bool) -> MilterAnswer {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = async {
            if self.sock.is_none() {
                self.open().await?;
            }
            self.client.begin(step, macros).map_err(|e| e.0)?;
            let t = if message { self.opts.content_timeout } else { self.opts.timeout };
            match self.pump(t).await? {
                Some(o) => Ok(o),
                None => Err("the milter gave no answer".to_string()),
            }
        }
        .await;
        if let Err(e) = &r {
            self.failed = Some(e.clone());
            self.sock = None;
        }
        r
    }
}

impl Milters {
    pub fn new(conn: &Conn) -> Milters {
        let all = conn
            .milters()
            .into_iter()
            .map(|r| One { res: r.clone(), opts: options(r), sock: None, client: Client::new(), failed: None })
            .collect();
        Milters { all }
    }

    /// Consult the milters in order on `call`; `whole` is the whole message when part of
    /// it was spilled to disk. Stops at the first answer [`Conn::milter_stops`] on.
    pub async fn call(&mut self, conn: &Conn, call: &MilterCall, whole: Option<&[u8]>) -> Vec<(String, MilterAnswer)> {
        let mut step = call.step.clone();
        if let (Step::Message { headers, body, .. }, Some(w)) = (&mut step, whole) {
            let (h, b) = split_message(w);
            *headers = h;
            *body = b.to_vec();
        }
        let mut out = Vec::new();
        for one in &mut self.all {
            let a = one.step(step.clone(), &call.macros, call.stage == Stage::Data).await;
            let stop = conn.milter_stops(&one.res.name, &a);
            out.push((one.res.name.clone(), a));
            if stop {
                break;
            }
        }
        out
    }

    /// The session ends: each connected milter is told to quit.
    pub async fn quit(&mut self) {
        for one in &mut self.all {
            if let Some(sock) = one.sock.as_mut() {
                one.client.quit();
                if let Some(b) = one.client.poll_transmit() {
                    let _ = tokio::time::timeout(Duration::from_secs(1), sock.write_all(&b)).await;
                }
            }
            one.sock = None;
        }
    }
}
