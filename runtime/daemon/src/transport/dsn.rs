//! Delivery status notifications (R1, R2): RFC 3464 `multipart/report`
//! messages with RFC 3461 semantics.
//!
//! [`build_dsn`] writes the whole message (CRLF line endings), ready to be
//! queued with the null sender to the original sender:
//!
//! 1. `text/plain`: a human-readable explanation, one paragraph per
//!    recipient with the remote server's reply;
//! 2. `message/delivery-status`: `Reporting-MTA`, `Original-Envelope-Id`
//!    (when ENVID was given, written as xtext the way it came on MAIL, RFC 3461
//!    4.4), `Arrival-Date`; per recipient
//!    `Original-Recipient` (ORCPT), `Final-Recipient`, `Action`, `Status`,
//!    `Remote-MTA`, `Diagnostic-Code`, `Last-Attempt-Date`, and
//!    `Will-Retry-Until` for delays;
//! 3. the original message (`message/rfc822`, RET=FULL) or its header
//!    section (`text/rfc822-headers`, RET=HDRS), cut at a line boundary to
//!    the bounce size limit. Without RET, failures return the full message
//!    and other kinds the headers (Postfix's choice).
//!
//! For a message that came with SMTPUTF8 or has a non-ASCII address
//! ([`Dsn::utf8`]) the report is RFC 6533's: `message/global-delivery-status`
//! (UTF-8 addresses as `utf-8;` values), the original as `message/global`
//! or its header as `message/global-headers`; the DSN is then itself an
//! SMTPUTF8 message (the caller queues it so).
//!
//! [`should_notify`] is the rule for whether a DSN is owed at all.
//! Peer-supplied text (replies, ENVID, addresses) has its control
//! characters replaced, so it cannot forge header fields.

use crate::date::rfc2822 as rfc2822_date;
use crate::smtp::{Notify, Orcpt, Reply, Ret, ReversePath};

use super::driver::DeliveryOutcome;

/// Which notification.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NoticeKind {
    /// Permanent failure (or expiry of the queue lifetime).
    Failure,
    /// Still being retried (delay warning).
    Delay,
    /// Delivered (NOTIFY=SUCCESS).
    Success,
    /// Handed to a next hop that does not speak DSN (NOTIFY=SUCCESS).
    Relayed,
}

/// The `Action:` of one recipient (RFC 3464 2.3.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DsnAction {
    /// `failed`
    Failed,
    /// `delayed`
    Delayed,
    /// `delivered`
    Delivered,
    /// `relayed`
    Relayed,
    /// `expanded`
    Expanded,
}

impl DsnAction {
    /// The field value.
    pub fn as_str(self) -> &'static str {
        match self {
            DsnAction::Failed => "failed",
            DsnAction::Delayed => "delayed",
            DsnAction::Delivered => "delivered",
            DsnAction::Relayed => "relayed",
            DsnAction::Expanded => "expanded",
        }
    }

    /// The usual action for a notification kind.
    pub fn for_kind(kind: NoticeKind) -> DsnAction {
        match kind {
            NoticeKind::Failure => DsnAction::Failed,
            NoticeKind::Delay => DsnAction::Delayed,
            NoticeKind::Success => DsnAction::Delivered,
            NoticeKind::Relayed => DsnAction::Relayed,
        }
    }
}

/// One recipient's block of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DsnRecipient {
    /// The recipient address as delivered (after rewriting).
    pub final_recipient: String,
    /// ORCPT, when the client gave one.
    pub original_recipient: Option<Orcpt>,
    /// Action.
    pub action: DsnAction,
    /// RFC 3463 status.
    pub status: (u8, u16, u16),
    /// The server that gave `diagnostic` (host name).
    pub remote_mta: Option<String>,
    /// The remote (or made-up) reply.
    pub diagnostic: Option<Reply>,
    /// Last attempt, ms since the epoch.
    pub last_attempt: Option<u64>,
    /// For delays: when retries stop, ms since the epoch.
    pub will_retry_until: Option<u64>,
}

impl DsnRecipient {
    /// An entry from a delivery outcome: action from the kind, status from
    /// the reply's enhanced code (else `X.0.0` from its class).
    pub fn from_outcome(
        kind: NoticeKind,
        final_recipient: &str,
        orcpt: Option<&Orcpt>,
        outcome: &DeliveryOutcome,
        remote_mta: Option<&str>,
        now_ms: u64,
    ) -> DsnRecipient {
        let r = outcome.reply();
        DsnRecipient {
            final_recipient: final_recipient.to_string(),
            original_recipient: orcpt.cloned(),
            action: DsnAction::for_kind(kind),
            status: status_of(r),
            remote_mta: remote_mta.map(str::to_string),
            diagnostic: Some(r.clone()),
            last_attempt: Some(now_ms),
            will_retry_until: None,
        }
    }
}

/// The RFC 3463 status of a reply.
pub fn status_of(r: &Reply) -> (u8, u16, u16) {
    let class = (r.code / 100) as u8;
    match r.enhanced {
        Some((c, s, d)) if c == class => (c, s, d),
        _ => (class.clamp(2, 5), 0, 0),
    }
}

/// Everything a DSN says.
#[derive(Clone, Debug)]
pub struct Dsn<'a> {
    /// Which notification.
    pub kind: NoticeKind,
    /// Our host name (`Reporting-MTA`, `From: MAILER-DAEMON@...`).
    pub hostname: &'a str,
    /// The original envelope sender (the DSN's recipient).
    pub sender: &'a ReversePath,
    /// ENVID of the original message.
    pub envid: Option<&'a str>,
    /// RET of the original message.
    pub ret: Option<Ret>,
    /// When we received the original, ms since the epoch.
    pub arrival_date: u64,
    /// Now, ms since the epoch (Date, Message-ID).
    pub now: u64,
    /// Per-recipient entries.
    pub recipients: &'a [DsnRecipient],
    /// The original message (header and body).
    pub message: &'a [u8],
    /// Most octets of the original to return (Postfix `bounce_size_limit`,
    /// 50000); 0: none at all.
    pub size_limit: usize,
    /// The original is an SMTPUTF8 message: report with RFC 6533's media types.
    pub utf8: bool,
}

impl Dsn<'_> {
    /// Whether the report must use RFC 6533's media types: the original came with
    /// SMTPUTF8, or an address it reports on is not ASCII.
    pub fn needs_global(smtputf8: bool, sender: &ReversePath, recipients: &[DsnRecipient]) -> bool {
        let sender_utf8 = match sender {
            ReversePath::Null => false,
            ReversePath::Mailbox(m) => m.is_international(),
        };
        smtputf8
            || sender_utf8
            || recipients.iter().any(|r| {
                !r.final_recipient.is_ascii() || r.original_recipient.as_ref().is_some_and(|o| !o.address.is_ascii())
            })
    }
}

/// Whether a DSN of `kind` is owed for a recipient with these NOTIFY
/// parameters (RFC 3461 4.1): never to the null sender; NOTIFY=NEVER: none;
/// no NOTIFY: FAILURE and DELAY; otherwise only what was asked (SUCCESS
/// covers `Relayed`).
pub fn should_notify(kind: NoticeKind, notify: Option<&Notify>, sender: &ReversePath) -> bool {
    if *sender == ReversePath::Null {
        return false;
    }
    match notify {
        None => matches!(kind, NoticeKind::Failure | NoticeKind::Delay),
        Some(n) if n.never => false,
        Some(n) if !(n.success || n.failure || n.delay) => {
            matches!(kind, NoticeKind::Failure | NoticeKind::Delay)
        }
        Some(n) => match kind {
            NoticeKind::Failure => n.failure,
            NoticeKind::Delay => n.delay,
            NoticeKind::Success | NoticeKind::Relayed => n.success,
        },
    }
}

/// Replaces control characters (CR, LF included) so a value stays on its line.
fn clean(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect::<String>().trim().to_string()
}

fn addr_type(a: &str) -> &'static str {
    if a.is_ascii() {
        "rfc822"
    } else {
        "utf-8"
    }
}

fn diag_text(r: &Reply) -> String {
    let mut s = format!("{}", r.code);
    if let Some((c, sb, d)) = r.enhanced {
        s.push_str(&format!(" {c}.{sb}.{d}"));
    }
    let t = clean(&r.text.replace('\n', " "));
    if !t.is_empty() {
        s.push(' ');
        s.push_str(&t);
    }
    s
}

/// Converts any line endings to CRLF.
fn to_crlf(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 40);
    let mut i = 0;
    while let Some(&b) = data.get(i) {
        match b {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                if data.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => out.extend_from_slice(b"\r\n"),
            _ => out.push(b),
        }
        i += 1;
    }
    out
}

/// The header section (up to, not including, the empty line).
fn header_section(msg: &[u8]) -> &[u8] {
    let mut i = 0;
    while i < msg.len() {
        let rest = msg.get(i..).unwrap_or_default();
        if rest.starts_with(b"\r\n") {
            return msg.get(..i).unwrap_or_default();
        }
        match rest.iter().position(|&b| b == b'\n') {
            Some(p) => i += p + 1,
            None => return msg,
        }
    }
    msg
}

/// Cuts at the last line end at or before `limit`.
fn truncate_lines(msg: &[u8], limit: usize) -> (&[u8], bool) {
    if msg.len() <= limit {
        return (msg, false);
    }
    let head = msg.get(..limit).unwrap_or_default();
    match head.iter().rposition(|&b| b == b'\n') {
        Some(p) => (msg.get(..p + 1).unwrap_or_default(), true),
        None => (&[], true),
    }
}

fn boundary(d: &Dsn<'_>) -> String {
    // unique enough and never found in the parts: it contains "=_", which
    // no other part of our output starts a line with, and the original is
    // checked below
    format!("{}.{}/{}", d.now, std::process::id(), clean(d.hostname))
}

fn fmt_status(s: (u8, u16, u16)) -> String {
    format!("{}.{}.{}", s.0, s.1, s.2)
}

/// Builds the DSN message. See the module documentation.
pub fn build_dsn(d: &Dsn<'_>) -> Vec<u8> {
    let host = clean(d.hostname);
    let original = to_crlf(d.message);
    let ret = d.ret.unwrap_or(match d.kind {
        NoticeKind::Failure => Ret::Full,
        _ => Ret::Hdrs,
    });
    let returned: &[u8] = match ret {
        Ret::Full => &original,
        Ret::Hdrs => header_section(&original),
    };
    let (returned, truncated) = truncate_lines(returned, d.size_limit);
    let mut b = format!("=_{}", boundary(d));
    let mut n = 0;
    while returned.windows(b.len() + 2).any(|w| w.starts_with(b"--") && w.get(2..) == Some(b.as_bytes())) {
        n += 1;
        b = format!("=_{}.{n}", boundary(d));
    }
    let eight_bit = d.utf8
        || !returned.is_ascii()
        || d.recipients
            .iter()
            .any(|r| !r.final_recipient.is_ascii() || r.diagnostic.as_ref().is_some_and(|x| !x.text.is_ascii()));
    let to = match d.sender {
        ReversePath::Null => "<>".to_string(),
        ReversePath::Mailbox(m) => format!("<{}>", clean(&m.to_string())),
    };
    let subject = match d.kind {
        NoticeKind::Failure => "Undelivered Mail Returned to Sender",
        NoticeKind::Delay => "Delayed Mail (still being retried)",
        NoticeKind::Success => "Successful Mail Delivery Report",
        NoticeKind::Relayed => "Mail Relayed to a Server Without Delivery Notifications",
    };
    let mut s = String::new();
    let mut line = |l: &str| {
        s.push_str(l);
        s.push_str("\r\n");
    };
    line(&format!("From: MAILER-DAEMON@{host} (Mail Delivery System)"));
    line(&format!("To: {to}"));
    line(&format!("Subject: {subject}"));
    line(&format!("Date: {}", rfc2822_date(d.now)));
    line(&format!("Message-ID: <{}.{}.dsn@{host}>", d.now, std::process::id()));
    line("Auto-Submitted: auto-replied");
    line("MIME-Version: 1.0");
    line(&format!("Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{b}\""));
    line(&format!("Content-Transfer-Encoding: {}", if eight_bit { "8bit" } else { "7bit" }));
    line("");
    line("This is a MIME-encapsulated message.");
    line("");
    // 1. human readable
    line(&format!("--{b}"));
    line("Content-Description: Notification");
    line("Content-Type: text/plain; charset=utf-8");
    line("");
    line(&format!("This is the mail system at host {host}."));
    line("");
    line(match d.kind {
        NoticeKind::Failure => {
            "I'm sorry to have to inform you that your message could not\r\nbe delivered to one or more recipients. It's attached below."
        }
        NoticeKind::Delay => {
            "Your message could not be delivered yet to one or more recipients.\r\nThe mail system will keep trying; you do not need to resend it."
        }
        NoticeKind::Success => {
            "Your message was successfully delivered to the destination(s)\r\nlisted below, as you asked."
        }
        NoticeKind::Relayed => {
            "Your message was delivered to the destination(s) listed below.\r\nThose servers do not report delivery, so you will get no further\r\nnotification from them."
        }
    });
    line("");
    for r in d.recipients {
        let diag = r.diagnostic.as_ref().map(diag_text).unwrap_or_else(|| fmt_status(r.status));
        let via = r.remote_mta.as_deref().map(|m| format!(" (host {} said)", clean(m))).unwrap_or_default();
        line(&format!("<{}>{via}: {diag}", clean(&r.final_recipient)));
        line("");
    }
    if truncated {
        line(&format!("The returned message was cut to {} octets.", d.size_limit));
        line("");
    }
    // 2. delivery-status
    line(&format!("--{b}"));
    line("Content-Description: Delivery report");
    line(if d.utf8 { "Content-Type: message/global-delivery-status" } else { "Content-Type: message/delivery-status" });
    line("");
    line(&format!("Reporting-MTA: dns; {host}"));
    if let Some(id) = d.envid {
        line(&format!("Original-Envelope-Id: {}", super::client::encode_xtext(id)));
    }
    line(&format!("Arrival-Date: {}", rfc2822_date(d.arrival_date)));
    for r in d.recipients {
        line("");
        if let Some(o) = &r.original_recipient {
            line(&format!("Original-Recipient: {}; {}", clean(&o.addr_type), clean(&o.address)));
        }
        let fr = clean(&r.final_recipient);
        line(&format!("Final-Recipient: {}; {fr}", addr_type(&fr)));
        line(&format!("Action: {}", r.action.as_str()));
        line(&format!("Status: {}", fmt_status(r.status)));
        if let Some(m) = &r.remote_mta {
            line(&format!("Remote-MTA: dns; {}", clean(m)));
        }
        if let Some(x) = &r.diagnostic {
            line(&format!("Diagnostic-Code: smtp; {}", diag_text(x)));
        }
        if let Some(t) = r.last_attempt {
            line(&format!("Last-Attempt-Date: {}", rfc2822_date(t)));
        }
        if let Some(t) = r.will_retry_until {
            if r.action == DsnAction::Delayed {
                line(&format!("Will-Retry-Until: {}", rfc2822_date(t)));
            }
        }
    }
    line("");
    // 3. the original
    line(&format!("--{b}"));
    match ret {
        Ret::Full => {
            line("Content-Description: Undelivered Message");
            line(if d.utf8 { "Content-Type: message/global" } else { "Content-Type: message/rfc822" });
        }
        Ret::Hdrs => {
            line("Content-Description: Message Headers");
            line(if d.utf8 { "Content-Type: message/global-headers" } else { "Content-Type: text/rfc822-headers" });
        }
    }
    line("");
    let mut out = s.into_bytes();
    out.extend_from_slice(returned);
    if !returned.is_empty() && !returned.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{b}--\r\n").as_bytes());
    out
}
