//! What may be written in `server { }`, `listener NAME { }` and the option blocks of tables,
//! secrets and scanners. One table per block kind; the checker validates against it. The
//! `server` and `listener` tables are made from their typed structs in `crate::settings`.

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
    /// The default, for `server` and `listener` options (`crate::settings`); the other
    /// blocks say theirs in `doc`.
    pub default: Dflt,
}

impl OptSpec {
    /// The documentation with the default: what help texts and hovers show.
    pub fn describe(&self) -> String {
        match self.default.text() {
            Some(d) => format!("{} (default: {d})", self.doc),
            None => self.doc.to_string(),
        }
    }
}

const fn o(name: &'static str, ty: OptTy, doc: &'static str) -> OptSpec {
    OptSpec { name, ty, doc, default: Dflt::None }
}

pub use crate::settings::{Dflt, LISTENER, SERVER};

use OptTy::*;

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
    o("subscribers", Table, "the table of subscribers: a `list` file the daemon rewrites, an `sql` table with members/insert/delete, or an `ldap` table whose base is the group entry and attribute its members (required)"),
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

/// The settings of a `milter` scanner (Postfix's `milter_*` parameters).
pub const SCANNER_MILTER: &[OptSpec] = &[
    o("timeout", Duration, "time-out of each milter command and reply (default 30s; milter_command_timeout)"),
    o("connect_timeout", Duration, "time-out of connecting and negotiating (default 30s; milter_connect_timeout)"),
    o("content_timeout", Duration, "time-out of sending the message and the end-of-message reply (default 300s)"),
    o(
        "default_action",
        Word(&["tempfail", "accept", "reject"]),
        "when the milter is down, slow or breaks the protocol (default tempfail; milter_default_action)",
    ),
    o(
        "verdicts",
        Word(&["enforce", "report"]),
        "enforce (default): the milter's reject, tempfail, discard and quarantine take effect unless the policy refuses first; report: they are only facts",
    ),
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
    ("milter", "a mail filter (Sendmail milter protocol 6), \"inet:127.0.0.1:8891\" or \"unix:/path\""),
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
