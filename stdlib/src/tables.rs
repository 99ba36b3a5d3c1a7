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
}

/// A line the parser could not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableError {
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for TableError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

fn entries(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())).filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

fn split_kv(l: &str) -> (&str, &str) {
    match l.split_once(char::is_whitespace) {
        Some((k, v)) => (k, v.trim()),
        None => (l, ""),
    }
}

impl FileTable {
    pub fn parse(kind: &str, text: &str) -> Result<FileTable, TableError> {
        match kind {
            "list" => Ok(FileTable::Map(
                entries(text).map(|(_, l)| (split_kv(l).0.to_ascii_lowercase(), String::new())).collect(),
            )),
            "map" | "access" => {
                let mut m = HashMap::new();
                for (_, l) in entries(text) {
                    let (k, v) = split_kv(l);
                    // The first entry of a key wins, as in Postfix's texthash.
                    m.entry(k.to_ascii_lowercase()).or_insert_with(|| v.to_string());
                }
                Ok(FileTable::Map(m))
            }
            "cidr" => {
                let mut v = Vec::new();
                for (n, l) in entries(text) {
                    let (k, val) = split_kv(l);
                    let c = Cidr::parse(k)
                        .ok_or_else(|| TableError { line: n, message: format!("\"{k}\" is not a network") })?;
                    v.push((c, val.to_string()));
                }
                Ok(FileTable::Cidr(v))
            }
            "pcre" => {
                let mut v = Vec::new();
                for (n, l) in entries(text) {
                    let (pat, flags, value) = split_pattern(l).map_err(|message| TableError { line: n, message })?;
                    let re = pcre2::bytes::RegexBuilder::new()
                        .caseless(!flags.contains('I'))
                        .utf(true)
                        .jit_if_available(true)
                        .build(pat)
                        .map_err(|e| TableError { line: n, message: format!("bad pattern: {e}") })?;
                    v.push((re, value.to_string()));
                }
                Ok(FileTable::Pcre(v))
            }
            "regexp" => {
                let mut v = Vec::new();
                for (n, l) in entries(text) {
                    let Some(rest) = l.strip_prefix('/') else {
                        return Err(TableError { line: n, message: "a pattern starts with `/`".into() });
                    };
                    let Some(end) = find_unescaped_slash(rest) else {
                        return Err(TableError { line: n, message: "the pattern has no closing `/`".into() });
                    };
                    let pat = &rest[..end];
                    let after = &rest[end + 1..];
                    let (flags, value) = match after.split_once(char::is_whitespace) {
                        Some((f, v)) => (f, v.trim()),
                        None => (after, ""),
                    };
                    let re = regex::RegexBuilder::new(pat)
                        .case_insensitive(!flags.contains('I'))
                        .size_limit(1 << 20)
                        .build()
                        .map_err(|e| TableError {
                            line: n,
                            message: format!("bad pattern: {}", e.to_string().lines().last().unwrap_or("")),
                        })?;
                    v.push((re, value.to_string()));
                }
                Ok(FileTable::Regexp(v))
            }
            other => Err(TableError { line: 0, message: format!("`{other}` is not a file table kind") }),
        }
    }

    /// The value for `key`, or None. Keys are compared case-insensitively.
    pub fn lookup(&self, key: &str) -> Option<String> {
        match self {
            FileTable::Map(m) => m.get(&key.to_ascii_lowercase()).cloned(),
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
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `/PATTERN/FLAGS VALUE` into its parts.
fn split_pattern(l: &str) -> Result<(&str, &str, &str), String> {
    let rest = l.strip_prefix('/').ok_or("a pattern starts with `/`")?;
    let end = find_unescaped_slash(rest).ok_or("the pattern has no closing `/`")?;
    let after = &rest[end + 1..];
    let (flags, value) = match after.split_once(char::is_whitespace) {
        Some((f, v)) => (f, v.trim()),
        None => (after, ""),
    };
    Ok((&rest[..end], flags, value))
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

fn find_unescaped_slash(s: &str) -> Option<usize> {
    let mut esc = false;
    for (i, c) in s.char_indices() {
        if esc {
            esc = false;
        } else if c == '\\' {
            esc = true;
        } else if c == '/' {
            return Some(i);
        }
    }
    None
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
