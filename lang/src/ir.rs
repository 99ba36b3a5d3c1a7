//! The IR: a flat, serialisable program the runtime evaluates.
//!
//! Strings are interned (`StrId`), lists, tables, secrets, scanners and variables are
//! referenced by index, regular expressions (and `:matches` globs) are compiled once at
//! lowering, and every stage is a flat instruction vector with jumps. Every action carries
//! a `LocId` so a verdict can name the rule (file:line) that made it.

use serde::{Deserialize, Serialize};

macro_rules! id {
    ($($name:ident),*) => {$(
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(pub u32);
        impl $name { pub fn index(self) -> usize { self.0 as usize } }
    )*};
}
id!(StrId, ListId, TableId, SecretId, ScannerId, VarId, PatId, ExprId, LocId);

/// The stages, in the order a message meets them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Stage {
    Connect,
    Helo,
    Auth,
    Mail,
    Rcpt,
    Data,
    Route,
    Deliver,
    Bounce,
    Delay,
}

impl Stage {
    pub const ALL: [Stage; 10] = [
        Stage::Connect,
        Stage::Helo,
        Stage::Auth,
        Stage::Mail,
        Stage::Rcpt,
        Stage::Data,
        Stage::Route,
        Stage::Deliver,
        Stage::Bounce,
        Stage::Delay,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Stage::Connect => "connect",
            Stage::Helo => "helo",
            Stage::Auth => "auth",
            Stage::Mail => "mail",
            Stage::Rcpt => "rcpt",
            Stage::Data => "data",
            Stage::Route => "route",
            Stage::Deliver => "deliver",
            Stage::Bounce => "bounce",
            Stage::Delay => "delay",
        }
    }
    pub fn from_name(s: &str) -> Option<Stage> {
        Stage::ALL.iter().copied().find(|st| st.name() == s)
    }
    pub fn index(self) -> usize {
        self as usize
    }
    /// Session stages answer an SMTP command; queue stages run on the queue side.
    pub fn is_session(self) -> bool {
        self <= Stage::Data
    }
    pub fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// A set of stages as a bit mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stages(pub u16);

impl Stages {
    pub const NONE: Stages = Stages(0);
    pub const ALL: Stages = Stages(0x3ff);
    pub const SESSION: Stages = Stages(0x3f);
    pub const QUEUE: Stages = Stages(0x3c0);
    /// From `first` through `delay`.
    pub const fn from(first: Stage) -> Stages {
        Stages(0x3ff & !((1u16 << first as u16) - 1))
    }
    pub const fn range(first: Stage, last: Stage) -> Stages {
        Stages((0x3ff & !((1u16 << first as u16) - 1)) & ((1u16 << (last as u16 + 1)) - 1))
    }
    pub const fn one(s: Stage) -> Stages {
        Stages(1 << s as u16)
    }
    pub const fn with(self, s: Stage) -> Stages {
        Stages(self.0 | (1 << s as u16))
    }
    pub const fn union(self, o: Stages) -> Stages {
        Stages(self.0 | o.0)
    }
    pub fn contains(self, s: Stage) -> bool {
        self.0 & s.bit() != 0
    }
    pub fn first(self) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| self.contains(*s))
    }
    pub fn iter(self) -> impl Iterator<Item = Stage> {
        Stage::ALL.into_iter().filter(move |s| self.contains(*s))
    }
    /// "rcpt, route and deliver"
    pub fn describe(self) -> String {
        let names: Vec<&str> = self.iter().map(|s| s.name()).collect();
        match names.len() {
            0 => "no stage".into(),
            1 => names[0].into(),
            n => format!("{} and {}", names[..n - 1].join(", "), names[n - 1]),
        }
    }
}

/// Value types of facts and expressions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ty {
    Bool,
    Str,
    /// A list of strings (a header's values, `dsn.notify`, `recipients`).
    List,
    Ip,
    Num,
    Size,
    Duration,
}

impl Ty {
    pub fn name(self) -> &'static str {
        match self {
            Ty::Bool => "a yes/no test",
            Ty::Str => "a string",
            Ty::List => "a list of strings",
            Ty::Ip => "an IP address",
            Ty::Num => "a number",
            Ty::Size => "a size",
            Ty::Duration => "a duration",
        }
    }
}

macro_rules! facts {
    ($($variant:ident = $name:literal : $ty:ident, $stages:expr, $cap:expr, $doc:literal;)*) => {
        /// Every fact a policy can read. `spec/language.md` has the same table.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum Fact { $($variant),* }
        impl Fact {
            pub const ALL: &'static [Fact] = &[$(Fact::$variant),*];
            pub fn info(self) -> FactInfo {
                match self {
                    $(Fact::$variant => FactInfo { name: $name, ty: Ty::$ty, stages: $stages, capability: $cap, doc: $doc }),*
                }
            }
            pub fn from_name(name: &str) -> Option<Fact> {
                match name { $($name => Some(Fact::$variant),)* _ => None }
            }
        }
    };
}

#[derive(Clone, Copy, Debug)]
pub struct FactInfo {
    pub name: &'static str,
    pub ty: Ty,
    pub stages: Stages,
    pub capability: Option<&'static str>,
    pub doc: &'static str,
}

use Stage::*;
const ALL: Stages = Stages::ALL;
const RCPTISH: Stages = Stages::one(Rcpt).with(Route).with(Deliver).with(Bounce).with(Delay);

facts! {
    True = "true": Bool, ALL, None, "always true";
    False = "false": Bool, ALL, None, "always false";
    ClientIp = "client.ip": Ip, ALL, None, "the connecting client's IP address";
    ClientPort = "client.port": Num, ALL, None, "the client's TCP port";
    ClientName = "client.name": Str, ALL, None, "the client's forward-confirmed reverse DNS name, or \"unknown\"";
    ClientPtr = "client.ptr": Str, ALL, None, "the client's PTR name as found, unverified, or empty";
    ClientNetwork = "client.network": Str, ALL, None, "the client's /24 (IPv4) or /64 (IPv6) network, e.g. \"192.0.2.0/24\"";
    ClientFcrdns = "client.fcrdns": Bool, ALL, None, "the PTR name resolves back to client.ip";
    LocalIp = "local.ip": Ip, ALL, None, "the address the client connected to";
    LocalPort = "local.port": Num, ALL, None, "the port the client connected to";
    Listener = "listener": Str, ALL, None, "the name of the listener that accepted the connection";
    SessionId = "session.id": Str, ALL, None, "a unique id of the SMTP session";
    SessionErrors = "session.errors": Num, Stages::SESSION, None, "error replies sent in this session so far";
    Tls = "tls": Bool, ALL, None, "the session is encrypted (STARTTLS done or implicit TLS)";
    TlsVersion = "tls.version": Str, ALL, None, "TLS protocol version, e.g. \"TLSv1.3\", or empty";
    TlsCipher = "tls.cipher": Str, ALL, None, "TLS cipher suite, or empty";
    TlsClientCert = "tls.client_cert": Bool, ALL, None, "the client presented a certificate that verified";
    TlsClientFingerprint = "tls.client_fingerprint": Str, ALL, None, "SHA-256 fingerprint of the client certificate, hex with colons";
    HeloName = "helo.name": Str, Stages::from(Helo), None, "the name given in HELO or EHLO";
    HeloExtended = "helo.extended": Bool, Stages::from(Helo), None, "the client said EHLO rather than HELO";
    Authenticated = "authenticated": Bool, Stages::from(Auth), None, "the client authenticated with SMTP AUTH";
    AuthUser = "auth.user": Str, Stages::from(Auth), None, "the authenticated login, or empty";
    AuthMechanism = "auth.mechanism": Str, Stages::from(Auth), None, "the SASL mechanism used (`local` for a local submission, spec/cli.md), or empty";
    Sender = "sender": Str, Stages::from(Mail), None, "the envelope sender (MAIL FROM), empty for the null sender <>";
    SenderLocal = "sender.local": Str, Stages::from(Mail), None, "the sender's local part";
    SenderDomain = "sender.domain": Str, Stages::from(Mail), None, "the sender's domain, lower case";
    MailSize = "mail.size": Size, Stages::from(Mail), None, "the size the client declared with SIZE=, or 0";
    MailBody = "mail.body": Str, Stages::from(Mail), None, "BODY= parameter: \"7BIT\", \"8BITMIME\" or \"BINARYMIME\"";
    MailSmtputf8 = "mail.smtputf8": Bool, Stages::from(Mail), None, "the client asked for SMTPUTF8";
    DsnRet = "dsn.ret": Str, Stages::from(Mail), None, "RET= parameter: \"FULL\", \"HDRS\" or empty";
    DsnEnvid = "dsn.envid": Str, Stages::from(Mail), None, "ENVID= parameter, decoded, or empty";
    Recipient = "recipient": Str, RCPTISH, None, "the recipient address being decided";
    RecipientLocal = "recipient.local": Str, RCPTISH, None, "the recipient's local part";
    RecipientDomain = "recipient.domain": Str, RCPTISH, None, "the recipient's domain, lower case";
    RecipientDetail = "recipient.detail": Str, RCPTISH, None, "the part of the local part after the first `+`, or empty";
RecipientIsLocal = "recipient.is_local": Bool, RCPTISH, None, "the recipient's domain is one of the server's local_domains (default: its hostname and localhost) (R34)";
        RecipientRouting = "recipient.routing": Bool, RCPTISH, None, "the local part holds `%`, `!` or `@`, or a source route was given (R15)";
    DsnNotify = "dsn.notify": List, RCPTISH, None, "NOTIFY= values, upper case; empty when the client gave none";
    DsnOrcpt = "dsn.orcpt": Str, RCPTISH, None, "ORCPT= parameter, decoded, or empty";
    RecipientsCount = "recipients.count": Num, Stages::from(Rcpt), None, "recipients accepted so far in this transaction";
    Recipients = "recipients": List, Stages::from(Data), None, "all accepted recipients of the message";
    MessageSize = "message.size": Size, Stages::from(Data), None, "the message's size in bytes";
    Body = "body": Str, Stages::from(Data), None, "the decoded text parts of the message body";
    AttachmentNames = "attachment.names": List, Stages::from(Data), None, "file names of the MIME attachments";
    AttachmentTypes = "attachment.types": List, Stages::from(Data), None, "content types of the MIME parts, lower case";
    QueueId = "queue.id": Str, Stages::from(Route), None, "the queue id of the message";
    Spf = "spf": Str, Stages::from(Mail), Some("spf"), "SPF result for client.ip and sender (or helo.name for <>): pass, fail, softfail, neutral, none, temperror, permerror";
    Dkim = "dkim": Str, Stages::from(Data), Some("dkim"), "best DKIM verification result: pass, fail, neutral, none, temperror, permerror";
    Dmarc = "dmarc": Str, Stages::from(Data), Some("dmarc"), "DMARC result for the From: domain: pass, fail, none, temperror, permerror";
    DmarcPolicy = "dmarc.policy": Str, Stages::from(Data), Some("dmarc"), "the From: domain's published policy: none, quarantine, reject, or empty";
    DnsblZone = "dnsbl.zone": Str, Stages::from(Connect), Some("dnsbl"), "zone of the last DNSBL or RHSBL test that was true";
    DnsblAnswer = "dnsbl.answer": Str, Stages::from(Connect), Some("dnsbl"), "the A record that list returned";
    DnsblText = "dnsbl.text": Str, Stages::from(Connect), Some("dnsbl"), "the TXT record that list returned, or empty";
    CallaheadCode = "callahead.code": Num, Stages::one(Rcpt), Some("callahead"), "the next hop's reply code to the call-ahead RCPT";
    CallaheadText = "callahead.text": Str, Stages::one(Rcpt), Some("callahead"), "the next hop's reply text";
    DeliveryCode = "delivery.code": Num, Stages::one(Deliver), None, "reply code of this delivery attempt (0 when no reply: connection failure)";
    DeliveryStatus = "delivery.status": Str, Stages::one(Deliver), None, "enhanced status code of this attempt, e.g. \"5.1.1\"";
    DeliveryText = "delivery.text": Str, Stages::one(Deliver), None, "the remote reply text or the local error";
    DeliveryHost = "delivery.host": Str, Stages::one(Deliver), None, "the host this attempt talked to";
    DeliveryAttempts = "delivery.attempts": Num, Stages::one(Deliver), None, "attempts so far for this recipient, this one included";
    QueueAge = "queue.age": Duration, Stages::one(Deliver).with(Bounce).with(Delay), None, "time since the message was queued";
    BounceType = "bounce.type": Str, Stages::one(Bounce), None, "kind of DSN about to be sent: failure, delay or success";
    BounceReason = "bounce.reason": Str, Stages::one(Bounce), None, "the status text the DSN reports";
    TimeHour = "time.hour": Num, ALL, None, "hour of day, 0-23, in UTC";
}

/// A value the evaluator computes, possibly by asking the host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Val {
    Fact(Fact),
    /// A variable set with `set NAME = ...;` (empty string when unset).
    Var(VarId),
    /// All values of a header field (name lower case), unfolded and decoded.
    Header(StrId),
    /// The value a table maps `key` to, empty when absent.
    Lookup {
        table: TableId,
        key: Box<Val>,
    },
    /// Events counted for `key` in the sliding window, the current one included.
    Rate {
        counter: Counter,
        key: Box<Val>,
        window_ms: u64,
    },
    /// Concurrent sessions from `key`, this one included.
    Concurrent {
        key: Box<Val>,
    },
    /// The scanner's spam score of the message.
    Score(ScannerId),
    /// A literal string (used where a value is compared with another value).
    Lit(StrId),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Counter {
    Connections,
    Messages,
    Recipients,
    Errors,
    AuthFailures,
    /// Messages with the null sender (MAIL FROM:<>), i.e. bounces (R30).
    Bounces,
}

impl Counter {
    pub fn from_name(s: &str) -> Option<Counter> {
        Some(match s {
            "connections" => Counter::Connections,
            "messages" => Counter::Messages,
            "recipients" => Counter::Recipients,
            "errors" => Counter::Errors,
            "auth_failures" => Counter::AuthFailures,
            "bounces" => Counter::Bounces,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Counter::Connections => "connections",
            Counter::Messages => "messages",
            Counter::Recipients => "recipients",
            Counter::Errors => "errors",
            Counter::AuthFailures => "auth_failures",
            Counter::Bounces => "bounces",
        }
    }
    /// The first stage at which the counted event has happened.
    pub fn first_stage(self) -> Stage {
        match self {
            Counter::Connections | Counter::Errors => Stage::Connect,
            Counter::AuthFailures => Stage::Auth,
            Counter::Messages | Counter::Bounces => Stage::Mail,
            Counter::Recipients => Stage::Rcpt,
        }
    }
}

/// A string with `${...}` interpolations.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Template(pub Vec<Part>);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Part {
    Lit(StrId),
    Val(Val),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MatchOp {
    Is,
    Contains,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// What `in` looks in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SetRef {
    List(ListId),
    Table(TableId),
    /// An inline list of literal strings.
    Strings(Vec<StrId>),
    /// An inline list of networks.
    Nets(Vec<Cidr>),
}

/// A condition. All comparisons of strings ignore ASCII case.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Expr {
    Const(bool),
    Not(ExprId),
    All(Vec<ExprId>),
    Any(Vec<ExprId>),
    /// A boolean fact or variable.
    Truth(Val),
    /// `:is` / `:contains` against any of the operands; list values match when any element does.
    Match {
        lhs: Val,
        op: MatchOp,
        rhs: Vec<Template>,
    },
    /// `:regex` / `:matches` (compiled to a regex) against any of the patterns.
    Pattern {
        lhs: Val,
        pats: Vec<PatId>,
    },
    In {
        lhs: Val,
        set: SetRef,
    },
    Cmp {
        lhs: Val,
        op: CmpOp,
        rhs: f64,
    },
    /// A number compared with a value known at run time (`var.NAME` or a number fact): false
    /// when either side is not a number, so an absent table limit limits nothing.
    CmpVal {
        lhs: Val,
        op: CmpOp,
        rhs: Val,
    },
    IsNull(Val),
    Flag(VarId),
    /// The client IP (connect) is listed in the DNS blocklist zone.
    Dnsbl {
        zone: StrId,
        returns: Vec<StrId>,
    },
    /// The domain is listed in the RHS blocklist zone.
    Rhsbl {
        zone: StrId,
        domain: Val,
        returns: Vec<StrId>,
    },
    /// The domain has an MX, A or AAAA record (R20).
    Resolvable(Val),
    /// The name is a syntactically fully qualified domain name.
    Fqdn(Val),
    /// The recipient carries a valid, unexpired BATV (prvs) tag (R29).
    BatvValid,
    /// The next hop accepted the recipient in a call-ahead (R27).
    Callahead,
    /// This (client network, sender, recipient) triplet must wait (B7).
    Greylist {
        delay_ms: u64,
        expire_ms: u64,
    },
    /// Authenticated, and the sender address is not owned by auth.user in the table (R8).
    LoginMismatch(TableId),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub code: u16,
    pub enhanced: (u16, u16, u16),
    pub text: Template,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TransportKind {
    Mx,
    Smtp,
    Lmtp,
    Maildir,
    Mbox,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsMode {
    /// Use STARTTLS when offered (opportunistic).
    May,
    /// Defer rather than send in clear.
    Required,
    /// Never start TLS.
    None,
    /// TLS from the first byte (RFC 8314: a smarthost's port 465), the certificate
    /// verified as with `Required`; never STARTTLS, never clear.
    Implicit,
    /// DANE for SMTP (RFC 7672) where the next hop's DNSSEC-validated TLSA records say so,
    /// else MTA-STS (RFC 8461) where the recipient domain publishes a policy, else `May`.
    Dane,
    /// MTA-STS (RFC 8461) where the recipient domain publishes a policy, else `May`.
    Sts,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transport {
    pub kind: TransportKind,
    /// Host, `[host]:port`, `unix:/path`, or a folder, depending on the kind.
    pub dest: Option<Template>,
    pub tls: TlsMode,
    /// Credentials for client AUTH to a smarthost (R10): a secret holding "user:password".
    pub auth: Option<SecretId>,
    /// `:ca "FILE"`: the PEM file of the CAs a `:tls required` next hop's certificate must
    /// chain to (a private CA), relative to the policy's folder.
    #[serde(default)]
    pub ca: Option<StrId>,
    /// `:cert "FILE" :key "FILE"`: the client certificate chain and its private key (PEM)
    /// presented to next hops that ask for one, relative to the policy's folder.
    #[serde(default)]
    pub cert: Option<(StrId, StrId)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DsnAction {
    /// Rewrite NOTIFY to NEVER (R3b).
    NotifyNever,
    /// Remove SUCCESS from NOTIFY (R4).
    DenySuccess,
    /// Ask for headers only in bounces.
    RetHeaders,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Rewrite {
    To(Template),
    Map(TableId),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Action {
    Accept,
    Reject(Reply),
    Tempfail(Reply),
    /// Reject with the next hop's own reply from the call-ahead.
    RejectCallahead,
    Discard,
    Stop,
    Set {
        var: VarId,
        value: Option<Template>,
    },
    Unset(VarId),
    Log(Template),
    GreetPause(u64),
    Tarpit(u64),
    Dsn(DsnAction),
    HeaderAdd {
        name: StrId,
        value: Template,
    },
    HeaderRemove(StrId),
    HeaderReplace {
        name: StrId,
        value: Template,
    },
    Hold(Option<Template>),
    Redirect(Template),
    Bcc(Template),
    Archive(Template),
    Filter(Transport),
    Deliver(Transport),
    RewriteSender(Rewrite),
    RewriteRecipient(Rewrite),
    Masquerade(Vec<StrId>),
    Expand(TableId),
    /// `expand LIST` with a mailing list: the post goes to its subscribers (index into
    /// `Program::mailing_lists`).
    ExpandList(u32),
    Alert {
        to: Template,
        text: Template,
        every_ms: u64,
    },
    BatvSign,
    Access(TableId, AccessDelay),
}

/// `access TABLE :delay [friend|hater]` (sendmail's `delay_checks`, R17): whether a
/// refusal the table gives at connect, helo, auth or mail waits for each recipient.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccessDelay {
    /// The refusal is given at once.
    #[default]
    Now,
    /// Every recipient gets the refusal but those whose `To:` entry says FRIEND.
    Friend,
    /// Only recipients whose `To:` entry says HATER get the refusal.
    Hater,
}

impl Action {
    /// Whether the action always ends the stage.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Action::Accept
                | Action::Reject(_)
                | Action::Tempfail(_)
                | Action::RejectCallahead
                | Action::Discard
                | Action::Stop
                | Action::Deliver(_)
        )
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Instr {
    /// Evaluate `cond`; when false continue at `else_pc`.
    If {
        cond: ExprId,
        else_pc: u32,
        loc: LocId,
    },
    Jump(u32),
    Do {
        action: Action,
        loc: LocId,
    },
}

/// Where a rule is: shown in verdicts, logs and `mailc explain`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loc {
    pub file: u32,
    pub line: u32,
    pub col: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ListKind {
    Strings,
    Domains,
    Cidr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = a.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(Cidr { addr, prefix })
    }
    /// The network with its host bits cleared (`172.16.0.0/2` is `128.0.0.0/2`).
    pub fn network(&self) -> Cidr {
        use std::net::IpAddr::*;
        let addr = match self.addr {
            V4(a) => {
                let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix.min(32)) };
                V4(std::net::Ipv4Addr::from(u32::from(a) & mask))
            }
            V6(a) => {
                let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - self.prefix.min(128)) };
                V6(std::net::Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Cidr { addr, prefix: self.prefix }
    }
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::*;
        let ip = match ip {
            V6(v6) if self.addr.is_ipv4() => match v6.to_ipv4_mapped() {
                Some(v4) => V4(v4),
                None => return false,
            },
            other => other,
        };
        match (self.addr, ip) {
            (V4(net), V4(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (V6(net), V6(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - self.prefix) };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct List {
    pub name: String,
    pub kind: ListKind,
    /// Lower-cased strings or domains (a leading `.` matches subdomains only).
    pub items: Vec<String>,
    /// For `cidr` lists.
    pub nets: Vec<Cidr>,
}

/// A checked option value, before the checker lowers it into its typed field
/// (`crate::settings`, `crate::resources`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum OptValue {
    Str(String),
    Num(f64),
    Size(u64),
    Duration(u64),
    Bool(bool),
    Word(String),
    List(Vec<String>),
    Secret(SecretId),
    Table(TableId),
    ListRef(ListId),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Resource {
    pub name: String,
    /// `map`, `ldap`, `env`, `rspamd`, ...
    pub kind: String,
    pub source: Option<String>,
    /// Its options, typed by kind (`crate::resources`).
    pub options: crate::resources::Options,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scope {
    /// Set in connect, helo or auth: lives for the session.
    Session,
    /// Set in mail, rcpt or data: cleared by RSET and at the end of each message.
    Transaction,
    /// Set on the queue side: lives with the queued message.
    Message,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Var {
    pub name: String,
    pub scope: Scope,
}

/// A compiled pattern. Serialised as its source; compiled once when built or deserialised.
#[derive(Clone, Debug)]
pub struct Pattern {
    pub source: String,
    pub regex: regex::Regex,
}

/// Limits on regexes compiled from policies (bytes of compiled program).
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;

impl Pattern {
    pub fn new(source: &str) -> Result<Pattern, regex::Error> {
        let regex = regex::RegexBuilder::new(source)
            .case_insensitive(true)
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(REGEX_SIZE_LIMIT)
            .build()?;
        Ok(Pattern { source: source.to_string(), regex })
    }
}

impl PartialEq for Pattern {
    fn eq(&self, o: &Pattern) -> bool {
        self.source == o.source
    }
}

impl Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Pattern, D::Error> {
        let s = String::deserialize(d)?;
        Pattern::new(&s).map_err(serde::de::Error::custom)
    }
}

/// A compiled policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Program {
    pub files: Vec<String>,
    pub strings: Vec<String>,
    pub capabilities: Vec<String>,
    pub lists: Vec<List>,
    pub tables: Vec<Resource>,
    pub secrets: Vec<Resource>,
    pub scanners: Vec<Resource>,
    /// `mailing_list NAME = newsletter "ADDRESS" { ... }`: `source` is the list's address.
    #[serde(default)]
    pub mailing_lists: Vec<Resource>,
    pub server: crate::settings::Server,
    pub listeners: Vec<crate::settings::Listener>,
    pub vars: Vec<Var>,
    pub patterns: Vec<Pattern>,
    pub exprs: Vec<Expr>,
    /// One instruction vector per stage, indexed by `Stage::index()`.
    pub stages: Vec<Vec<Instr>>,
    pub locs: Vec<Loc>,
}

impl Program {
    pub fn str(&self, id: StrId) -> &str {
        self.strings.get(id.index()).map(String::as_str).unwrap_or("")
    }
    pub fn expr(&self, id: ExprId) -> &Expr {
        &self.exprs[id.index()]
    }
    pub fn stage(&self, stage: Stage) -> &[Instr] {
        self.stages.get(stage.index()).map(Vec::as_slice).unwrap_or(&[])
    }
    /// `file:line` of a location, for verdicts and logs.
    pub fn describe_loc(&self, loc: LocId) -> String {
        match self.locs.get(loc.index()) {
            Some(l) => format!("{}:{}", self.files.get(l.file as usize).map(String::as_str).unwrap_or("?"), l.line),
            None => "?".into(),
        }
    }
    pub fn list_by_name(&self, name: &str) -> Option<ListId> {
        self.lists.iter().position(|l| l.name == name).map(|i| ListId(i as u32))
    }
    pub fn table_by_name(&self, name: &str) -> Option<TableId> {
        self.tables.iter().position(|l| l.name == name).map(|i| TableId(i as u32))
    }
    pub fn listener(&self, name: &str) -> Option<&crate::settings::Listener> {
        self.listeners.iter().find(|l| l.name == name)
    }

    /// The listener `name`, or every listener default when it is not declared (or `None`).
    pub fn listener_or_default(&self, name: Option<&str>) -> &crate::settings::Listener {
        name.and_then(|n| self.listener(n)).unwrap_or_else(|| crate::settings::default_listener())
    }
}
