//! The text formats of file tables (`list`, `map`, `access`, `cidr`, `regexp`, `pcre`):
//! one entry per line, `#` comments and blank lines ignored. Pure parsing, shared by the
//! runtime (which compiles the patterns and looks keys up, in `mailpolicy_stdlib::tables`)
//! and the open-relay proof (which reads the tables present when the policy is checked).

use crate::ir::Cidr;

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

/// The entries of a table file, in file order.
#[derive(Debug, Clone, PartialEq)]
pub enum Rows {
    /// `list` (empty values), `map` and `access`: lower-cased keys; the first entry of a
    /// key wins, as in Postfix's texthash.
    Keys(Vec<(String, String)>),
    /// `cidr`: the first network containing the address wins.
    Cidr(Vec<(Cidr, String)>),
    /// `regexp` and `pcre`: `(pattern, case-insensitive, value)`; the first match wins.
    Patterns(Vec<(String, bool, String)>),
}

/// The lines that hold entries, with their 1-based numbers.
pub fn entries(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())).filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

/// `KEY VALUE...` into the key and the rest of the line.
pub fn split_kv(l: &str) -> (&str, &str) {
    match l.split_once(char::is_whitespace) {
        Some((k, v)) => (k, v.trim()),
        None => (l, ""),
    }
}

/// `/PATTERN/FLAGS VALUE` into its parts.
pub fn split_pattern(l: &str) -> Result<(&str, &str, &str), String> {
    let rest = l.strip_prefix('/').ok_or("a pattern starts with `/`")?;
    let end = find_unescaped_slash(rest).ok_or("the pattern has no closing `/`")?;
    let pat = rest.get(..end).ok_or("the pattern has no closing `/`")?;
    let after = rest.get(end + 1..).unwrap_or("");
    let (flags, value) = match after.split_once(char::is_whitespace) {
        Some((f, v)) => (f, v.trim()),
        None => (after, ""),
    };
    Ok((pat, flags, value))
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

/// The first entry of each key, in file order. The set borrows the keys instead of
/// holding a copy of each (a 1,000,000-entry table is read at every daemon start).
fn first_of_each_key(mut rows: Vec<(String, String)>) -> Vec<(String, String)> {
    let keep: Vec<bool> = {
        let mut seen = std::collections::HashSet::with_capacity(rows.len());
        rows.iter().map(|(k, _)| seen.insert(k.as_str())).collect()
    };
    if keep.iter().all(|k| *k) {
        return rows;
    }
    let mut keep = keep.into_iter();
    rows.retain(|_| keep.next().unwrap_or(true));
    rows
}

/// Parse a table file of the given kind.
pub fn parse_rows(kind: &str, text: &str) -> Result<Rows, TableError> {
    match kind {
        "list" => Ok(Rows::Keys(first_of_each_key(
            entries(text).map(|(_, l)| (split_kv(l).0.to_ascii_lowercase(), String::new())).collect(),
        ))),
        "map" | "access" => Ok(Rows::Keys(first_of_each_key(
            entries(text)
                .map(|(_, l)| {
                    let (k, v) = split_kv(l);
                    (k.to_ascii_lowercase(), v.to_string())
                })
                .collect(),
        ))),
        "cidr" => {
            let mut v = Vec::new();
            for (n, l) in entries(text) {
                let (k, val) = split_kv(l);
                let c = Cidr::parse(k)
                    .ok_or_else(|| TableError { line: n, message: format!("\"{k}\" is not a network") })?;
                v.push((c, val.to_string()));
            }
            Ok(Rows::Cidr(v))
        }
        "regexp" | "pcre" => {
            let mut v = Vec::new();
            for (n, l) in entries(text) {
                let (pat, flags, value) = split_pattern(l).map_err(|message| TableError { line: n, message })?;
                v.push((pat.to_string(), !flags.contains('I'), value.to_string()));
            }
            Ok(Rows::Patterns(v))
        }
        other => Err(TableError { line: 0, message: format!("`{other}` is not a file table kind") }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows() {
        assert_eq!(
            parse_rows("map", "# c\nA@x  one\nb@x two words\na@x other\n").unwrap(),
            Rows::Keys(vec![("a@x".into(), "one".into()), ("b@x".into(), "two words".into())])
        );
        assert_eq!(
            parse_rows("regexp", "/a\\/b/I OK\n").unwrap(),
            Rows::Patterns(vec![("a\\/b".into(), false, "OK".into())])
        );
        assert_eq!(parse_rows("cidr", "x y").unwrap_err().line, 1);
    }
}
