//! The records the queue is made of, shared by the connection that makes them, the spool
//! that writes them, and the scheduler, the queue-side stages and the tools that read them:
//! a queued message with the record of its session ([`QueuedMessage`], [`SessionRecord`]),
//! queue ids, queues, classes, per-recipient state, a message as listed; and the one
//! function that builds a queue-side stage's facts from a record ([`stage_facts`]), used by
//! both hosts (the daemon's queue manager and call-ahead, `mailc test`'s `route:` and
//! `bounce:` lines), so a transcript evaluates `route` and `bounce` over what the daemon does.
//!
//! On disk (the spool's message files) a record is JSON: [`FORMAT`] names its version,
//! and every field has a default, so a file written by an older version stays readable.

use mailpolicy_lang::ir::Program;
use serde::{Deserialize, Serialize};

use crate::conn::local_domains;
use crate::eval::{AuthWords, DeliveryFacts, Facts, MessageFacts, RcptFacts, RenderedTransport, State, TlsFacts};

/// The version of the record format: the number in a message file's first line
/// ([`MAGIC`]) and a state file's `v`. A reader refuses other versions.
pub const FORMAT: u32 = 1;

// ---------------------------------------------------------------- the spool's encoding
//
// A message file is `MAGIC`, the [`Meta`] line (JSON), the message bytes, `TRAILER`; a
// state file is one [`StateFile`] (JSON). The spool (daemon crate) does the file I/O.

/// First line of every message file (its version is [`FORMAT`]).
pub const MAGIC: &[u8] = b"MAILPOLICY-SPOOL 1\n";
/// Last bytes of every message file: a file without them was cut short.
pub const TRAILER: &[u8] = b"\nEND\n";
/// Largest envelope line a reader accepts (a guard against reading junk into memory).
pub const MAX_META: u64 = 64 << 20;

/// The envelope line of a message file.
#[derive(Serialize, Deserialize)]
pub struct Meta {
    pub id: QueueId,
    pub class: Class,
    pub arrived_ms: u64,
    pub data_len: u64,
    /// The queued message with `data` empty (the bytes follow the line).
    pub envelope: QueuedMessage,
}

/// The mutable part of a message: one small file in `state/`, rewritten atomically.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    pub v: u32,
    pub attempts: u32,
    pub next_attempt_ms: u64,
    pub delay_warned: bool,
    pub rcpts: Vec<RcptState>,
}

impl StateFile {
    /// The state of a message nobody has tried yet (no state file).
    pub fn initial(rcpts: usize, arrived_ms: u64) -> StateFile {
        StateFile {
            v: FORMAT,
            attempts: 0,
            next_attempt_ms: arrived_ms,
            delay_warned: false,
            rcpts: vec![RcptState::Pending; rcpts],
        }
    }
}

/// The header (magic and envelope line) of a message file.
pub fn encode_header(id: &QueueId, class: Class, arrived_ms: u64, msg: &QueuedMessage) -> std::io::Result<Vec<u8>> {
    // Everything but the data (which may be large): no copy of it for the header.
    let envelope = QueuedMessage {
        sender: msg.sender.clone(),
        recipients: msg.recipients.clone(),
        ret: msg.ret.clone(),
        envid: msg.envid.clone(),
        data: Vec::new(),
        hold: msg.hold.clone(),
        archive: msg.archive.clone(),
        filter: msg.filter.clone(),
        batv_sign: msg.batv_sign,
        client_ip: msg.client_ip.clone(),
        helo: msg.helo.clone(),
        auth_user: msg.auth_user.clone(),
        added_headers: msg.added_headers.clone(),
        session: msg.session.clone(),
        copy: msg.copy,
        list: msg.list.clone(),
        tail: msg.tail,
    };
    let data_len = (msg.data.len() as u64).saturating_add(msg.tail);
    let meta = Meta { id: id.clone(), class, arrived_ms, data_len, envelope };
    let mut out = MAGIC.to_vec();
    serde_json::to_writer(&mut out, &meta).map_err(std::io::Error::other)?;
    out.push(b'\n');
    Ok(out)
}

/// Decode the envelope line of a message file.
pub fn decode_meta(line: &[u8]) -> Result<Meta, String> {
    serde_json::from_slice(line).map_err(|e| format!("envelope: {e}"))
}

/// Decode a state file of a message with `rcpts` recipients.
pub fn decode_state(bytes: &[u8], rcpts: usize) -> Result<StateFile, String> {
    let st: StateFile = serde_json::from_slice(bytes).map_err(|e| format!("state file: {e}"))?;
    if st.v != FORMAT {
        return Err(format!("state file version {}", st.v));
    }
    if st.rcpts.len() != rcpts {
        return Err(format!("state file has {} recipients, the envelope {rcpts}", st.rcpts.len()));
    }
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_version_and_magic_agree() {
        assert_eq!(MAGIC, format!("MAILPOLICY-SPOOL {FORMAT}\n").as_bytes());
    }

    #[test]
    fn records_round_trip_and_old_fields_default() {
        let msg = QueuedMessage {
            sender: "a@example.org".into(),
            recipients: vec![QueuedRcpt { address: "b@example.com".into(), ..QueuedRcpt::default() }],
            data: b"Subject: x\r\n\r\nbody\r\n".to_vec(),
            ..QueuedMessage::default()
        };
        let id = QueueId::generate(1_795_341_600_000, 7, 0xBEEF);
        let head = encode_header(&id, Class::Normal, 5, &msg).expect("encode");
        let line = head.strip_prefix(MAGIC).expect("magic first");
        let meta = decode_meta(line).expect("decode");
        assert_eq!(meta.id, id);
        assert_eq!(meta.data_len, msg.data.len() as u64);
        assert_eq!(meta.envelope.recipients, msg.recipients);
        assert!(meta.envelope.data.is_empty(), "the data follows the line, not in it");
        // A record written before a field existed still reads.
        let old = br#"{"id":"AB12","class":"normal","arrived_ms":1,"data_len":0,"envelope":{"sender":""}}"#;
        assert_eq!(decode_meta(old).expect("old record").envelope.session, SessionRecord::default());
        let st = StateFile::initial(1, 5);
        let bytes = serde_json::to_vec(&st).expect("state");
        assert_eq!(decode_state(&bytes, 1), Ok(st.clone()));
        assert!(decode_state(&bytes, 2).is_err());
        let newer = serde_json::to_vec(&StateFile { v: FORMAT + 1, ..st }).expect("state");
        assert!(decode_state(&newer, 1).unwrap_err().contains("version"));
    }

    #[test]
    fn the_queue_side_reads_the_sessions_sender_authentication() {
        let rcpt = QueuedRcpt { address: "b@example.com".into(), ..QueuedRcpt::default() };
        let mut msg = QueuedMessage { recipients: vec![rcpt.clone()], ..QueuedMessage::default() };
        msg.session.sender_auth.spf = Some("softfail".into());
        let id = QueueId::generate(1_795_341_600_000, 7, 0xBEEF);
        let head = encode_header(&id, Class::Normal, 5, &msg).expect("encode");
        let meta = decode_meta(head.strip_prefix(MAGIC).expect("magic")).expect("decode");
        assert_eq!(meta.envelope.session.sender_auth.spf.as_deref(), Some("softfail"));
        let prog = mailpolicy_lang::compile("p", &mailpolicy_lang::MemLoader::single("p", "require [\"spf\"];\n"))
            .program
            .expect("compiles");
        let at = InQueue { queue_id: "AB12", now_ms: 10, arrived_ms: 5 };
        let (f, _) = stage_facts(&prog, &meta.envelope, QueueStage::Route(&rcpt), at);
        let words = f.recorded_auth.expect("queue-side facts carry the record's results");
        assert_eq!(words.get(crate::eval::AuthCheck::Spf), Some("softfail"));
        assert_eq!(words.get(crate::eval::AuthCheck::Dkim), None, "not computed: read as temperror");
    }
}

/// A recipient of a queued message, with what the policy decided about it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct QueuedRcpt {
    pub address: String,
    /// NOTIFY as stored (after `dsn notify never` / `dsn deny success`); empty = not given.
    pub notify: Vec<String>,
    pub orcpt: String,
    /// The address as the client wrote it, when the server took its BATV tag off (R29).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub batv_tagged: String,
}

/// What the queue side needs of the session that received a message: the facts the
/// route, deliver, bounce and delay stages can still read, and the variables as they were
/// at the end of `data`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SessionRecord {
    pub client_port: u16,
    pub client_name: String,
    pub client_ptr: String,
    pub local_ip: String,
    pub local_port: u16,
    pub listener: String,
    pub session_id: String,
    pub tls_version: String,
    pub tls_cipher: String,
    pub tls_client_cert: bool,
    pub tls_client_fingerprint: String,
    pub helo_extended: bool,
    pub auth_mechanism: String,
    pub mail_size: u64,
    pub mail_body: String,
    pub smtputf8: bool,
    /// One slot per policy variable (`Program::vars`).
    pub vars: Vec<Option<String>>,
    pub dnsbl_hit: Option<(String, String, String)>,
    pub local_domains: Vec<String>,
    /// The sender-authentication results the session computed for the message.
    #[serde(skip_serializing_if = "AuthWords::is_empty")]
    pub sender_auth: AuthWords,
}

impl SessionRecord {
    /// The snapshot of a message the server makes itself (alerts, DSNs): no client, but the
    /// server's local domains, so the queue-side stages route it like any other.
    pub fn internal(prog: &Program, hostname: &str) -> SessionRecord {
        SessionRecord { local_domains: local_domains(prog, hostname), ..SessionRecord::default() }
    }

    /// The session's facts and variables for a queue-side stage on `m` and `rcpt` (see
    /// [`stage_facts`], the one caller).
    fn restore(&self, m: &QueuedMessage, rcpt: Option<&QueuedRcpt>, prog: &Program, now_ms: u64) -> (Facts, State) {
        let mut f = Facts { now_ms, ..Facts::default() };
        f.client_ip = m.client_ip.parse().unwrap_or(f.client_ip);
        f.client_port = self.client_port;
        f.client_name = self.client_name.clone();
        f.client_ptr = self.client_ptr.clone();
        f.client_fcrdns = self.client_name != "unknown" && !self.client_name.is_empty();
        f.local_ip = self.local_ip.parse().unwrap_or(f.local_ip);
        f.local_port = self.local_port;
        f.listener = self.listener.clone();
        f.session_id = self.session_id.clone();
        if !self.tls_version.is_empty() {
            f.tls = Some(TlsFacts {
                version: self.tls_version.clone(),
                cipher: self.tls_cipher.clone(),
                client_cert: self.tls_client_cert,
                client_fingerprint: self.tls_client_fingerprint.clone(),
            });
        }
        if !m.helo.is_empty() {
            f.helo = Some((m.helo.clone(), self.helo_extended));
        }
        if !m.auth_user.is_empty() {
            f.auth = Some((m.auth_user.clone(), self.auth_mechanism.clone()));
        }
        f.recorded_auth = Some(self.sender_auth.clone());
        f.sender = Some(m.sender.clone());
        f.mail_size = self.mail_size;
        f.mail_body = self.mail_body.clone();
        f.smtputf8 = self.smtputf8;
        f.dsn_ret = m.ret.clone();
        f.dsn_envid = m.envid.clone();
        f.recipient = rcpt.map(|r| RcptFacts {
            address: r.address.clone(),
            routing: false,
            notify: r.notify.clone(),
            orcpt: r.orcpt.clone(),
            batv_tagged: (!r.batv_tagged.is_empty()).then(|| r.batv_tagged.clone()),
        });
        f.recipients = m.recipients.iter().map(|r| r.address.clone()).collect();
        // The queue side sees what the data stage saw: the header section and the body's
        // first `IN_MEMORY` bytes (a 25 MB message is not parsed whole); `message.size` is all.
        let head = crate::headers::header_end(&m.data);
        let seen = m.data.get(..head.saturating_add(crate::config::IN_MEMORY as usize)).unwrap_or(&m.data);
        let mut facts = MessageFacts::parse(seen);
        facts.size = m.data.len() as u64;
        f.message = Some(facts);
        let mut st = State::new(prog);
        for (slot, v) in st.vars.iter_mut().zip(&self.vars) {
            *slot = v.clone();
        }
        st.dnsbl_hit = self.dnsbl_hit.clone();
        if !self.local_domains.is_empty() {
            f.local_domains = self.local_domains.clone();
        }
        (f, st)
    }
}

/// Every field has a default so a spool written by an older version stays readable.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct QueuedMessage {
    /// Envelope sender, "" for the null sender.
    pub sender: String,
    pub recipients: Vec<QueuedRcpt>,
    /// RET and ENVID.
    pub ret: String,
    pub envid: String,
    /// The message with the policy's header changes applied and a Received: header.
    pub data: Vec<u8>,
    /// Quarantine reason when the policy said `hold`.
    pub hold: Option<String>,
    pub archive: Vec<String>,
    pub filter: Option<RenderedTransport>,
    /// Sign the envelope sender with BATV on delivery.
    pub batv_sign: bool,
    pub client_ip: String,
    pub helo: String,
    pub auth_user: String,
    /// Headers the policy added, in order (also already in `data`).
    pub added_headers: Vec<(String, String)>,
    /// The receiving session, for the queue-side stages.
    pub session: SessionRecord,
    /// A copy the queue made (route-stage `bcc`): it makes no further copies.
    pub copy: bool,
    /// The mailing list this copy is a post to (`expand LIST`): each recipient is a
    /// subscriber, delivered with the list's VERP sender and its List-* headers.
    pub list: Option<String>,
    /// Bytes of the message that follow `data` and that the host holds (the session's
    /// spill file, `Session::take_spill`); the spool appends them when it stores.
    #[serde(skip)]
    pub tail: u64,
}

/// A queue-side evaluation and what it is about.
#[derive(Clone, Debug)]
pub enum QueueStage<'a> {
    /// `route` for one recipient of the message.
    Route(&'a QueuedRcpt),
    /// `deliver` after an attempt to one recipient, with what the attempt gave.
    Deliver(&'a QueuedRcpt, DeliveryFacts),
    /// `bounce` for a DSN of `kind` (`failure`, `delay`, `success`) to `to` about the
    /// message, for `reason`; the DSN's sender is the null sender.
    Bounce { to: &'a str, kind: &'a str, reason: &'a str },
    /// `delay` for the message.
    Delay,
    /// `route` asked where mail to a recipient would go before any message exists
    /// (call-ahead, R27): the message is a [`QueuedMessage::probe`], and has no content.
    Probe(&'a QueuedRcpt),
}

/// Where a message stands in the queue.
#[derive(Clone, Copy, Debug, Default)]
pub struct InQueue<'a> {
    pub queue_id: &'a str,
    pub now_ms: u64,
    pub arrived_ms: u64,
}

/// The facts and variables of a queue-side stage on `msg`: the facts its session had
/// (client, TLS, HELO, AUTH, sender, recipients, message, variables at the end of `data`)
/// and what the stage is about. The one builder both hosts use.
pub fn stage_facts(prog: &Program, msg: &QueuedMessage, stage: QueueStage<'_>, at: InQueue<'_>) -> (Facts, State) {
    let bounce_rcpt;
    let rcpt = match &stage {
        QueueStage::Route(r) | QueueStage::Deliver(r, _) | QueueStage::Probe(r) => Some(*r),
        QueueStage::Bounce { to, .. } => {
            bounce_rcpt = QueuedRcpt { address: to.to_string(), ..QueuedRcpt::default() };
            Some(&bounce_rcpt)
        }
        QueueStage::Delay => None,
    };
    let (mut f, st) = msg.session.restore(msg, rcpt, prog, at.now_ms);
    f.queue_id = at.queue_id.to_string();
    f.queue_age_ms = at.now_ms.saturating_sub(at.arrived_ms);
    match stage {
        QueueStage::Deliver(_, delivery) => f.delivery = Some(delivery),
        QueueStage::Bounce { kind, reason, .. } => {
            f.sender = Some(String::new());
            f.bounce = Some((kind.to_string(), reason.to_string()));
        }
        QueueStage::Probe(_) => f.message = None,
        QueueStage::Route(_) | QueueStage::Delay => {}
    }
    (f, st)
}

impl QueuedMessage {
    /// The message call-ahead asks the route stage about: `sender` to `recipient`, with the
    /// server's local domains and no content.
    pub fn probe(sender: &str, recipient: &str, local_domains: Vec<String>) -> QueuedMessage {
        QueuedMessage {
            sender: sender.to_string(),
            recipients: vec![QueuedRcpt { address: recipient.to_string(), ..QueuedRcpt::default() }],
            session: SessionRecord { local_domains, ..SessionRecord::default() },
            ..QueuedMessage::default()
        }
    }
}

/// A queue id: alphanumeric ASCII, 1 to 64 characters (so it is always a safe file name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct QueueId(String);

impl QueueId {
    /// Check a queue id given by a user or read from disk.
    pub fn parse(s: &str) -> Option<QueueId> {
        (!s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric())).then(|| QueueId(s.to_string()))
    }

    /// A new id: 12 hex digits of the arrival time in ms, a 24-bit counter and the
    /// process's 16 random bits, so ids sort by arrival.
    pub fn generate(now_ms: u64, counter: u32, node: u16) -> QueueId {
        QueueId(format!("{:012X}{:06X}{:04X}", now_ms & 0xFFFF_FFFF_FFFF, counter & 0xFF_FFFF, node))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for QueueId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        QueueId::parse(&s).ok_or_else(|| format!("invalid queue id {s:?}"))
    }
}

impl From<QueueId> for String {
    fn from(id: QueueId) -> String {
        id.0
    }
}

impl std::fmt::Display for QueueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The queues of R31, each a directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueName {
    Incoming,
    Active,
    Deferred,
    Hold,
    Corrupt,
}

impl QueueName {
    pub const ALL: [QueueName; 5] =
        [QueueName::Incoming, QueueName::Active, QueueName::Deferred, QueueName::Hold, QueueName::Corrupt];

    pub fn as_str(self) -> &'static str {
        match self {
            QueueName::Incoming => "incoming",
            QueueName::Active => "active",
            QueueName::Deferred => "deferred",
            QueueName::Hold => "hold",
            QueueName::Corrupt => "corrupt",
        }
    }
}

impl std::fmt::Display for QueueName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The queue class (R30): bounces are scheduled in their own lane.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    #[default]
    Normal,
    Bounce,
}

/// Where one recipient stands. Times are ms since the epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum RcptState {
    #[default]
    Pending,
    Delivered {
        at: u64,
        reply: String,
    },
    Failed {
        at: u64,
        reply: String,
    },
    Deferred {
        attempts: u32,
        next_at: u64,
        last_reply: String,
    },
}

impl RcptState {
    /// Delivered or failed: nothing more to do for this recipient.
    pub fn is_final(&self) -> bool {
        matches!(self, RcptState::Delivered { .. } | RcptState::Failed { .. })
    }

    /// The last reply seen for this recipient, if any.
    pub fn reply(&self) -> Option<&str> {
        match self {
            RcptState::Pending => None,
            RcptState::Delivered { reply, .. } | RcptState::Failed { reply, .. } => Some(reply),
            RcptState::Deferred { last_reply, .. } => Some(last_reply),
        }
    }
}

/// One recipient in a [`Summary`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RcptSummary {
    pub address: String,
    pub state: RcptState,
}

/// A message as listed (no data read). Serialised for the daemon's public listing
/// socket (`daemon/control.rs`, `showq`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub id: QueueId,
    pub queue: QueueName,
    pub class: Class,
    pub arrived_ms: u64,
    /// Size of the message data in bytes.
    pub size: u64,
    pub sender: String,
    /// The policy's quarantine reason, for messages stored on `hold`.
    pub hold_reason: Option<String>,
    pub rcpts: Vec<RcptSummary>,
    pub attempts: u32,
    pub next_attempt_ms: u64,
    pub delay_warned: bool,
}

impl Summary {
    /// The most informative reply: the last one of a recipient that is not done.
    pub fn last_reply(&self) -> Option<&str> {
        self.rcpts
            .iter()
            .filter(|r| !r.state.is_final())
            .find_map(|r| r.state.reply())
            .or_else(|| self.rcpts.iter().find_map(|r| r.state.reply()))
    }
}

/// The reverse path of a stored sender (`""` is the null sender).
pub fn reverse_path(addr: &str) -> crate::smtp::ReversePath {
    if addr.is_empty() {
        return crate::smtp::ReversePath::Null;
    }
    crate::smtp::parse_reverse_path(&format!("<{addr}>"), true).unwrap_or(crate::smtp::ReversePath::Null)
}

/// The forward path of a stored recipient, or `None` when it does not parse.
pub fn forward_path(addr: &str) -> Option<crate::smtp::ForwardPath> {
    crate::smtp::parse_forward_path(&format!("<{addr}>"), true).ok()
}

/// The MAIL parameters a stored message is sent on with (SIZE, BODY, SMTPUTF8, RET, ENVID).
pub fn mail_params(m: &QueuedMessage) -> crate::smtp::MailParams {
    use crate::smtp::{BodyType, MailParams, Ret};
    MailParams {
        size: Some(m.data.len() as u64 + m.tail),
        body: match m.session.mail_body.as_str() {
            "8BITMIME" => BodyType::EightBitMime,
            "BINARYMIME" => BodyType::BinaryMime,
            _ => BodyType::SevenBit,
        },
        smtputf8: m.session.smtputf8,
        ret: match m.ret.as_str() {
            "HDRS" => Some(Ret::Hdrs),
            "FULL" => Some(Ret::Full),
            _ => None,
        },
        envid: (!m.envid.is_empty()).then(|| m.envid.clone()),
        auth: None,
    }
}

/// A stored recipient's NOTIFY.
pub fn notify_of(r: &QueuedRcpt) -> Option<crate::smtp::Notify> {
    if r.notify.is_empty() {
        return None;
    }
    let has = |w: &str| r.notify.iter().any(|n| n == w);
    Some(crate::smtp::Notify {
        never: has("NEVER"),
        success: has("SUCCESS"),
        failure: has("FAILURE"),
        delay: has("DELAY"),
    })
}

/// A stored recipient's ORCPT.
pub fn orcpt_of(r: &QueuedRcpt) -> Option<crate::smtp::Orcpt> {
    let (t, a) = r.orcpt.split_once(';')?;
    Some(crate::smtp::Orcpt { addr_type: t.to_string(), address: a.to_string() })
}

/// A stored recipient's RCPT parameters.
pub fn rcpt_params(r: &QueuedRcpt) -> crate::smtp::RcptParams {
    crate::smtp::RcptParams { notify: notify_of(r), orcpt: orcpt_of(r) }
}
