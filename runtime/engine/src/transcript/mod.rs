//! Transcripts: offline, deterministic tests of a policy against SMTP dialogues
//! (`spec/transcript.md` is normative). This module parses the format; [`run`] replays a
//! case through the real session engine and evaluator ([`crate::conn::Conn`]), answering
//! every request from the case's fixtures.

pub mod run;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

/// A parse error, with its 1-based line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

#[derive(Clone, Debug)]
pub struct TranscriptFile {
    pub path: PathBuf,
    /// The file-level `policy:`, resolved against the file's folder.
    pub policy: Option<PathBuf>,
    pub cases: Vec<Case>,
}

#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub line: usize,
    pub items: Vec<(usize, Item)>,
}

/// DNS fixture answers.
#[derive(Clone, Debug, PartialEq)]
pub enum DnsAnswer {
    Records(Vec<String>),
    NxDomain,
    ServFail,
    Timeout,
}

/// A table fixture row.
#[derive(Clone, Debug, PartialEq)]
pub enum TableRow {
    Entry {
        key: String,
        value: String,
    },
    /// Every lookup in this table fails (back end down).
    Error,
    Timeout,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    // ---- set-up -----------------------------------------------------------------------
    Policy(PathBuf),
    Client(SocketAddr),
    ClientName(String),
    ClientPtr(String),
    Listener(String),
    Local(SocketAddr),
    /// Implicit TLS from the start (port 465).
    ImplicitTls,
    /// The client presents a certificate with this fingerprint when TLS starts.
    ClientCert(String),
    /// Unix milliseconds.
    Clock(u64),
    /// Free space of the spool's file system, in bytes.
    DiskFree(u64),
    Dns {
        name: String,
        rtype: String,
        answer: DnsAnswer,
    },
    Table {
        table: String,
        row: TableRow,
    },
    Credentials {
        user: String,
        password: String,
    },
    Callahead {
        address: String,
        code: u16,
        text: String,
    },
    CallaheadError {
        address: String,
    },
    AuthResult {
        check: String,
        result: String,
    },
    Score {
        scanner: String,
        score: f64,
    },
    /// `milter NAME: STAGE ANSWER`: what the milter answers at that stage.
    Milter {
        milter: String,
        stage: String,
        /// `rcpt=ADDRESS`: only for that recipient.
        rcpt: Option<String>,
        answer: MilterFixture,
    },
    /// `proxy-filter: ANSWER`: the listener's before-queue filter's answer to the next
    /// message handed to it.
    ProxyFilter(crate::before_queue::FilterOutcome),
    Secret {
        name: String,
        value: String,
    },
    /// `count: COUNTER KEY N`: N earlier events of a rate counter under KEY, now.
    Count {
        counter: String,
        key: String,
        n: u64,
    },
    /// `concurrent: KEY N`: N sessions with KEY are open, this one included.
    Concurrent {
        key: String,
        n: u64,
    },
    // ---- dialogue ---------------------------------------------------------------------
    Send(Vec<u8>),
    /// The next complete reply's last line must match.
    Expect(String),
    /// Some line of the last reply matches / none does.
    ReplyHas(String),
    ReplyLacks(String),
    /// The rule that decided the last reply: `LINE`, `FILE:LINE` or `default`.
    By(String),
    Wait(u64),
    /// The virtual clock moved exactly this far since the last `C:`/`C!` line was sent
    /// (or since the connection, before any): how long the server held its reply.
    Elapsed(u64),
    /// The server has sent no reply yet at the current virtual time (nothing is
    /// waited for).
    NoReply,
    Reconnect,
    /// The server must have closed the connection.
    Closed,
    // ---- outcome --------------------------------------------------------------------
    Queued(usize),
    /// `proxied: N`: messages handed to the before-queue filter.
    Proxied(usize),
    QueuedTo(Vec<String>),
    QueuedFrom(String),
    Header {
        name: String,
        pattern: String,
    },
    NoHeader(String),
    /// `body: PATTERN`: some line of the stored message's body matches (glob).
    Body(String),
    Notify {
        address: String,
        values: Vec<String>,
    },
    /// RET= and ENVID= as stored with the message (glob patterns; `<none>` = not given).
    Ret(String),
    Envid(String),
    /// ORCPT= of a recipient as stored, `TYPE;ADDRESS` (glob).
    Orcpt {
        address: String,
        pattern: String,
    },
    Held(Option<String>),
    NotHeld,
    Archived(String),
    BatvSigned(bool),
    Route {
        address: String,
        pattern: String,
    },
    Bounce {
        address: String,
        kind: String,
        pattern: String,
    },
    Log(String),
    Alert(String),
    /// `alert-mails: N`: alert mails sent so far, after `:every` (as the daemon sends them).
    AlertMails(usize),
    /// `filter: PATTERN` / `filter: no`: the message is handed to a content filter.
    Filter(Option<String>),
}

impl Item {
    pub fn is_dialogue(&self) -> bool {
        matches!(
            self,
            Item::Send(_)
                | Item::Expect(_)
                | Item::Wait(_)
                | Item::Elapsed(_)
                | Item::NoReply
                | Item::Closed
                | Item::ReplyHas(_)
                | Item::ReplyLacks(_)
                | Item::By(_)
        )
    }
}

/// Parse a transcript file's text. `path` resolves relative policy paths.
pub fn parse(path: &Path, text: &str) -> Result<TranscriptFile, Vec<ParseError>> {
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut file = TranscriptFile { path: path.to_path_buf(), policy: None, cases: Vec::new() };
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim_end_matches('\r');
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if let Some(name) = trimmed.strip_prefix("case:") {
            let name = name.trim();
            if name.is_empty() {
                errors.push(ParseError { line: n, message: "a case needs a name: `case: relay is refused`".into() });
            }
            if file.cases.iter().any(|c| c.name == name) {
                errors.push(ParseError { line: n, message: format!("a second case named \"{name}\"") });
            }
            file.cases.push(Case { name: name.to_string(), line: n, items: Vec::new() });
            continue;
        }
        match parse_item(&dir, trimmed) {
            Ok(Item::Policy(p)) if file.cases.is_empty() => file.policy = Some(p),
            Ok(item) => match file.cases.last_mut() {
                Some(c) => c.items.push((n, item)),
                None => errors.push(ParseError { line: n, message: "this line comes before the first `case:`".into() }),
            },
            Err(message) => errors.push(ParseError { line: n, message }),
        }
    }
    if file.cases.is_empty() && errors.is_empty() {
        errors.push(ParseError { line: 1, message: "no `case:` in this file".into() });
    }
    if errors.is_empty() {
        Ok(file)
    } else {
        Err(errors)
    }
}

fn parse_item(dir: &Path, line: &str) -> Result<Item, String> {
    // Dialogue lines keep their spacing after the first space.
    if let Some(rest) = line.strip_prefix("C:") {
        let mut bytes = unescape(rest.strip_prefix(' ').unwrap_or(rest))?;
        bytes.extend_from_slice(b"\r\n");
        return Ok(Item::Send(bytes));
    }
    if let Some(rest) = line.strip_prefix("C!") {
        return Ok(Item::Send(unescape(rest.strip_prefix(' ').unwrap_or(rest))?));
    }
    let (key, value) = match line.split_once(':') {
        Some((k, v)) => (k.trim(), v.trim()),
        None => (line.trim(), ""),
    };
    let need = |what: &str| -> Result<(), String> {
        if value.is_empty() {
            Err(format!("`{key}:` needs {what}"))
        } else {
            Ok(())
        }
    };
    Ok(match key {
        "S" => {
            need("a reply pattern, e.g. `S: 250 2.1.0 *`")?;
            Item::Expect(value.to_string())
        }
        "S-has" => Item::ReplyHas(value.to_string()),
        "S-lacks" => Item::ReplyLacks(value.to_string()),
        "by" => {
            need("a rule location: `by: 12`, `by: policy.mailpolicy:12` or `by: default`")?;
            Item::By(value.to_string())
        }
        "wait" => Item::Wait(duration(value)?),
        "elapsed" => Item::Elapsed(duration(value)?),
        "no-reply" => Item::NoReply,
        "reconnect" => Item::Reconnect,
        "closed" => Item::Closed,
        "policy" => {
            need("a path")?;
            Item::Policy(dir.join(value))
        }
        "client" => Item::Client(socket(value, 40000)?),
        "local" => Item::Local(socket(value, 25)?),
        "client-name" => Item::ClientName(value.to_string()),
        "client-ptr" => Item::ClientPtr(value.to_string()),
        "listener" => Item::Listener(value.to_string()),
        "tls" => match value {
            "implicit" => Item::ImplicitTls,
            _ => return Err("`tls:` takes `implicit` (STARTTLS needs no fixture)".into()),
        },
        "client-cert" => Item::ClientCert(value.to_string()),
        "count" => {
            let w: Vec<&str> = value.split_whitespace().collect();
            let [counter, key, n] = w.as_slice() else {
                return Err("`count:` takes COUNTER KEY N, e.g. `count: messages client.ip=192.0.2.1 30`".into());
            };
            if mailpolicy_lang::ir::Counter::from_name(counter).is_none() {
                return Err(format!("there is no rate counter `{counter}`"));
            }
            if !key.contains('=') {
                return Err(format!("`{key}` is not a counter key: write FACT=VALUE, e.g. client.ip=192.0.2.1"));
            }
            let n = n.parse().map_err(|_| format!("\"{n}\" is not a count"))?;
            Item::Count { counter: counter.to_string(), key: key.to_ascii_lowercase(), n }
        }
        "concurrent" => {
            let w: Vec<&str> = value.split_whitespace().collect();
            let [key, n] = w.as_slice() else {
                return Err("`concurrent:` takes KEY N, e.g. `concurrent: client.ip=192.0.2.1 5`".into());
            };
            let n = n.parse().map_err(|_| format!("\"{n}\" is not a count"))?;
            Item::Concurrent { key: key.to_ascii_lowercase(), n }
        }
        "clock" => Item::Clock(timestamp(value)?),
        "disk-free" => Item::DiskFree(size(value)?),
        "dns" => {
            let mut w = value.split_whitespace();
            let name = w.next().ok_or("`dns:` needs NAME TYPE VALUE...")?.trim_end_matches('.').to_ascii_lowercase();
            let t = w.next().ok_or("`dns:` needs a record type or NXDOMAIN")?.to_ascii_uppercase();
            if t == "NXDOMAIN" {
                return Ok(Item::Dns { name, rtype: "*".into(), answer: DnsAnswer::NxDomain });
            }
            if !["A", "AAAA", "MX", "TXT", "PTR"].contains(&t.as_str()) {
                return Err(format!("unknown DNS type `{t}`: use A, AAAA, MX, TXT, PTR or NXDOMAIN"));
            }
            let rest: Vec<&str> = w.collect();
            let answer = match rest.as_slice() {
                ["SERVFAIL"] => DnsAnswer::ServFail,
                ["TIMEOUT"] => DnsAnswer::Timeout,
                ["NXDOMAIN"] => DnsAnswer::NxDomain,
                [] => return Err("`dns:` needs a value, SERVFAIL, TIMEOUT or NXDOMAIN".into()),
                r => {
                    let v = r.join(" ");
                    let v = if t == "TXT" { v.trim_matches('"').to_string() } else { v };
                    if t == "A" && v.parse::<std::net::Ipv4Addr>().is_err() {
                        return Err(format!("\"{v}\" is not an IPv4 address"));
                    }
                    if t == "AAAA" && v.parse::<std::net::Ipv6Addr>().is_err() {
                        return Err(format!("\"{v}\" is not an IPv6 address"));
                    }
                    DnsAnswer::Records(vec![v])
                }
            };
            Item::Dns { name, rtype: t, answer }
        }
        k if k.starts_with("table ") => {
            let table = k["table ".len()..].trim().to_string();
            let row = match value {
                "ERROR" => TableRow::Error,
                "TIMEOUT" => TableRow::Timeout,
                _ => match value.split_once("=>") {
                    Some((key, v)) => TableRow::Entry { key: key.trim().to_string(), value: v.trim().to_string() },
                    None => TableRow::Entry { key: value.to_string(), value: String::new() },
                },
            };
            if let TableRow::Entry { key, .. } = &row {
                if key.is_empty() {
                    return Err("a table row needs a key: `table users: alice@example.com`".into());
                }
            }
            Item::Table { table, row }
        }
        "credentials" => {
            let (u, p) = value.split_once(char::is_whitespace).ok_or("`credentials:` needs USER PASSWORD")?;
            Item::Credentials { user: u.to_string(), password: p.trim().to_string() }
        }
        "callahead" => {
            let (addr, ans) =
                value.split_once("=>").ok_or("`callahead:` needs ADDRESS => CODE TEXT, or ADDRESS => ERROR")?;
            let ans = ans.trim();
            if ans == "ERROR" {
                Item::CallaheadError { address: addr.trim().to_string() }
            } else {
                let (code, text) = ans.split_once(' ').unwrap_or((ans, ""));
                let code: u16 = code.parse().map_err(|_| format!("\"{code}\" is not a reply code"))?;
                Item::Callahead { address: addr.trim().to_string(), code, text: text.to_string() }
            }
        }
        "spf" | "dkim" | "dmarc" | "dmarc-policy" => {
            need("a result such as pass or fail")?;
            Item::AuthResult { check: key.to_string(), result: value.to_ascii_lowercase() }
        }
        k if k.starts_with("score ") => Item::Score {
            scanner: k[6..].trim().to_string(),
            score: value.parse().map_err(|_| format!("\"{value}\" is not a number"))?,
        },
        k if k.starts_with("milter ") => parse_milter(k[7..].trim(), value)?,
        "proxy-filter" => Item::ProxyFilter(parse_proxy_filter(value)?),
        k if k.starts_with("secret ") => {
            Item::Secret { name: k[7..].trim().to_string(), value: value.replace("\\n", "\n") }
        }
        "proxied" => Item::Proxied(value.parse().map_err(|_| "`proxied:` takes a number of messages".to_string())?),
        "queued" => Item::Queued(value.parse().map_err(|_| "`queued:` takes a number of messages".to_string())?),
        "queued-to" => {
            Item::QueuedTo(value.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
        }
        "queued-from" => Item::QueuedFrom(value.to_string()),
        "header" => {
            let (n, p) = value.split_once(':').ok_or("`header:` needs NAME: PATTERN")?;
            Item::Header { name: n.trim().to_string(), pattern: p.trim().to_string() }
        }
        "no-header" => Item::NoHeader(value.to_string()),
        "body" => Item::Body(value.to_string()),
        "notify" => {
            need("ADDRESS [VALUES]")?;
            // No values: the recipient carries no NOTIFY at all.
            let (a, v) = value.split_once(char::is_whitespace).unwrap_or((value, ""));
            Item::Notify {
                address: a.to_string(),
                values: v.split(',').map(|s| s.trim().to_ascii_uppercase()).filter(|s| !s.is_empty()).collect(),
            }
        }
        "ret" => {
            need("a value: FULL, HDRS or <none>")?;
            Item::Ret(value.to_string())
        }
        "envid" => {
            need("a pattern, or <none>")?;
            Item::Envid(value.to_string())
        }
        "orcpt" => {
            let (a, p) = value.split_once("=>").ok_or("`orcpt:` needs ADDRESS => TYPE;ORIGINAL")?;
            Item::Orcpt { address: a.trim().to_string(), pattern: p.trim().to_string() }
        }
        "held" => match value {
            "" | "yes" => Item::Held(None),
            "no" => Item::NotHeld,
            p => Item::Held(Some(p.to_string())),
        },
        "archived" => Item::Archived(value.to_string()),
        "batv-signed" => Item::BatvSigned(value != "no"),
        "route" => {
            let (a, p) = value.split_once("=>").ok_or("`route:` needs ADDRESS => OUTCOME")?;
            Item::Route { address: a.trim().to_string(), pattern: p.trim().to_string() }
        }
        "bounce" => {
            let (a, p) = value.split_once("=>").ok_or("`bounce:` needs ADDRESS [KIND] => send|discard")?;
            let mut w = a.split_whitespace();
            let address = w.next().unwrap_or("").to_string();
            let kind = w.next().unwrap_or("failure").to_string();
            Item::Bounce { address, kind, pattern: p.trim().to_string() }
        }
        "log" => Item::Log(value.to_string()),
        "alert" => Item::Alert(value.to_string()),
        "alert-mails" => {
            Item::AlertMails(value.parse().map_err(|_| format!("`alert-mails: {value}`: expected a number"))?)
        }
        "filter" => Item::Filter(if value == "no" { None } else { Some(value.to_string()) }),
        other => return Err(format!("unknown line `{other}:`; see spec/transcript.md")),
    })
}

/// `\r`, `\n`, `\t`, `\0`, `\\`, `\"`, `\xHH` escapes of `C:` lines.
pub fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            match b.get(i + 1) {
                Some(b'r') => out.push(b'\r'),
                Some(b'n') => out.push(b'\n'),
                Some(b't') => out.push(b'\t'),
                Some(b'0') => out.push(0),
                Some(b'\\') => out.push(b'\\'),
                // As a policy string writes a quote: `C: RCPT TO:<\"john smith\"@example.com>`.
                Some(b'"') => out.push(b'"'),
                Some(b'x') => {
                    let hex = s.get(i + 2..i + 4).ok_or("`\\x` needs two hex digits")?;
                    out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("`\\x{hex}` is not a hex byte"))?);
                    i += 4;
                    continue;
                }
                _ => return Err("unknown escape; use \\r \\n \\t \\0 \\\\ \\\" or \\xHH".into()),
            }
            i += 2;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn socket(s: &str, default_port: u16) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let ip: IpAddr = s.parse().map_err(|_| format!("\"{s}\" is not an IP address or IP:port"))?;
    Ok(SocketAddr::new(ip, default_port))
}

/// `4096`, `100K`, `25M`, `2G`.
pub fn size(s: &str) -> Result<u64, String> {
    let bad = || format!("\"{s}\" is not a size like 25M");
    let (digits, mult) = match s.trim().char_indices().last() {
        Some((i, 'K')) => (s.trim().get(..i).unwrap_or(""), 1u64 << 10),
        Some((i, 'M')) => (s.trim().get(..i).unwrap_or(""), 1 << 20),
        Some((i, 'G')) => (s.trim().get(..i).unwrap_or(""), 1 << 30),
        _ => (s.trim(), 1),
    };
    digits.parse::<u64>().map(|n| n.saturating_mul(mult)).map_err(|_| bad())
}

/// `500ms`, `5s`, `10m`, `2h`, `1d`.
pub fn duration(s: &str) -> Result<u64, String> {
    let digits: String = s.chars().take_while(|c| c.is_ascii_digit()).collect();
    let unit = &s[digits.len()..];
    let n: u64 = digits.parse().map_err(|_| format!("\"{s}\" is not a duration like 5s"))?;
    let mult = match unit.trim() {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("\"{s}\": durations end in ms, s, m, h or d")),
    };
    Ok(n.saturating_mul(mult))
}

/// `2026-11-22T10:00:00Z` (UTC) to Unix milliseconds.
pub fn timestamp(s: &str) -> Result<u64, String> {
    crate::date::parse_rfc3339(s)
}

/// Glob match, ASCII case-insensitive: `*` any run, `?` one character.
pub fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.to_ascii_lowercase().chars().collect();
    let t: Vec<char> = text.to_ascii_lowercase().chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globbing() {
        assert!(glob("250 2.1.0 *", "250 2.1.0 Sender OK"));
        assert!(glob("5?? *relay*", "554 5.7.1 Relay access denied"));
        assert!(!glob("250 *", "550 no"));
        assert!(glob("*", ""));
    }

    #[test]
    fn times() {
        assert_eq!(timestamp("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(timestamp("2026-11-22T10:00:00Z"), Ok(1_795_341_600_000));
        assert!(timestamp("2026-13-01T00:00:00Z").is_err());
        assert_eq!(duration("5m"), Ok(300_000));
    }

    #[test]
    fn escapes() {
        assert_eq!(unescape("a\\r\\n.\\x00").unwrap(), b"a\r\n.\0");
        assert!(unescape("\\q").is_err());
        assert_eq!(unescape(r#"<\"a b\"@c>"#).unwrap(), br#"<"a b"@c>"#);
    }

    #[test]
    fn errors_have_lines() {
        let e = parse(Path::new("x.transcript"), "case: a\nS: 220 *\nbogus: 1\n").unwrap_err();
        assert_eq!(e[0].line, 3);
        let e = parse(Path::new("x.transcript"), "C: EHLO x\n").unwrap_err();
        assert_eq!(e[0].line, 1);
    }
}

/// Replay one case (a counterexample of the open-relay proof) against `policy`: Ok when
/// every line of it holds, else what failed. `dkim` as for [`run::Runner::with_dkim`].
pub fn replay(
    std_dir: Option<PathBuf>,
    policy: &Path,
    case: &str,
    dkim: Option<run::DkimSign>,
) -> Result<(), Vec<String>> {
    let text = format!("policy: {}\n\n{case}", policy.display());
    let path = policy.with_extension("counterexample.transcript");
    let file = parse(&path, &text)
        .map_err(|e| e.iter().map(|x| format!("line {}: {}", x.line, x.message)).collect::<Vec<_>>())?;
    let mut runner = run::Runner::new(std_dir).with_dkim(dkim);
    let mut failures = Vec::new();
    for r in runner.run_file(&file) {
        if !r.passed() {
            failures.extend(r.failures);
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures)
    }
}

/// `proxy-filter: reply CODE [X.Y.Z] TEXT`, `error [TEXT]` or `timeout`.
fn parse_proxy_filter(value: &str) -> Result<crate::before_queue::FilterOutcome, String> {
    use crate::before_queue::FilterOutcome;
    let (word, arg) = value.split_once(char::is_whitespace).unwrap_or((value, ""));
    let arg = arg.trim();
    match word {
        "reply" => match crate::smtp::Reply::parse(arg) {
            Some(r) => Ok(FilterOutcome::Replied(r)),
            None => Err(format!("`{arg}` is not a reply: write `proxy-filter: reply 250 2.0.0 Ok: queued as 1A2B`")),
        },
        "error" => Ok(FilterOutcome::Failed(if arg.is_empty() { "the filter is down".into() } else { arg.into() })),
        "timeout" => Ok(FilterOutcome::Failed("timed out waiting for the filter".into())),
        other => {
            Err(format!("`{other}` is not a proxy filter answer: reply CODE [X.Y.Z] TEXT, error [TEXT] or timeout"))
        }
    }
}

/// One `milter NAME:` line's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MilterFixture {
    Verdict(crate::milter::MilterVerdict),
    Modification(crate::milter::Modification),
    /// The milter cannot answer (down, protocol error, time-out): its default action.
    Error(String),
}

fn parse_milter(name: &str, value: &str) -> Result<Item, String> {
    use crate::milter::{MilterVerdict as V, Modification as M};
    if name.is_empty() {
        return Err("`milter NAME:` needs the milter's name".into());
    }
    let (stage, rest) = value.split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    let (stage, rcpt) = match stage.split_once('=') {
        Some(("rcpt", a)) => ("rcpt", Some(a.trim_matches(['<', '>']).to_ascii_lowercase())),
        _ => (stage, None),
    };
    if !matches!(stage, "connect" | "helo" | "mail" | "rcpt" | "data") {
        return Err(format!(
            "`{stage}` is not a milter stage: write `milter {name}: STAGE ANSWER` with connect, helo, mail, rcpt (or rcpt=ADDRESS) or data"
        ));
    }
    let (word, arg) = rest.split_once(' ').map(|(w, a)| (w, a.trim())).unwrap_or((rest, ""));
    let header = |a: &str| -> Result<(String, String), String> {
        let (n, v) = a.split_once(':').ok_or_else(|| format!("`{a}` is not `NAME: VALUE`"))?;
        Ok((n.trim().to_string(), v.trim().replace("\\n", "\n")))
    };
    let index = |a: &str| -> Result<(u32, String), String> {
        let (i, r) = a.split_once(' ').ok_or_else(|| format!("`{a}` needs a position and a field"))?;
        Ok((i.parse().map_err(|_| format!("`{i}` is not a position"))?, r.trim().to_string()))
    };
    let answer = match word {
        "continue" => MilterFixture::Verdict(V::Continue),
        "accept" => MilterFixture::Verdict(V::Accept),
        "reject" => MilterFixture::Verdict(V::Reject),
        "tempfail" => MilterFixture::Verdict(V::Tempfail),
        "discard" => MilterFixture::Verdict(V::Discard),
        "reply" => MilterFixture::Verdict(crate::milter::parse_reply(arg).map_err(|e| e.0)?),
        "error" => MilterFixture::Error(if arg.is_empty() { "milter is down".into() } else { arg.to_string() }),
        "timeout" => MilterFixture::Error("timed out".into()),
        _ if stage != "data" => {
            return Err(format!(
                "`{word}` is not a milter answer at {stage}: continue, accept, reject, tempfail, discard, reply CODE TEXT, error or timeout (modifications only at data)"
            ))
        }
        "quarantine" => MilterFixture::Modification(M::Quarantine(arg.to_string())),
        "add-header" => {
            let (name, value) = header(arg)?;
            MilterFixture::Modification(M::AddHeader { name, value })
        }
        "insert-header" | "change-header" => {
            let (index, rest) = index(arg)?;
            let (name, value) = header(&rest)?;
            MilterFixture::Modification(if word == "insert-header" {
                M::InsertHeader { index, name, value }
            } else {
                M::ChangeHeader { index, name, value }
            })
        }
        "delete-header" => {
            let (index, name) = index(arg)?;
            MilterFixture::Modification(M::ChangeHeader { index, name, value: String::new() })
        }
        "change-sender" => MilterFixture::Modification(M::ChangeFrom { address: arg.to_string(), args: String::new() }),
        "add-rcpt" => MilterFixture::Modification(M::AddRcpt { address: arg.to_string(), args: String::new() }),
        "delete-rcpt" => MilterFixture::Modification(M::DelRcpt(arg.to_string())),
        "replace-body" => {
            MilterFixture::Modification(M::ReplaceBody(format!("{}\r\n", arg.replace("\\n", "\r\n")).into_bytes()))
        }
        other => return Err(format!("`{other}` is not a milter answer or modification")),
    };
    Ok(Item::Milter { milter: name.to_string(), stage: stage.to_string(), rcpt, answer })
}
