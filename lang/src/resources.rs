//! The options of tables, scanners and mailing lists, typed: one `settings!` list per kind,
//! as `server` and `listener` have theirs in [`crate::settings`]. **Adding an option is one
//! line here** (name, field type, default, the value the checker accepts, documentation);
//! from it come the field the hosts read, its default, the checker's schema (re-exported by
//! [`crate::schema`]: `TABLE_COMMON`, `TABLE_LDAP`, `TABLE_SQL`, `SCANNER`,
//! `SCANNER_MILTER`, `MAILING_LIST`) and the language server's hover; `tests/check.rs`
//! checks spec/language.md's option tables against it. The checker lowers a declaration's
//! options into [`Options`] (`Resource::options`); no host reads an option by name.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ir::{OptValue, SecretId, TableId};
use crate::schema::{OptSpec, OptTy};
use crate::settings::{settings, words, Dflt, OptField};

words! {
    /// A table's or a scanner's `on_error`.
    pub enum OnError { Tempfail = "tempfail", Continue = "continue" }
}
words! {
    /// An `ldap` table's `scope`.
    pub enum LdapScope { Sub = "sub", One = "one", Base = "base" }
}
words! {
    /// A milter's `default_action`.
    pub enum MilterAction { Tempfail = "tempfail", Accept = "accept", Reject = "reject" }
}
words! {
    /// A milter's `verdicts`.
    pub enum MilterVerdicts { Enforce = "enforce", Report = "report" }
}

use OptTy::*;

settings! {
    /// The options every table has.
    pub struct TableOptions, TABLE_COMMON [] {
        timeout: Option<Duration> = Dflt::Text("the server's lookup_timeout"), Duration, "time-out of one lookup";
        on_error: OnError = Dflt::Word("tempfail"), Word(OnError::WORDS),
            "when the back end fails: answer 4xx (tempfail), or treat the key as absent (continue: fail open)";
        reload: bool = Dflt::Bool(true), Bool, "re-read the file when it changes (file tables)";
    }
}

settings! {
    /// An `ldap` table's options (R28, R45).
    pub struct LdapOptions, TABLE_LDAP [] {
        url: String = Dflt::None, Str, "ldap://host:port (required)";
        base: String = Dflt::None, Str, "search base DN (required)";
        filter: String = Dflt::None, Str, "search filter; %s is the key, %u its local part, %d its domain (required)";
        attribute: Option<String> = Dflt::Text("presence only"), Str, "attribute whose value is the lookup's result";
        bind_dn: Option<String> = Dflt::Text("anonymous"), Str, "DN to bind as";
        password: Option<SecretId> = Dflt::Text("none"), Secret, "password of bind_dn";
        scope: LdapScope = Dflt::Word("sub"), Word(LdapScope::WORDS), "search scope";
        connections: u64 = Dflt::Num(4), Num, "most connections kept open to the directory, each bound once";
    }
}

settings! {
    /// An `sql` table's options (R45); `url` is also read into `dsn` by the checker.
    pub struct SqlOptions, TABLE_SQL [dsn: PgUrl] {
        url: String = Dflt::None, Str, "postgresql://user@host:port/db (required)";
        query: String = Dflt::None, Str,
            "query with one parameter $1, the key; the first column of the first row is the result (required)";
        password: Option<SecretId> = Dflt::Text("none"), Secret, "the database password";
        connections: u64 = Dflt::Num(4), Num, "most connections kept open to the database, lookups in parallel";
        members: Option<String> = Dflt::Text("none"), Str,
            "a mailing list's subscribers: a query with no parameter whose first column lists them all";
        insert: Option<String> = Dflt::Text("none"), Str,
            "a mailing list's subscribe: a statement with one parameter $1, the confirmed address";
        delete: Option<String> = Dflt::Text("none"), Str,
            "a mailing list's unsubscribe: a statement with one parameter $1, the address";
    }
}

settings! {
    /// A content scanner's options (`rspamd`, `spamd`; R9, R24).
    pub struct ScannerOptions, SCANNER [] {
        timeout: Duration = Dflt::Ms(30_000), Duration, "time-out of one scan";
        on_error: OnError = Dflt::Word("tempfail"), Word(OnError::WORDS),
            "when the scanner fails: 4xx (tempfail), or score 0 (continue)";
        max_size: u64 = Dflt::Size(10 << 20), Size, "larger messages are not scanned and score 0";
    }
}

settings! {
    /// A `milter` scanner's options (Postfix's `milter_*` parameters).
    pub struct MilterOptions, SCANNER_MILTER [] {
        timeout: Duration = Dflt::Ms(30_000), Duration, "time-out of each milter command and reply (milter_command_timeout)";
        connect_timeout: Duration = Dflt::Ms(30_000), Duration,
            "time-out of connecting and negotiating (milter_connect_timeout)";
        content_timeout: Duration = Dflt::Ms(300_000), Duration,
            "time-out of sending the message and the end-of-message reply (milter_content_timeout)";
        default_action: MilterAction = Dflt::Word("tempfail"), Word(MilterAction::WORDS),
            "when the milter is down, slow or breaks the protocol (milter_default_action)";
        verdicts: MilterVerdicts = Dflt::Word("enforce"), Word(MilterVerdicts::WORDS),
            "enforce: the milter's reject, tempfail, discard and quarantine take effect unless the policy refuses first; report: they are only facts";
    }
}

settings! {
    /// `mailing_list NAME = newsletter "ADDRESS" { ... }` (R11, R39).
    pub struct MailingListOptions, MAILING_LIST [] {
        subscribers: Option<TableId> = Dflt::None, Table,
            "the table of subscribers: a `list` file the daemon rewrites, an `sql` table with members/insert/delete, or an `ldap` table whose base is the group entry and attribute its members (required)";
        owner: String = Dflt::None, Str,
            "the address of the list's owner: mail to owner-LIST, bounce reports and removals (required)";
        keys: Option<SecretId> = Dflt::None, Secret,
            "token keys, one `NUMBER KEY` per line; the highest number signs, every listed key verifies (required)";
        web: String = Dflt::None, Str,
            "the public base URL of the `http` listener, e.g. \"https://lists.example.com\" (required)";
        description: Option<String> = Dflt::Text("the list's name"), Str,
            "the list's name in List-Id and in the mails the list sends";
        confirm_lifetime: Duration = Dflt::Ms(2 * 86_400_000), Duration,
            "how long a subscription confirmation stays valid";
        bounce_limit: u64 = Dflt::Num(3), Num, "hard bounces within bounce_window that remove a subscriber";
        bounce_window: Duration = Dflt::Ms(30 * 86_400_000), Duration, "the window bounces are counted in";
    }
}

/// A declaration's options, lowered by the checker by its kind.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum Options {
    /// Secrets, and the milters' pseudo-tables: no options.
    #[default]
    None,
    /// A file table (`list`, `map`, `access`, `cidr`, `regexp`, `pcre`).
    File(TableOptions),
    Ldap(TableOptions, LdapOptions),
    Sql(TableOptions, SqlOptions),
    /// `rspamd`, `spamd`.
    Scanner(ScannerOptions),
    Milter(MilterOptions),
    MailingList(MailingListOptions),
}

impl Options {
    /// The options every table has; `None` for what is not a table (or a milter's
    /// pseudo-table, which has none).
    pub fn table(&self) -> Option<&TableOptions> {
        match self {
            Options::File(t) | Options::Ldap(t, _) | Options::Sql(t, _) => Some(t),
            _ => None,
        }
    }

    /// An `ldap` table's options.
    pub fn ldap(&self) -> Option<(&TableOptions, &LdapOptions)> {
        match self {
            Options::Ldap(t, l) => Some((t, l)),
            _ => None,
        }
    }

    /// An `sql` table's options.
    pub fn sql(&self) -> Option<(&TableOptions, &SqlOptions)> {
        match self {
            Options::Sql(t, s) => Some((t, s)),
            _ => None,
        }
    }

    /// Sets option `name` on whichever of the kind's structs has it; false when none does
    /// (the checker rules that out).
    pub fn set(&mut self, name: &str, v: &OptValue) -> bool {
        match self {
            Options::None => false,
            Options::File(t) => t.set(name, v),
            Options::Ldap(t, l) => t.set(name, v) || l.set(name, v),
            Options::Sql(t, s) => t.set(name, v) || s.set(name, v),
            Options::Scanner(s) => s.set(name, v),
            Options::Milter(m) => m.set(name, v),
            Options::MailingList(l) => l.set(name, v),
        }
    }
}

impl TableOptions {
    /// The table's `timeout`, else the server's `lookup_timeout` (`default`).
    pub fn timeout_or(&self, default: Duration) -> Duration {
        self.timeout.unwrap_or(default)
    }
}

/// An `sql` table's `sslmode`, as libpq reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SslMode {
    Disable,
    /// `allow` and `prefer` (the default).
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// An `sql` table's `url` without `sslmode` and `sslrootcert` (what tokio-postgres parses),
/// and those two, read by the checker (spec/language.md 4.4).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgUrl {
    pub rest: String,
    pub mode: SslMode,
    pub rootcert: Option<String>,
}

/// The words `sslmode` may be.
pub const SSLMODES: &[&str] = &["disable", "allow", "prefer", "require", "verify-ca", "verify-full"];

fn sslmode(v: &str) -> Result<SslMode, String> {
    Ok(match v {
        "disable" => SslMode::Disable,
        "allow" | "prefer" => SslMode::Prefer,
        "require" => SslMode::Require,
        "verify-ca" => SslMode::VerifyCa,
        "verify-full" => SslMode::VerifyFull,
        _ => return Err(format!("sslmode {v:?} is not one of {}", SSLMODES.join(", "))),
    })
}

/// Percent-decoding of a URL parameter's value (`sslrootcert=%2Fetc%2F...`).
fn unescape(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        match (b.get(i), b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (Some(b'%'), Some(h), Some(l)) => {
                out.push(h * 16 + l);
                i += 3;
            }
            (Some(c), _, _) => {
                out.push(*c);
                i += 1;
            }
            (None, _, _) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Takes `sslmode` and `sslrootcert` out of a libpq connection string, in either form
/// (`postgresql://...?sslmode=...` or `host=... sslmode=...`).
pub fn pg_url(url: &str) -> Result<PgUrl, String> {
    let mut mode_v = None;
    let mut rootcert = None;
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_string(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for p in query.split('&') {
                    match p.split_once('=') {
                        Some(("sslmode", v)) => mode_v = Some(unescape(v)),
                        Some(("sslrootcert", v)) => rootcert = Some(unescape(v)),
                        _ => kept.push(p),
                    }
                }
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        // key=value words; a quoted value with spaces in another key stays as it was.
        let mut kept = Vec::new();
        for w in url.split(' ') {
            match w.split_once('=') {
                Some(("sslmode", v)) => mode_v = Some(v.trim_matches('\'').to_string()),
                Some(("sslrootcert", v)) => rootcert = Some(v.trim_matches('\'').to_string()),
                _ => kept.push(w),
            }
        }
        kept.join(" ")
    };
    let mode = match mode_v {
        Some(v) => sslmode(&v)?,
        None => SslMode::Prefer,
    };
    Ok(PgUrl { rest, mode, rootcert: rootcert.filter(|r| !r.is_empty()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_rootcert_come_out_of_either_form() {
        assert_eq!(
            pg_url("postgresql://mail@db:5432/mail?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3")
                .expect("uri"),
            PgUrl {
                rest: "postgresql://mail@db:5432/mail?connect_timeout=3".into(),
                mode: SslMode::VerifyFull,
                rootcert: Some("/etc/ca.pem".into())
            }
        );
        let d = pg_url("postgresql://mail@db/mail").expect("uri");
        assert_eq!((d.mode, d.rootcert, d.rest.as_str()), (SslMode::Prefer, None, "postgresql://mail@db/mail"));
        let d = pg_url("host=db user=mail sslmode=require password='a b'").expect("words");
        assert_eq!((d.rest.as_str(), d.mode, d.rootcert), ("host=db user=mail password='a b'", SslMode::Require, None));
        assert_eq!(pg_url("postgres://db?sslmode=allow").map(|d| d.mode), Ok(SslMode::Prefer));
        assert!(pg_url("postgres://db?sslmode=sometimes").is_err());
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let t = TableOptions::default();
        assert_eq!((t.timeout, t.on_error, t.reload), (None, OnError::Tempfail, true));
        assert_eq!(LdapOptions::default().connections, 4);
        assert_eq!(ScannerOptions::default().max_size, 10 << 20);
        assert_eq!(MilterOptions::default().content_timeout, Duration::from_secs(300));
        let l = MailingListOptions::default();
        assert_eq!((l.bounce_limit, l.confirm_lifetime), (3, Duration::from_secs(2 * 86_400)));
    }
}
