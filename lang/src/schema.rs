//! What may be written in `server { }`, `listener NAME { }` and the option blocks of tables,
//! secrets and scanners. One table per block kind; the checker validates against it.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptTy {
    Str,
    Num,
    Size,
    Duration,
    Bool,
    /// One of the given words.
    Word(&'static [&'static str]),
    /// A list of strings.
    Strings,
    /// The name of a declared secret.
    Secret,
    /// The name of a declared table.
    Table,
    /// The name of a declared list.
    List,
}

#[derive(Clone, Copy, Debug)]
pub struct OptSpec {
    pub name: &'static str,
    pub ty: OptTy,
    pub doc: &'static str,
}

const fn o(name: &'static str, ty: OptTy, doc: &'static str) -> OptSpec {
    OptSpec { name, ty, doc }
}

use OptTy::*;

pub const SERVER: &[OptSpec] = &[
    o(
        "hostname",
        Str,
        "the name this server gives in its banner, EHLO and Received: headers (default: the machine's hostname)",
    ),
    o("spool", Str, "directory of the queue (default ./var/spool)"),
    o("maildir", Str, "root of local Maildir delivery when `deliver maildir` has no folder (default ./var/mail)"),
    o("local_domains", List, "domains delivered on this machine (default: hostname and localhost)"),
    o("networks", List, "a cidr list of trusted client networks (Postfix mynetworks)"),
    o(
        "relay_domains",
        List,
        "a domains list of the domains this server relays to for any client (a backup MX's or gateway's domains, Postfix relay_domains); default none",
    ),
    o("max_message_size", Size, "largest message accepted (default 25M; R46)"),
    o("max_recipients", Num, "recipients per message (default 100; R46)"),
    o("max_header_size", Size, "largest header section (default 100K; R46)"),
    o(
        "hopcount_limit",
        Num,
        "Received: fields a message may carry before it is refused as a mail loop (default 50; Postfix hopcount_limit)",
    ),
    o("queue_minfree", Size, "free space the spool's file system must keep: MAIL is refused with 452 4.3.1 below it, or below it plus the SIZE the client declares (default 1.5 × max_message_size)"),
    o("max_sessions", Num, "concurrent SMTP sessions over all listeners (default 200)"),
    o("client_connection_limit", Num, "concurrent sessions from one client address, 0 for no limit (default 50, Postfix anvil)"),
    o("queue_run", Duration, "interval between deferred-queue scans (default 5m; R31)"),
    o("retry_min", Duration, "first retry delay (default 5m; R31)"),
    o("retry_max", Duration, "longest retry delay (default 67m; R31)"),
    o("queue_lifetime", Duration, "give up and bounce after this (default 5d; R31)"),
    o("bounce_lifetime", Duration, "queue lifetime of bounces (default 5d)"),
    o("delay_warning", Duration, "send a delay DSN after this, 0 for never (default 4h; R31)"),
    o("bounce_size_limit", Size, "largest original message returned in a bounce (default 50K; R31)"),
    o("bounce_rate", Num, "bounces delivered per minute before they queue behind normal mail (R30)"),
    o("destination_concurrency", Num, "parallel deliveries per destination (default 20; R31)"),
    o("max_lookups", Num, "network lookups one message may cause (default 100)"),
    o("lookup_timeout", Duration, "default time-out of a lookup (default 10s)"),
    o("dns_timeout", Duration, "time-out of a DNS query (default 5s)"),
    o("dns_server", Str, "IP:port of the DNS resolver to ask (default: the resolvers of /etc/resolv.conf)"),
    o("batv_keys", Secret, "BATV signing keys, one `NUMBER KEY` per line (R29)"),
    o("batv_lifetime", Duration, "how long a BATV tag stays valid (default 7d; R29)"),
    o("dkim_key", Secret, "PEM private key for DKIM signing (B7)"),
    o("dkim_selector", Str, "DKIM selector"),
    o("dkim_domain", Str, "DKIM signing domain (d=)"),
    o("postmaster", Str, "address that receives alerts and double bounces"),
    o("alert_from", Str, "sender address of alert mails (R7)"),
    o("tls_ca", Str, "PEM file of the CAs that next hops with `:tls required` must chain to, for every transport without its own `:ca` (Postfix smtp_tls_CAfile); default: the system's trust store (SSL_CERT_FILE / SSL_CERT_DIR when set)"),
    o("fallback_relay", Str, "host tried when MX delivery fails temporarily (R33)"),
    o("soft_bounce", Bool, "turn every 5xx the policy or a delivery gives into 4xx (R40 soft-bounce mode)"),
    o("warn_only", Bool, "log what reject and tempfail would do, and accept (R40 warn-only mode)"),
    o("log_format", Word(&["text", "json"]), "log line format (default text)"),
];

pub const LISTENER: &[OptSpec] = &[
    o("address", Str, "IP:port to listen on, e.g. \"0.0.0.0:25\" (required)"),
    o(
        "protocol",
        Word(&["smtp", "submission", "submissions", "http"]),
        "smtp (25), submission (587, STARTTLS), submissions (465, implicit TLS), or http: the mailing lists' web endpoint (HTTPS with `tls required`)",
    ),
    o(
        "tls",
        Word(&["none", "starttls", "required"]),
        "offer STARTTLS, require it before MAIL, or no TLS (implicit for submissions)",
    ),
    o("cert", Str, "PEM certificate chain file"),
    o("key", Str, "PEM private key file"),
    o("client_certs", Word(&["none", "request", "require"]), "ask clients for certificates (R43)"),
    o("client_ca", Str, "PEM file of CAs that client certificates must chain to"),
    o(
        "auth",
        Word(&["none", "optional", "required"]),
        "SMTP AUTH: not offered, offered, or required before MAIL (R42)",
    ),
    o("auth_mechanisms", Strings, "SASL mechanisms offered (default [\"SCRAM-SHA-256\", \"PLAIN\", \"LOGIN\"])"),
    o("auth_without_tls", Bool, "offer plaintext mechanisms without TLS (only honoured on loopback)"),
    o("credentials", Table, "table of login -> hashed secret used by AUTH"),
    o("max_sessions", Num, "concurrent sessions on this listener"),
    o("max_message_size", Size, "overrides the server's limit"),
    o("max_recipients", Num, "overrides the server's limit"),
    o("command_timeout", Duration, "idle time allowed between commands (default 5m; R46)"),
    o("data_timeout", Duration, "idle time allowed inside DATA (default 10m; R46)"),
    o(
        "soft_error_limit",
        Num,
        "after this many errors each further error reply is delayed by error_sleep (default 10; R40)",
    ),
    o("hard_error_limit", Num, "after this many errors the session is closed with 421 (default 20; R40)"),
    o("error_sleep", Duration, "delay of error replies past the soft limit (default 1s; R13)"),
    o("vrfy", Bool, "answer VRFY (default false: 252; R13)"),
    o("expn", Bool, "answer EXPN (default false: 502; R13)"),
    o("banner", Str, "text of the 220 greeting after the hostname"),
    o("hostname", Str, "overrides the server's hostname on this listener"),
];

/// Options every table may have.
pub const TABLE_COMMON: &[OptSpec] = &[
    o("timeout", Duration, "time-out of one lookup (default: the server's lookup_timeout)"),
    o(
        "on_error",
        Word(&["tempfail", "continue"]),
        "when the back end fails: answer 4xx (default), or treat the key as absent (fail open)",
    ),
    o("reload", Bool, "re-read the file when it changes (default true; file tables)"),
];

pub const TABLE_LDAP: &[OptSpec] = &[
    o("url", Str, "ldap://host:port (required)"),
    o("base", Str, "search base DN (required)"),
    o("filter", Str, "search filter; %s is the key, %u its local part, %d its domain (required)"),
    o("attribute", Str, "attribute whose value is the lookup's result (default: presence only)"),
    o("bind_dn", Str, "DN to bind as (default anonymous)"),
    o("password", Secret, "password of bind_dn"),
    o("scope", Word(&["sub", "one", "base"]), "search scope (default sub)"),
    o("connections", Num, "most connections kept open to the directory, each bound once (default 4)"),
];

pub const TABLE_SQL: &[OptSpec] = &[
    o("url", Str, "postgresql://user@host:port/db (required)"),
    o("query", Str, "query with one parameter $1, the key; the first column of the first row is the result (required)"),
    o("password", Secret, "the database password"),
    o("connections", Num, "most connections kept open to the database, lookups in parallel (default 4)"),
    o("members", Str, "a mailing list's subscribers: a query with no parameter whose first column lists them all"),
    o("insert", Str, "a mailing list's subscribe: a statement with one parameter $1, the confirmed address"),
    o("delete", Str, "a mailing list's unsubscribe: a statement with one parameter $1, the address"),
];

/// `mailing_list NAME = newsletter "ADDRESS" { ... }` (R11, R39).
pub const MAILING_LIST: &[OptSpec] = &[
    o("subscribers", Table, "the table of subscribers: a `list` file the daemon rewrites, or an `sql` table with members/insert/delete (required)"),
    o("owner", Str, "the address of the list's owner: mail to owner-LIST, bounce reports and removals (required)"),
    o("keys", Secret, "token keys, one `NUMBER KEY` per line; the highest number signs, every listed key verifies (required)"),
    o("web", Str, "the public base URL of the `http` listener, e.g. \"https://lists.example.com\" (required)"),
    o("description", Str, "the list's name in List-Id and in the mails the list sends (default: the list's name)"),
    o("confirm_lifetime", Duration, "how long a subscription confirmation stays valid (default 2d)"),
    o("bounce_limit", Num, "hard bounces within bounce_window that remove a subscriber (default 3)"),
    o("bounce_window", Duration, "the window bounces are counted in (default 30d)"),
];

/// Mailing list kinds.
pub const MAILING_LIST_KINDS: &[(&str, &str)] =
    &[("newsletter", "one-way: posts go to every subscriber, replies go to the poster")];

pub const SCANNER: &[OptSpec] = &[
    o("timeout", Duration, "time-out of one scan (default 30s)"),
    o("on_error", Word(&["tempfail", "continue"]), "when the scanner fails: 4xx (default), or score 0"),
    o("max_size", Size, "larger messages are not scanned and score 0 (default 10M)"),
];

/// Table kinds: (kind, needs a source string, extra options).
pub const TABLE_KINDS: &[(&str, bool, &[OptSpec], &str)] = &[
    ("list", true, &[], "a file with one key per line; `in` tests membership"),
    ("map", true, &[], "a file of `key value` lines (Postfix hash/texthash style)"),
    ("access", true, &[], "a sendmail/Postfix access file: `key ACTION` lines with Connect:/From:/To: scopes"),
    ("cidr", true, &[], "a file of `network value` lines, first match wins"),
    ("regexp", true, &[], "a file of `/regex/ value` lines, first match wins"),
    ("pcre", true, &[], "like regexp, with PCRE syntax"),
    ("ldap", false, TABLE_LDAP, "an LDAP directory search (R28, R45)"),
    ("sql", false, TABLE_SQL, "a PostgreSQL query (R45)"),
];

pub const SECRET_KINDS: &[(&str, &str)] =
    &[("env", "the value of an environment variable"), ("file", "the contents of a file, trailing newline removed")];

pub const SCANNER_KINDS: &[(&str, &str)] = &[
    ("rspamd", "rspamd's HTTP API, e.g. \"http://127.0.0.1:11333\""),
    ("spamd", "SpamAssassin's spamd, e.g. \"127.0.0.1:783\""),
];

/// Capabilities a policy may `require`.
pub const CAPABILITIES: &[(&str, &str)] = &[
    ("dnsbl", "dnsbl and rhsbl tests, dnsbl.* facts (R19)"),
    ("dns", "the resolvable test (R20)"),
    ("spf", "the spf fact (R25)"),
    ("dkim", "the dkim fact, DKIM signing (B7)"),
    ("dmarc", "the dmarc facts (B7)"),
    ("ratelimit", "rate and concurrent values (R7, R22)"),
    ("batv", "batv valid and batv sign (R29)"),
    ("callahead", "the callahead test and reject callahead (R27)"),
    ("greylist", "the greylist test (B7)"),
    ("spamscan", "the score value (R9, R24)"),
];
