//! The before-queue content filter (R44; Postfix's `smtpd_proxy_filter` with
//! `smtpd_proxy_options = speed_adjust`): a listener with `proxy_filter` queues nothing.
//! When its policy has accepted a message (the data stage ran, milters and the seal
//! included), [`Conn`](crate::conn::Conn) hands it to the host as
//! [`Need::ProxyFilter`](crate::conn::Need::ProxyFilter) instead of `Need::Queue`; the host
//! opens an SMTP session to the filter and drives a [`FilterSession`] over it (bytes in,
//! bytes out, no I/O here); the filter delivers the message to a listener of ours without
//! `proxy_filter` (the re-injection listener), and its reply to end of data, or its
//! failure, goes back through [`Conn::proxied`](crate::conn::Conn::proxied): that reply is
//! the client's. So the filter sees the message before the client has a 250, and nothing
//! is queued twice: the front session stores nothing, the re-injection listener stores
//! what the filter accepted.
//!
//! The session: EHLO (HELO when refused), then, when the filter offers `XFORWARD`, the
//! client's attributes it names (`NAME`, `ADDR`, `PORT`, `PROTO`, `HELO`, `IDENT`,
//! `SOURCE`, as Postfix sends them; Postfix-style proxies pass the re-injection listener's
//! offer through), then MAIL, each RCPT one at a time and the content. Every recipient
//! or none: the client already has a 250 for each, so a recipient the filter refuses
//! refuses the whole message with the filter's reply and no content is sent. No TLS, no
//! AUTH: a filter is a local service.

use crate::client::{Client, ClientConfig, ClientEvent, TlsPolicy, TransactionResult};
use crate::record::{forward_path, mail_params, rcpt_params, reverse_path, QueuedMessage};
use crate::smtp::{Envelope, Recipient, Reply};

/// What [`Need::ProxyFilter`](crate::conn::Need::ProxyFilter) hands the host.
#[derive(Clone, Debug, PartialEq)]
pub struct FilterCall {
    /// The listener's `proxy_filter` (`IP:port` or `unix:/path`).
    pub address: String,
    /// The message as this listener would have queued it; its last `tail` bytes are the
    /// host's (spilled to disk), and go to the filter after `data`.
    pub message: QueuedMessage,
    /// The client's attributes for XFORWARD, unencoded.
    pub xforward: Vec<(&'static str, String)>,
}

/// How a session with the filter ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FilterOutcome {
    /// The filter's reply to the message (2xx, 4xx or 5xx): the client's.
    Replied(Reply),
    /// The filter could not be reached, closed, timed out or broke the protocol (why):
    /// the client gets `451 4.3.0`.
    Failed(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Opening,
    Xforward,
    Sending,
    Done,
}

/// One SMTP session with the before-queue filter, for one message. The host writes
/// [`FilterSession::poll_transmit`], feeds what it reads to
/// [`FilterSession::handle_input`] (EOF: [`FilterSession::handle_eof`]; no reply within
/// `proxy_filter_timeout`: [`FilterSession::handle_timeout`]) until
/// [`FilterSession::outcome`] says how it ended, then flushes the QUIT and closes.
pub struct FilterSession {
    client: Client,
    envelope: Envelope,
    data: Vec<u8>,
    xforward: Vec<(&'static str, String)>,
    step: Step,
    outcome: Option<FilterOutcome>,
}

impl FilterSession {
    /// A session on a fresh connection to the filter; `data` is the whole message.
    pub fn new(helo_name: &str, call: &FilterCall, data: Vec<u8>) -> FilterSession {
        let cfg = ClientConfig {
            helo_name: helo_name.to_string(),
            tls: TlsPolicy::None,
            auth: None,
            pipelining: false,
            chunking: false,
            all_recipients: true,
            ..ClientConfig::default()
        };
        let m = &call.message;
        let recipients = m
            .recipients
            .iter()
            .filter_map(|r| forward_path(&r.address).map(|path| Recipient { path, params: rcpt_params(r) }))
            .collect();
        let envelope = Envelope { from: reverse_path(&m.sender), params: mail_params(m), recipients };
        FilterSession {
            client: Client::new(cfg),
            envelope,
            data,
            xforward: call.xforward.clone(),
            step: Step::Opening,
            outcome: None,
        }
    }

    /// Bytes to write to the filter.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.client.poll_transmit()
    }

    /// How the session ended, once it has.
    pub fn outcome(&self) -> Option<&FilterOutcome> {
        self.outcome.as_ref()
    }

    /// Bytes the filter sent.
    pub fn handle_input(&mut self, bytes: &[u8]) {
        self.client.handle_input(bytes);
        self.advance();
    }

    /// The filter closed the connection.
    pub fn handle_eof(&mut self) {
        self.client.handle_eof();
        self.advance();
        self.fail("the filter closed the connection");
    }

    /// No reply within `proxy_filter_timeout`.
    pub fn handle_timeout(&mut self) {
        self.client.handle_timeout();
        self.advance();
        self.fail("timed out waiting for the filter");
    }

    fn fail(&mut self, why: &str) {
        if self.outcome.is_none() {
            self.outcome = Some(FilterOutcome::Failed(why.to_string()));
            self.step = Step::Done;
        }
    }

    fn advance(&mut self) {
        while let Some(ev) = self.client.poll_event() {
            match (ev, self.step) {
                (ClientEvent::Ready, Step::Opening) => {
                    self.step = Step::Xforward;
                    if self.client.xforward(&self.xforward).is_err() {
                        self.fail("the filter session is not ready");
                    }
                }
                (ClientEvent::Ready, Step::Xforward) => {
                    self.step = Step::Sending;
                    let data = std::mem::take(&mut self.data);
                    if self.client.send_message(&self.envelope, &data).is_err() {
                        self.fail("the filter session is not ready");
                    }
                }
                (ClientEvent::Transaction(t), Step::Sending) => {
                    self.step = Step::Done;
                    self.outcome = Some(answer(&t));
                    self.client.quit();
                }
                (ClientEvent::Failed(e), step) if step != Step::Done => {
                    self.step = Step::Done;
                    self.outcome = Some(FilterOutcome::Failed(format!("{:?}: {}", e.phase, e.reply)));
                }
                _ => {}
            }
        }
    }
}

/// The client's reply from the filter's transaction: MAIL's refusal, else a recipient's
/// (every recipient or none), else the reply to the content. A `421` (the filter closing,
/// or a reply made up for a lost connection) is the filter's failure, not the client's
/// answer.
fn answer(t: &TransactionResult) -> FilterOutcome {
    let reply = if !t.mail.is_positive() {
        t.mail.clone()
    } else {
        match t.recipients.iter().find(|r| !r.is_positive()).or_else(|| t.recipients.first()) {
            Some(r) => r.clone(),
            None => return FilterOutcome::Failed("no recipient reached the filter".into()),
        }
    };
    if reply.code == 421 {
        return FilterOutcome::Failed(format!("the filter answered {reply}"));
    }
    FilterOutcome::Replied(reply)
}

/// The reply a client gets when the filter failed (Postfix answers `451 4.3.0` too).
pub fn unavailable() -> Reply {
    Reply::new(451, (4, 3, 0), "Error: content filter unavailable, try again later")
}

/// The XFORWARD attributes of a session (Postfix's names and conventions: an unknown
/// value is `[UNAVAILABLE]`, an IPv6 address is prefixed `IPV6:`).
pub fn xforward_attributes(facts: &crate::eval::Facts, local: bool) -> Vec<(&'static str, String)> {
    let unavailable = || "[UNAVAILABLE]".to_string();
    let name = if facts.client_name.is_empty() || facts.client_name == "unknown" {
        unavailable()
    } else {
        facts.client_name.clone()
    };
    let addr = match facts.client_ip {
        std::net::IpAddr::V4(a) => a.to_string(),
        std::net::IpAddr::V6(a) => format!("IPV6:{a}"),
    };
    let (helo, proto) = match &facts.helo {
        Some((h, extended)) => (h.clone(), if *extended { "ESMTP" } else { "SMTP" }),
        None => (unavailable(), "SMTP"),
    };
    vec![
        ("NAME", name),
        ("ADDR", addr),
        ("PORT", facts.client_port.to_string()),
        ("PROTO", proto.to_string()),
        ("HELO", helo),
        ("IDENT", if facts.session_id.is_empty() { unavailable() } else { facts.session_id.clone() }),
        ("SOURCE", if local { "LOCAL" } else { "REMOTE" }.to_string()),
    ]
}

/// Fuzz body (`fuzz_targets/filter_replies.rs`): any bytes from a filter, cut anywhere
/// (the first byte says where): the session never panics, an outcome once reached never
/// changes, and at EOF there is one; a reply the client gets is a real 2xx, 4xx or 5xx,
/// never 421.
pub fn fuzz_replies(input: &[u8]) {
    let Some((cut, data)) = input.split_first() else { return };
    let message = QueuedMessage {
        sender: "a@b.test".into(),
        recipients: vec![
            crate::record::QueuedRcpt { address: "c@d.test".into(), ..Default::default() },
            crate::record::QueuedRcpt { address: "e@d.test".into(), ..Default::default() },
        ],
        data: b"Subject: x\r\n\r\nbody\r\n".to_vec(),
        ..Default::default()
    };
    let call = FilterCall { address: "127.0.0.1:10025".into(), message, xforward: vec![("NAME", "h".into())] };
    let mut s = FilterSession::new("mx.test", &call, call.message.data.clone());
    let mut first: Option<FilterOutcome> = None;
    for chunk in data.chunks(usize::from(*cut).max(1)) {
        let _ = s.poll_transmit();
        s.handle_input(chunk);
        if let Some(f) = &first {
            assert_eq!(s.outcome(), Some(f), "an outcome changed");
        }
        first = s.outcome().cloned();
    }
    s.handle_eof();
    match s.outcome() {
        Some(FilterOutcome::Replied(r)) => assert!((200..600).contains(&r.code) && r.code != 421, "{r}"),
        Some(FilterOutcome::Failed(_)) => {}
        None => panic!("no outcome at EOF"),
    }
    if let Some(f) = &first {
        assert_eq!(s.outcome(), Some(f), "EOF changed the outcome");
    }
}

#[cfg(test)]
mod tests;
