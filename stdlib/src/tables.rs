//! File tables: the formats of `list`, `map`, `access`, `cidr`, `regexp` and `pcre` tables,
//! parsed from text (the host reads the file and re-reads it when it changes) and looked up.
//!
//! Formats (one entry per line, `#` comments and blank lines ignored, keys case-insensitive):
//! - `list`: a key per line; a hit has the empty value.
//! - `map`, `access`: `KEY VALUE...`; the value is the rest of the line.
//! - `cidr`: `NETWORK VALUE...`; the first network containing the address wins.
//! - `regexp`, `pcre`: `/PATTERN/[I] VALUE...`; the first match wins; `$1`.. in the value
//!   are replaced by the pattern's groups; matching ignores case unless the flag `I` is
//!   given. `regexp` tables use the Rust regex engine (linear time); `pcre` tables use PCRE2
//!   itself (look-around, back-references), with a match limit so a pattern cannot run away.

use std::collections::HashMap;
use std::net::IpAddr;

use mailpolicy_lang::ir::Cidr;

#[derive(Debug, Clone)]
pub enum FileTable {
    Map(HashMap<String, String>),
    Pcre(Vec<(pcre2::bytes::Regex, String)>),
    Cidr(Vec<(Cidr, String)>),
    Regexp(Vec<(regex::Regex, String)>),
    /// A `list`, `map` or `access` table compiled by `mailc table compile` ([`crate::cdb`]).
    Compiled(crate::cdb::Cdb),
}

pub use mailpolicy_lang::tables::TableError;
use mailpolicy_lang::tables::{parse_rows, Rows};

impl FileTable {
    pub fn parse(kind: &str, text: &str) -> Result<FileTable, TableError> {
        match parse_rows(kind, text)? {
            Rows::Keys(keys) => Ok(FileTable::Map(keys.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())),
            Rows::Cidr(v) => Ok(FileTable::Cidr(v)),
            Rows::Patterns(rows) if kind == "pcre" => {
                let mut v = Vec::new();
                for (n, (pat, ci, value)) in rows.into_iter().enumerate() {
                    let re = pcre2::bytes::RegexBuilder::new()
                        .caseless(ci)
                        .utf(true)
                        .jit_if_available(true)
                        .build(&pat)
                        .map_err(|e| TableError { line: line_of(text, n), message: format!("bad pattern: {e}") })?;
                    v.push((re, value));
                }
                Ok(FileTable::Pcre(v))
            }
            Rows::Patterns(rows) => {
                let mut v = Vec::new();
                for (n, (pat, ci, value)) in rows.into_iter().enumerate() {
                    let re = regex::RegexBuilder::new(&pat).case_insensitive(ci).size_limit(1 << 20).build().map_err(
                        |e| TableError {
                            line: line_of(text, n),
                            message: format!("bad pattern: {}", e.to_string().lines().last().unwrap_or("")),
                        },
                    )?;
                    v.push((re, value));
                }
                Ok(FileTable::Regexp(v))
            }
        }
    }

    /// The value for `key`, or None. Keys are compared case-insensitively.
    pub fn lookup(&self, key: &str) -> Option<String> {
        match self {
            FileTable::Map(m) => m.get(&key.to_ascii_lowercase()).cloned(),
            FileTable::Compiled(c) => {
                c.get(key.to_ascii_lowercase().as_bytes()).map(|v| String::from_utf8_lossy(v).into_owned())
            }
            FileTable::Cidr(v) => {
                let ip: IpAddr = key.parse().ok()?;
                v.iter().find(|(c, _)| c.contains(ip)).map(|(_, val)| val.clone())
            }
            FileTable::Pcre(v) => v.iter().find_map(|(re, val)| {
                // A pattern that errors (e.g. its match limit) does not match.
                let caps = re.captures(key.as_bytes()).ok().flatten()?;
                Some(expand_groups(val, |i| caps.get(i).map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned())))
            }),
            FileTable::Regexp(v) => v.iter().find_map(|(re, val)| {
                re.captures(key).map(|caps| {
                    let mut out = String::new();
                    caps.expand(val, &mut out);
                    out
                })
            }),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            FileTable::Map(m) => m.len(),
            FileTable::Cidr(v) => v.len(),
            FileTable::Regexp(v) => v.len(),
            FileTable::Pcre(v) => v.len(),
            FileTable::Compiled(c) => usize::try_from(c.meta().entries).unwrap_or(usize::MAX),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The line number of the `n`-th entry (0-based) of a table file.
fn line_of(text: &str, n: usize) -> usize {
    mailpolicy_lang::tables::entries(text).nth(n).map(|(l, _)| l).unwrap_or(0)
}

/// Replace `$N` and `${N}` in a table value by the match's groups.
fn expand_groups(template: &str, group: impl Fn(usize) -> Option<String>) -> String {
    let mut out = String::new();
    let b = template.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' {
            let (digits, skip) = if b.get(i + 1) == Some(&b'{') {
                let end = template[i + 2..].find('}').map(|e| i + 2 + e);
                match end {
                    Some(e) => (&template[i + 2..e], e + 1 - i),
                    None => ("", 0),
                }
            } else {
                let n = template[i + 1..].bytes().take_while(u8::is_ascii_digit).count();
                (&template[i + 1..i + 1 + n], n + 1)
            };
            if let (Ok(n), true) = (digits.parse::<usize>(), skip > 0) {
                out.push_str(&group(n).unwrap_or_default());
                i += skip;
                continue;
            }
        }
        let ch = template[i..].chars().next().unwrap_or('$');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_and_list() {
        let t = FileTable::parse(
            "map",
            "# c\nAlice@Example.com  alice\n\nbob@example.com bob smith\nalice@example.com other\n",
        )
        .unwrap();
        assert_eq!(t.lookup("alice@example.COM").as_deref(), Some("alice"));
        assert_eq!(t.lookup("bob@example.com").as_deref(), Some("bob smith"));
        assert_eq!(t.lookup("carol@example.com"), None);
        let l = FileTable::parse("list", "a@x\nb@x\n").unwrap();
        assert_eq!(l.lookup("B@X").as_deref(), Some(""));
    }

    #[test]
    fn cidr() {
        let t = FileTable::parse("cidr", "192.0.2.0/24 REJECT\n10.0.0.0/8 OK\n").unwrap();
        assert_eq!(t.lookup("192.0.2.9").as_deref(), Some("REJECT"));
        assert_eq!(t.lookup("198.51.100.1"), None);
        assert!(FileTable::parse("cidr", "nonsense OK").is_err());
    }

    #[test]
    fn pcre_tables_use_pcre2() {
        // Look-ahead and back-references: PCRE features the regex crate does not have.
        let t = FileTable::parse(
            "pcre",
            "/^(?!friend@)(.+)@spam\\.example$/ REJECT $1 is not welcome\n/^(\\w)\\1{3}/ HOLD repeated ${1}\n",
        )
        .unwrap();
        assert_eq!(t.lookup("joe@SPAM.example").as_deref(), Some("REJECT joe is not welcome"));
        assert_eq!(t.lookup("friend@spam.example"), None);
        assert_eq!(t.lookup("aaaa@x").as_deref(), Some("HOLD repeated a"));
        assert!(FileTable::parse("pcre", "/(?<=/ x").is_err());
    }

    #[test]
    fn regexp() {
        let t = FileTable::parse("regexp", "/^Subject: (ILOVEYOU)/ REJECT virus $1\n/a\\/b/ OK\n").unwrap();
        assert_eq!(t.lookup("subject: iloveyou").as_deref(), Some("REJECT virus iloveyou"));
        assert_eq!(t.lookup("x a/b y").as_deref(), Some("OK"));
        assert_eq!(FileTable::parse("regexp", "/(/ x").unwrap_err().line, 1);
    }
}
