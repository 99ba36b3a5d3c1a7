//! What may be written in `server { }`, `listener NAME { }` and the option blocks of tables,
//! scanners and mailing lists. One table per block kind; the checker validates against it.
//! The tables are made from the typed structs in `crate::settings` (`server`, `listener`)
//! and `crate::resources` (tables, scanners, mailing lists).

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
    /// The default (`crate::settings`, `crate::resources`).
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

pub use crate::resources::{MAILING_LIST, SCANNER, SCANNER_MILTER, TABLE_COMMON, TABLE_LDAP, TABLE_SQL};
pub use crate::settings::{Dflt, LISTENER, SERVER};

/// Mailing list kinds.
pub const MAILING_LIST_KINDS: &[(&str, &str)] =
    &[("newsletter", "one-way: posts go to every subscriber, replies go to the poster")];

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
