//! The `server { }` and `listener NAME { }` settings, typed. **Adding an option is one line
//! here**: its name and field type, its default, the kind of value the checker accepts, and
//! its documentation. From that line come the field of [`Server`] or [`Listener`] the hosts
//! read, its default (`Default`), the checker's schema ([`SERVER`], [`LISTENER`]: what may
//! be written, with the help text "did you mean" and type errors show), and the default
//! shown in the language server; `tests/check.rs` checks spec/language.md's settings tables
//! against it. A default that depends on something else (the machine's hostname, another
//! option, the protocol) is an `Option` whose `Text` default says so, resolved by one method
//! here or by the one host function that knows the missing piece.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ir::{ListId, OptValue, SecretId, TableId};
use crate::schema::{OptSpec, OptTy};

/// The default of an option, as data: what `Default` gives the field and what the
/// documentation says.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Dflt {
    /// Unset, and nothing said about it.
    None,
    /// Unset (`None`), with what that means in words ("the machine's hostname").
    Text(&'static str),
    Str(&'static str),
    Num(u64),
    /// Bytes.
    Size(u64),
    /// Milliseconds.
    Ms(u64),
    Bool(bool),
    Word(&'static str),
    Strings(&'static [&'static str]),
}

impl Dflt {
    /// The default as the documentation writes it (`25M`, `5m`, `false`), if any.
    pub fn text(&self) -> Option<String> {
        Some(match *self {
            Dflt::None => return None,
            Dflt::Text(t) | Dflt::Str(t) | Dflt::Word(t) => t.to_string(),
            Dflt::Num(n) => n.to_string(),
            Dflt::Size(n) => size_text(n),
            Dflt::Ms(n) => duration_text(n),
            Dflt::Bool(b) => b.to_string(),
            Dflt::Strings(v) => format!("[{}]", v.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ")),
        })
    }
}

/// Bytes in the language's size syntax (`50K`, `25M`).
pub fn size_text(n: u64) -> String {
    for (unit, f) in [("G", 1u64 << 30), ("M", 1 << 20), ("K", 1 << 10)] {
        if n >= f && n % f == 0 {
            return format!("{}{unit}", n / f);
        }
    }
    n.to_string()
}

/// Milliseconds in the language's duration syntax (`5d`, `4h`, `10s`).
pub fn duration_text(ms: u64) -> String {
    for (unit, f) in [("d", 86_400_000u64), ("h", 3_600_000), ("m", 60_000), ("s", 1000)] {
        if ms >= f && ms % f == 0 {
            return format!("{}{unit}", ms / f);
        }
    }
    format!("{ms}ms")
}

/// A field type an option can have: built from its default, set from the checked value.
pub trait OptField: Sized {
    fn from_default(d: &Dflt) -> Self;
    /// False when `v` is not a value of this type (the checker makes that impossible).
    fn set(&mut self, v: &OptValue) -> bool;
}

impl OptField for String {
    fn from_default(d: &Dflt) -> Self {
        match d {
            Dflt::Str(s) | Dflt::Word(s) => s.to_string(),
            _ => String::new(),
        }
    }
    fn set(&mut self, v: &OptValue) -> bool {
        match v {
            OptValue::Str(s) | OptValue::Word(s) => *self = s.clone(),
            _ => return false,
        }
        true
    }
}

impl OptField for u64 {
    fn from_default(d: &Dflt) -> Self {
        match d {
            Dflt::Num(n) | Dflt::Size(n) | Dflt::Ms(n) => *n,
            _ => 0,
        }
    }
    fn set(&mut self, v: &OptValue) -> bool {
        match v {
            OptValue::Num(n) => *self = *n as u64,
            OptValue::Size(n) | OptValue::Duration(n) => *self = *n,
            _ => return false,
        }
        true
    }
}

impl OptField for Duration {
    fn from_default(d: &Dflt) -> Self {
        match d {
            Dflt::Ms(n) => Duration::from_millis(*n),
            _ => Duration::ZERO,
        }
    }
    fn set(&mut self, v: &OptValue) -> bool {
        match v {
            OptValue::Duration(n) => *self = Duration::from_millis(*n),
            _ => return false,
        }
        true
    }
}

impl OptField for bool {
    fn from_default(d: &Dflt) -> Self {
        matches!(d, Dflt::Bool(true))
    }
    fn set(&mut self, v: &OptValue) -> bool {
        match v {
            OptValue::Bool(b) => *self = *b,
            _ => return false,
        }
        true
    }
}

impl OptField for Vec<String> {
    fn from_default(d: &Dflt) -> Self {
        match d {
            Dflt::Strings(v) => v.iter().map(|s| s.to_string()).collect(),
            _ => Vec::new(),
        }
    }
    fn set(&mut self, v: &OptValue) -> bool {
        match v {
            OptValue::List(l) => *self = l.clone(),
            _ => return false,
        }
        true
    }
}

/// Options that are unset by default: a value when the policy gives one.
impl<T: OptField> OptField for Option<T> {
    fn from_default(d: &Dflt) -> Self {
        match d {
            Dflt::None | Dflt::Text(_) => None,
            d => Some(T::from_default(d)),
        }
    }
    fn set(&mut self, v: &OptValue) -> bool {
        let mut t = T::from_default(&Dflt::None);
        let ok = t.set(v);
        if ok {
            *self = Some(t);
        }
        ok
    }
}

/// References to declarations, which have no default of their own.
macro_rules! ref_field {
    ($ty:ty, $variant:ident) => {
        impl OptField for $ty {
            fn from_default(_: &Dflt) -> Self {
                Self(0)
            }
            fn set(&mut self, v: &OptValue) -> bool {
                match v {
                    OptValue::$variant(id) => *self = *id,
                    _ => return false,
                }
                true
            }
        }
    };
}
ref_field!(SecretId, Secret);
ref_field!(TableId, Table);
ref_field!(ListId, ListRef);

/// An option that is one of some words, as an enum.
macro_rules! words {
    ($(#[$m:meta])* pub enum $name:ident { $($variant:ident = $word:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub enum $name {
            #[default]
            $($variant),+
        }

        impl $name {
            pub const WORDS: &'static [&'static str] = &[$($word),+];
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $word),+
                }
            }
            pub fn from_word(w: &str) -> Option<$name> {
                match w {
                    $($word => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl OptField for $name {
            fn from_default(d: &Dflt) -> Self {
                match d {
                    Dflt::Word(w) => $name::from_word(w).unwrap_or_default(),
                    _ => $name::default(),
                }
            }
            fn set(&mut self, v: &OptValue) -> bool {
                match v {
                    OptValue::Word(w) => match $name::from_word(w) {
                        Some(x) => *self = x,
                        None => return false,
                    },
                    _ => return false,
                }
                true
            }
        }
    };
}

pub(crate) use words;

words! {
    /// `log_format`.
    pub enum LogFormat { Text = "text", Json = "json" }
}
words! {
    /// `state_on_error`.
    pub enum StateOnError { Tempfail = "tempfail", Local = "local" }
}
words! {
    /// `backup_on_error`.
    pub enum BackupOnError { Accept = "accept", Tempfail = "tempfail" }
}
words! {
    /// `log`: where log lines go.
    pub enum LogTarget { Stderr = "stderr", Syslog = "syslog", Journal = "journal" }
}
words! {
    /// `syslog_facility`.
    pub enum SyslogFacility {
        Mail = "mail", Daemon = "daemon", Local0 = "local0", Local1 = "local1", Local2 = "local2",
        Local3 = "local3", Local4 = "local4", Local5 = "local5", Local6 = "local6", Local7 = "local7"
    }
}
words! {
    /// `syslog_format`.
    pub enum SyslogFormat { Rfc3164 = "rfc3164", Rfc5424 = "rfc5424" }
}
words! {
    /// A listener's `protocol`.
    pub enum Protocol { Smtp = "smtp", Submission = "submission", Submissions = "submissions", Http = "http" }
}
words! {
    /// A listener's `tls`.
    pub enum Tls { None = "none", Starttls = "starttls", Required = "required" }
}
words! {
    /// A listener's `client_certs`.
    pub enum ClientCerts { None = "none", Request = "request", Require = "require" }
}
words! {
    /// A listener's `auth`.
    pub enum Auth { None = "none", Optional = "optional", Required = "required" }
}

/// One settings block: its struct, `Default`, schema and setter, from one list of options.
macro_rules! settings {
    (
        $(#[$m:meta])*
        pub struct $name:ident, $specs:ident [ $( $fixed:ident : $fty:ty ),* ] {
            $( $field:ident : $ty:ty = $dflt:expr, $oty:expr, $doc:literal; )*
        }
    ) => {
        $(#[$m])*
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        pub struct $name {
            $( pub $fixed: $fty, )*
            $( #[doc = $doc] pub $field: $ty, )*
        }

        /// What may be written in the block: one entry per field of the struct.
        pub const $specs: &[OptSpec] = &[
            $( OptSpec { name: stringify!($field), ty: $oty, doc: $doc, default: $dflt }, )*
        ];

        impl Default for $name {
            fn default() -> $name {
                $name {
                    $( $fixed: Default::default(), )*
                    $( $field: <$ty as OptField>::from_default(&$dflt), )*
                }
            }
        }

        impl $name {
            /// Sets option `name` from its checked value; false when the block has no such
            /// option or the value is of another type (the checker rules out both).
            pub fn set(&mut self, name: &str, v: &OptValue) -> bool {
                match name {
                    $( stringify!($field) => OptField::set(&mut self.$field, v), )*
                    _ => false,
                }
            }
        }
    };
}

pub(crate) use settings;

use OptTy::*;

const MECHANISMS: &[&str] = &["SCRAM-SHA-256", "PLAIN", "LOGIN"];

settings! {
    /// `server { }`.
    pub struct Server, SERVER [] {
        hostname: Option<String> = Dflt::Text("the machine's hostname"), Str,
            "the name this server gives in its banner, EHLO and Received: headers";
        spool: Option<String> = Dflt::Text("/var/spool/mailpolicy; the embedded default policy's is ./var/spool under the working directory"), Str,
            "directory of the queue, relative to the policy's directory";
        user: Option<String> = Dflt::Text("none: started as root, the daemon refuses to run"), Str,
            "the account the daemon runs as (Postfix mail_owner): started as root, it binds its listeners, gives the spool to this user, then drops to it for good; `root` runs as root on purpose";
        group: Option<String> = Dflt::Text("the user's primary group"), Str,
            "the group the daemon runs as after the drop, and the maildrop's group";
        maildir: Option<String> = Dflt::Text("var/mail under the working directory"), Str,
            "root of local Maildir delivery when `deliver maildir` has no folder, relative to the policy's directory";
        local_domains: Option<ListId> = Dflt::Text("hostname and localhost"), List,
            "domains delivered on this machine";
        networks: Option<ListId> = Dflt::Text("127.0.0.0/8 and ::1"), List,
            "a cidr list of trusted client networks (Postfix mynetworks)";
        non_smtpd_milters: Vec<String> = Dflt::Strings(&[]), Strings,
            "the milters local submissions (mailc sendmail) go through, by name (Postfix non_smtpd_milters)";
        relay_domains: Option<ListId> = Dflt::Text("none"), List,
            "a domains list of the domains this server relays to for any client (a backup MX's or gateway's domains, Postfix relay_domains)";
        max_message_size: u64 = Dflt::Size(25 << 20), Size, "largest message accepted (R46)";
        max_recipients: u64 = Dflt::Num(100), Num, "recipients per message (R46)";
        max_header_size: u64 = Dflt::Size(100 << 10), Size, "largest header section (R46)";
        hopcount_limit: u64 = Dflt::Num(50), Num,
            "Received: fields a message may carry: one with more is refused at the end of DATA with 554 5.4.6 as a mail loop (Postfix hopcount_limit)";
        queue_minfree: Option<u64> = Dflt::Text("1.5 × max_message_size (the listener's, when it sets one)"), Size,
            "free space the spool's file system must keep: MAIL is refused with 452 4.3.1 below it, or below it plus the SIZE the client declares";
        max_sessions: u64 = Dflt::Num(200), Num, "concurrent SMTP sessions over all listeners";
        client_connection_limit: u64 = Dflt::Num(50), Num,
            "concurrent sessions from one client address, 0 for no limit (Postfix anvil)";
        queue_run: Duration = Dflt::Ms(5 * 60_000), Duration, "interval between deferred-queue scans (R31)";
        retry_min: Duration = Dflt::Ms(5 * 60_000), Duration, "first retry delay (R31)";
        retry_max: Duration = Dflt::Ms(4_000_000), Duration, "longest retry delay (R31)";
        queue_lifetime: Duration = Dflt::Ms(5 * 86_400_000), Duration, "give up and bounce after this (R31)";
        bounce_lifetime: Duration = Dflt::Ms(5 * 86_400_000), Duration, "queue lifetime of bounces";
        delay_warning: Duration = Dflt::Ms(4 * 3_600_000), Duration, "send a delay DSN after this, 0 for never (R31)";
        bounce_size_limit: u64 = Dflt::Size(50_000), Size, "largest original message returned in a bounce (R31)";
        bounce_rate: Option<u64> = Dflt::Text("no limit"), Num,
            "bounces delivered per minute before they queue behind normal mail (R30)";
        destination_concurrency: u64 = Dflt::Num(20), Num, "parallel deliveries per destination (R31)";
        connection_cache_time_limit: Duration = Dflt::Ms(5_000), Duration,
            "how long an outbound SMTP/LMTP session waits idle for the next message to the same destination, 0 for no reuse (Postfix smtp_connection_cache_time_limit)";
        connection_reuse_count_limit: u64 = Dflt::Num(0), Num,
            "most messages sent over one outbound session, 0 for no limit (Postfix smtp_connection_reuse_count_limit)";
        connection_reuse_time_limit: Duration = Dflt::Ms(300_000), Duration,
            "an outbound session older than this is not reused (Postfix smtp_connection_reuse_time_limit)";
        max_lookups: u64 = Dflt::Num(100), Num, "network lookups one message may cause";
        lookup_timeout: Duration = Dflt::Ms(10_000), Duration, "default time-out of a lookup";
        dns_timeout: Duration = Dflt::Ms(5_000), Duration, "time-out of a DNS query";
        dns_server: Option<String> = Dflt::Text("the resolvers of /etc/resolv.conf"), Str,
            "IP:port of the DNS resolver to ask";
        batv_keys: Option<SecretId> = Dflt::Text("none"), Secret, "BATV signing keys, one `NUMBER KEY` per line (R29)";
        batv_lifetime: Duration = Dflt::Ms(7 * 86_400_000), Duration, "how long a BATV tag stays valid (R29)";
        dkim_key: Option<SecretId> = Dflt::Text("none"), Secret, "PEM private key for DKIM signing (B7)";
        dkim_selector: Option<String> = Dflt::Text("none"), Str, "DKIM selector";
        dkim_domain: Option<String> = Dflt::Text("the sender's domain"), Str, "DKIM signing domain (d=)";
        postmaster: Option<String> = Dflt::Text("postmaster@ + hostname"), Str,
            "address that receives alerts and double bounces";
        alert_from: Option<String> = Dflt::Text("postmaster@ + hostname"), Str, "sender address of alert mails (R7)";
        tls_ca: Option<String> = Dflt::Text("the system's trust store"), Str,
            "PEM file of the CAs that next hops with `:tls required` must chain to, for every transport without its own `:ca` (Postfix smtp_tls_CAfile)";
        mta_sts_ca: Option<String> = Dflt::Text("the system's trust store"), Str,
            "PEM file of the CAs an MTA-STS policy host (`https://mta-sts.DOMAIN/`) must chain to, for a private CA (RFC 8461)";
        mta_sts_port: u64 = Dflt::Num(443), Num,
            "TCP port of MTA-STS policy hosts: 443 as RFC 8461 says; another only for tests against a loopback policy server";
        tls_report_interval: Duration = Dflt::Ms(86_400_000), Duration,
            "how often the TLS-RPT aggregate reports (RFC 8460) of outbound sessions under `:tls dane` or `:tls sts` are sent, 0 for never";
        tls_report_org: Option<String> = Dflt::Text("the hostname"), Str, "organization-name of the TLS-RPT reports this server sends";
        fallback_relay: Option<String> = Dflt::Text("none"), Str, "host MX delivery goes to when every MX host failed temporarily or the MX lookup did, as a `deliver smtp` destination (R33, Postfix smtp_fallback_relay)";
        soft_bounce: bool = Dflt::Bool(false), Bool,
            "turn every 5xx the policy or a delivery gives into 4xx (R40 soft-bounce mode)";
        warn_only: bool = Dflt::Bool(false), Bool, "log what reject and tempfail would do, and accept (R40 warn-only mode)";
        log_format: LogFormat = Dflt::Word("text"), Word(LogFormat::WORDS), "log line format";
        state: String = Dflt::Str("local"), Str,
            "where rate windows, concurrent counts, greylist triplets, call-ahead answers and alert windows live: \"local\" (this process) or a Redis URL (\"redis://HOST:PORT/DB\", \"redis+unix:///PATH\") shared by every host of a cluster (section 5.3)";
        state_timeout: Duration = Dflt::Ms(1_000), Duration, "bound of one call to the shared state store, connecting included";
        state_on_error: StateOnError = Dflt::Word("tempfail"), Word(StateOnError::WORDS),
            "when the shared state store fails or times out: the lookup fails with 451 4.4.3 (tempfail), or this host's own state answers (local)";
        state_prefix: String = Dflt::Str("mailpolicy:"), Str, "prefix of every key in the shared state store";
        state_lease: Duration = Dflt::Ms(60_000), Duration,
            "life of this host's `concurrent` counts in the shared store, renewed every third of it while it has open sessions; a host that dies stops counting when they run out (at least 1s)";
        state_password: Option<SecretId> = Dflt::Text("none: the URL's own, if it has one"), Secret,
            "the shared state store's password, kept out of the policy text: a secret, used instead of any password in the `state` URL";
        backup_peer: Option<String> = Dflt::Text("none"), Str,
            "IP:port of the peer host's `backup_listen`: before the 250, a copy of every accepted message is held there, delivered by the peer only if this host dies before finishing it (section 5.5)";
        backup_listen: Option<String> = Dflt::Text("none"), Str,
            "IP:port where this host holds its peers' copies (section 5.5); bind it to loopback or the cluster's network";
        backup_key: Option<SecretId> = Dflt::Text("none"), Secret,
            "the key that signs the copies between peers (the same secret on every host); required with `backup_peer` or `backup_listen`";
        backup_on_error: BackupOnError = Dflt::Word("accept"), Word(BackupOnError::WORDS),
            "when the peer does not hold the copy in time: accept with this host's copy alone, the copy retried in the background until the peer holds it (accept), or answer 451 4.3.0 (tempfail)";
        backup_timeout: Duration = Dflt::Ms(30_000), Duration,
            "bound of handing one copy to the peer, connecting included";
        backup_takeover: Duration = Dflt::Ms(600_000), Duration,
            "how long a peer must have been silent in the shared state store before the copies it left here are delivered";
        backup_tls: bool = Dflt::Bool(false), Bool,
            "the backup channel under TLS (section 5.5): `backup_listen` takes copies only over TLS with `backup_tls_cert`, and copies go to `backup_peer` over TLS, its certificate verified against `backup_tls_ca`; the HMAC stays";
        backup_tls_cert: Option<String> = Dflt::Text("the self-signed pair under the spool's tls/"), Str,
            "PEM certificate chain file `backup_listen` serves with `backup_tls`";
        backup_tls_key: Option<String> = Dflt::Text("with `backup_tls_cert`"), Str, "PEM private key file of `backup_tls_cert`";
        backup_tls_ca: Option<String> = Dflt::Text("none"), Str,
            "PEM file of the CAs the peer's certificate must chain to, or of the peer's own self-signed certificate (pinned); required with `backup_tls` and `backup_peer`";
        backup_tls_name: Option<String> = Dflt::Text("the IP address of `backup_peer`"), Str,
            "the name (DNS name or IP address) the peer's certificate must be for";
        log: LogTarget = Dflt::Word("stderr"), Word(LogTarget::WORDS),
            "where log lines go: standard error, the local syslog socket, or the systemd journal";
        syslog_socket: String = Dflt::Str("/dev/log"), Str, "the syslog socket `log syslog` writes to";
        syslog_facility: SyslogFacility = Dflt::Word("mail"), Word(SyslogFacility::WORDS),
            "the syslog facility of log lines";
        syslog_format: SyslogFormat = Dflt::Word("rfc3164"), Word(SyslogFormat::WORDS),
            "the syslog message format (rfc3164 as syslog(3) sends it to /dev/log)";
        journal_socket: String = Dflt::Str("/run/systemd/journal/socket"), Str,
            "the journal socket `log journal` writes to";
        admin: Option<String> = Dflt::Text("none"), Str,
            "IP:port of the admin listener, serving Prometheus metrics on GET /metrics";
        admin_lists: bool = Dflt::Bool(false), Bool,
            "the admin listener also serves the mailing lists' web endpoint (subscribe, confirm, one-click unsubscribe) next to GET /metrics";
    }
}

settings! {
    /// `listener NAME { }`.
    pub struct Listener, LISTENER [name: String] {
        address: Option<String> = Dflt::None, Str, "IP:port to listen on, e.g. \"0.0.0.0:25\" (required)";
        protocol: Protocol = Dflt::Word("smtp"), Word(Protocol::WORDS),
            "smtp (25), submission (587, STARTTLS) or submissions (465, implicit TLS)";
        tls: Option<Tls> = Dflt::Text("starttls; submissions is always implicit TLS"), Word(Tls::WORDS),
            "offer STARTTLS, require it before MAIL, or no TLS";
        cert: Option<String> = Dflt::Text("a self-signed pair is made at start"), Str, "PEM certificate chain file";
        key: Option<String> = Dflt::Text("with `cert`"), Str, "PEM private key file";
        client_certs: ClientCerts = Dflt::Word("none"), Word(ClientCerts::WORDS), "ask clients for certificates (R43)";
        client_ca: Option<String> = Dflt::Text("the system roots"), Str, "PEM file of CAs that client certificates must chain to";
        auth: Option<Auth> = Dflt::Text("none for smtp, required for submission and submissions"), Word(Auth::WORDS),
            "SMTP AUTH: not offered, offered, or required before MAIL (R42)";
        auth_mechanisms: Vec<String> = Dflt::Strings(MECHANISMS), Strings, "SASL mechanisms offered";
        auth_without_tls: bool = Dflt::Bool(false), Bool, "offer plaintext mechanisms without TLS (only honoured on loopback)";
        credentials: Option<TableId> = Dflt::None, Table, "table of login -> hashed secret used by AUTH";
        max_sessions: Option<u64> = Dflt::Text("the server's max_sessions"), Num, "concurrent sessions on this listener";
        max_message_size: Option<u64> = Dflt::Text("the server's"), Size, "overrides the server's limit";
        max_recipients: Option<u64> = Dflt::Text("the server's"), Num, "overrides the server's limit";
        command_timeout: Duration = Dflt::Ms(5 * 60_000), Duration, "idle time allowed between commands (R46)";
        data_timeout: Duration = Dflt::Ms(10 * 60_000), Duration, "idle time allowed inside DATA (R46)";
        soft_error_limit: u64 = Dflt::Num(10), Num,
            "after this many errors each further error reply is delayed by error_sleep (R40)";
        hard_error_limit: u64 = Dflt::Num(20), Num, "after this many errors the session is closed with 421 (R40)";
        error_sleep: Duration = Dflt::Ms(1000), Duration, "delay of error replies past the soft limit (R13)";
        vrfy: bool = Dflt::Bool(false), Bool, "answer VRFY (false: 252; R13)";
        expn: bool = Dflt::Bool(false), Bool, "answer EXPN (false: 502; R13)";
        banner: String = Dflt::Str("ESMTP mailpolicy"), Str, "text of the 220 greeting after the hostname";
        hostname: Option<String> = Dflt::Text("the server's hostname"), Str, "overrides the server's hostname on this listener";
        proxy_protocol: Option<Vec<String>> = Dflt::Text("none"), Strings,
            "networks of the load balancers in front of this listener: every connection must come from one of them and start with a PROXY protocol header (v1 or v2), and client.ip is the client it names";
        milters: Option<Vec<String>> = Dflt::Text("every milter the policy declares"), Strings,
            "the milters this listener's sessions go through, by name, in declaration order (Postfix smtpd_milters); [] for none, as on a re-injection listener";
        proxy_filter: Option<String> = Dflt::None, Str,
            "before-queue content filter (Postfix smtpd_proxy_filter): \"IP:port\" or \"unix:/path\" of an SMTP proxy that gets each accepted message before the client's reply to end of data, and whose reply the client gets";
        proxy_filter_timeout: Duration = Dflt::Ms(100_000), Duration,
            "time-out of connecting to the proxy filter and of each of its replies (Postfix smtpd_proxy_timeout)";
    }
}

impl Listener {
    /// `tls`, or its default: `starttls` (inside `submissions`, whose TLS is implicit,
    /// the engine offers no STARTTLS whatever this says).
    pub fn tls(&self) -> Tls {
        self.tls.unwrap_or(Tls::Starttls)
    }

    /// `auth`, or its default by protocol.
    pub fn auth(&self) -> Auth {
        self.auth.unwrap_or(match self.protocol {
            Protocol::Smtp | Protocol::Http => Auth::None,
            Protocol::Submission | Protocol::Submissions => Auth::Required,
        })
    }

    /// The listener's `max_message_size`, else the server's.
    pub fn max_message_size(&self, server: &Server) -> u64 {
        self.max_message_size.unwrap_or(server.max_message_size)
    }

    /// The listener's `max_recipients`, else the server's.
    pub fn max_recipients(&self, server: &Server) -> u64 {
        self.max_recipients.unwrap_or(server.max_recipients)
    }

    /// The listener's `max_sessions`, else the server's.
    pub fn max_sessions(&self, server: &Server) -> u64 {
        self.max_sessions.unwrap_or(server.max_sessions)
    }
}

impl Server {
    /// `batv_lifetime` in whole days, at least one (BATV tags carry a day number).
    pub fn batv_lifetime_days(&self) -> u64 {
        (self.batv_lifetime.as_millis() as u64 / 86_400_000).max(1)
    }
}

/// The settings of a listener the policy does not declare (`mailc test` without one, the
/// maildrop pickup): every default.
pub fn default_listener() -> &'static Listener {
    static D: std::sync::OnceLock<Listener> = std::sync::OnceLock::new();
    D.get_or_init(Listener::default)
}
