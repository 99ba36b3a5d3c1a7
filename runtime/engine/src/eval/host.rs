//! The host protocol of the evaluator: what a stage asks the host ([`Request`]), what the
//! host answers ([`Answer`]), and what a stage decides ([`StageVerdict`]: outcome, effects, trace).

use mailpolicy_lang::ir::*;

use crate::smtp::Reply;

/// DNS record types the evaluator asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RrType {
    A,
    Aaaa,
    Mx,
    Txt,
    Ptr,
}

/// Sender-authentication checks the host computes (SPF, DKIM, DMARC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuthCheck {
    Spf,
    Dkim,
    Dmarc,
    DmarcPolicy,
}

impl AuthCheck {
    /// The fact it answers (`spf`, `dkim`, `dmarc`, `dmarc.policy`).
    pub fn name(self) -> &'static str {
        match self {
            AuthCheck::Spf => "spf",
            AuthCheck::Dkim => "dkim",
            AuthCheck::Dmarc => "dmarc",
            AuthCheck::DmarcPolicy => "dmarc.policy",
        }
    }
}

/// What the evaluator needs from the outside world: what a host answers. Sender
/// authentication is not among them: a session's stage asks `Conn` for it
/// ([`SessionStep::SenderAuth`]), and nothing else computes it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Request {
    /// Look `key` up in a table; answer [`Answer::Value`] (None when absent).
    Lookup { table: TableId, key: String },
    /// A DNS query; answer [`Answer::Records`], [`Answer::NxDomain`] or an error.
    Dns { name: String, rtype: RrType },
    /// Count of `counter` events for `key` within the window, the current one included;
    /// answer [`Answer::Count`].
    Rate { counter: Counter, key: String, window_ms: u64 },
    /// Concurrent sessions for `key`; answer [`Answer::Count`].
    Concurrent { key: String },
    /// Scan the message; answer [`Answer::Score`].
    Scan { scanner: ScannerId },
    /// Ask the next hop about the current recipient; answer [`Answer::Reply`].
    Callahead { recipient: String, sender: String },
    /// Should this triplet wait? Answer [`Answer::Bool`] (true: greylisted).
    Greylist { client: String, sender: String, recipient: String, delay_ms: u64, expire_ms: u64 },
    /// Is the BATV tag of this address valid? Answer [`Answer::Bool`].
    BatvValid { address: String },
}

impl Request {
    /// What an operator reads in logs, `mailc test -v` and `mailc explain`: table and
    /// scanner names, not their ids (`lookup users "alice"`, `dns example.com MX`).
    pub fn describe(&self, prog: &Program) -> String {
        match self {
            Request::Lookup { table, key } => {
                let name = prog.tables.get(table.index()).map(|t| t.name.as_str()).unwrap_or("?");
                format!("lookup {name} {key:?}")
            }
            Request::Dns { name, rtype } => format!("dns {name} {}", rtype.name()),
            Request::Rate { counter, key, window_ms } => {
                format!("rate {} by {key} per {}", counter.name(), fmt_duration(*window_ms))
            }
            Request::Concurrent { key } => format!("concurrent by {key}"),
            Request::Scan { scanner } => {
                format!("score {}", prog.scanners.get(scanner.index()).map(|s| s.name.as_str()).unwrap_or("?"))
            }
            Request::Callahead { recipient, sender } => format!("callahead <{recipient}> from <{sender}>"),
            Request::Greylist { client, sender, recipient, .. } => {
                format!("greylist {client} <{sender}> <{recipient}>")
            }
            Request::BatvValid { address } => format!("batv valid <{address}>"),
        }
    }

    /// Does a failed answer to this request decide the stage (4xx) by default?
    pub(super) fn table(&self) -> Option<TableId> {
        match self {
            Request::Lookup { table, .. } => Some(*table),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    Value(Option<String>),
    Records(Vec<String>),
    NxDomain,
    Count(u64),
    Score(f64),
    Reply {
        code: u16,
        text: String,
    },
    Bool(bool),
    /// The back end failed (down, SERVFAIL, refused ...).
    Error(String),
    /// The back end did not answer in time.
    Timeout,
}

impl RrType {
    pub fn name(self) -> &'static str {
        match self {
            RrType::A => "A",
            RrType::Aaaa => "AAAA",
            RrType::Mx => "MX",
            RrType::Txt => "TXT",
            RrType::Ptr => "PTR",
        }
    }
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::Value(Some(v)) => write!(f, "{v:?}"),
            Answer::Value(None) => f.write_str("not found"),
            Answer::Records(r) => write!(f, "{}", r.join(", ")),
            Answer::NxDomain => f.write_str("NXDOMAIN"),
            Answer::Count(n) => write!(f, "{n}"),
            Answer::Score(x) => write!(f, "{x}"),
            Answer::Reply { code, text } => write!(f, "{code} {text}"),
            Answer::Bool(b) => write!(f, "{b}"),
            Answer::Error(e) => write!(f, "error: {e}"),
            Answer::Timeout => f.write_str("timed out"),
        }
    }
}

fn fmt_duration(ms: u64) -> String {
    for (unit, n) in [("w", 604_800_000), ("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)] {
        if ms >= n && ms % n == 0 {
            return format!("{}{unit}", ms / n);
        }
    }
    format!("{ms}ms")
}

impl std::fmt::Display for RenderedTransport {
    /// `smtp [10.0.0.5]:25`, `mx`, `maildir /var/mail/alice/`, with `tls required` and
    /// `auth` when given: as a policy writes it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            TransportKind::Mx => "mx",
            TransportKind::Smtp => "smtp",
            TransportKind::Lmtp => "lmtp",
            TransportKind::Maildir => "maildir",
            TransportKind::Mbox => "mbox",
        };
        f.write_str(kind)?;
        if let Some(d) = &self.dest {
            write!(f, " {d}")?;
        }
        match self.tls {
            TlsMode::Required => f.write_str(" tls required")?,
            TlsMode::Implicit => f.write_str(" tls implicit")?,
            TlsMode::Dane => f.write_str(" tls dane")?,
            TlsMode::Sts => f.write_str(" tls sts")?,
            TlsMode::May | TlsMode::None => {}
        }
        if self.auth.is_some() {
            f.write_str(" auth")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RenderedTransport {
    pub kind: TransportKind,
    pub dest: Option<String>,
    pub tls: TlsMode,
    pub auth: Option<SecretId>,
    /// `:ca "FILE"`: the CA file a verified next hop must chain to.
    #[serde(default)]
    pub ca: Option<String>,
    /// `:cert "FILE" :key "FILE"`: the client certificate and key to present.
    #[serde(default)]
    pub cert: Option<(String, String)>,
    /// For a file-system destination built with interpolation: the directory its literal
    /// prefix names, which the delivery must stay in ([`crate::paths`]).
    #[serde(default)]
    pub root: Option<String>,
}

/// How a stage ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Fell off the end or `stop`: the stage's default (accept; route: deliver mx; bounce:
    /// send; delay: send; deliver: keep the result).
    Default,
    Accept,
    Reject(Reply),
    Tempfail(Reply),
    Discard,
    Deliver(RenderedTransport),
}

/// Effects of non-terminal actions, in the order they ran. The host applies them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    Log(String),
    GreetPause(u64),
    Tarpit(u64),
    Dsn(DsnAction),
    HeaderAdd {
        name: String,
        value: String,
    },
    HeaderRemove(String),
    HeaderReplace {
        name: String,
        value: String,
    },
    /// A field added at the end of the header section (a milter's `SMFIR_ADDHEADER`).
    HeaderAppend {
        name: String,
        value: String,
    },
    /// A field inserted before the `index`-th field (0: first) of the message as received
    /// (a milter's `SMFIR_INSHEADER`).
    HeaderInsert {
        index: u32,
        name: String,
        value: String,
    },
    /// The `index`-th (1-based) field `name` gets `value`; an empty value deletes it; added
    /// at the end when there is no such field (a milter's `SMFIR_CHGHEADER`).
    HeaderChange {
        index: u32,
        name: String,
        value: String,
    },
    Hold(String),
    Redirect(String),
    Bcc(String),
    Archive(String),
    Filter(RenderedTransport),
    RewriteSender(String),
    RewriteRecipient(String),
    Masquerade(Vec<String>),
    /// The recipient expands to these addresses; `owner` is the list owner that becomes
    /// the envelope sender (R39), when the table has `owner-NAME`.
    Expand {
        members: Vec<String>,
        owner: Option<String>,
    },
    /// `expand LIST` with a mailing list (by name): the post goes to its subscribers.
    ExpandList(String),
    Alert {
        to: String,
        text: String,
        every_ms: u64,
    },
    BatvSign,
    /// An access table said RELAY for this client or sender: recipients need not be local.
    RelayGranted,
}

/// One line of the trace `mailc explain` prints.
#[derive(Clone, Debug, PartialEq)]
pub enum Trace {
    Test {
        loc: LocId,
        result: bool,
    },
    Lookup {
        request: Request,
        answer: Answer,
    },
    /// A sender-authentication word `Conn` gave the stage.
    SenderAuth {
        check: AuthCheck,
        answer: Answer,
    },
    Action {
        loc: LocId,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct StageVerdict {
    pub outcome: Outcome,
    /// The rule that decided; None when the stage fell off its end.
    pub decided_by: Option<LocId>,
    pub effects: Vec<Effect>,
    pub trace: Vec<Trace>,
}

/// What [`super::Run::step`] returns: a request for the host, or the stage's verdict.
pub enum Step {
    Need(Request),
    Done(StageVerdict),
}

/// What [`super::Run::step_session`] returns inside a session: a request for the host, a
/// sender-authentication check for `Conn` (answered with
/// [`super::Run::answer_sender_auth`]), or the stage's verdict.
pub enum SessionStep {
    Need(Request),
    SenderAuth(AuthCheck),
    Done(StageVerdict),
}
