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
    Keys(KeyRows),
    /// `cidr`: the first network containing the address wins.
    Cidr(Vec<(Cidr, String)>),
    /// `regexp` and `pcre`: `(pattern, case-insensitive, value)`; the first match wins.
    Patterns(Vec<(String, bool, String)>),
}

/// Keyed entries in file order, kept as one text and the ends of each key and value: a
/// 1,000,000-entry table is held by the proof (and the daemon, to prove a change against)
/// in about the size of its file, not two allocations per entry.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KeyRows {
    text: String,
    /// Per entry: where its key ends and where its value ends; its key starts where the
    /// previous entry's value ended.
    ends: Vec<(usize, usize)>,
}

impl KeyRows {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// `(key, value)` in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        let mut start = 0;
        self.ends.iter().map(move |&(k, v)| {
            let key = self.text.get(start..k).unwrap_or("");
            let value = self.text.get(k..v).unwrap_or("");
            start = v;
            (key, value)
        })
    }

    fn push(&mut self, key: &str, value: &str) {
        self.text.push_str(key);
        let k = self.text.len();
        self.text.push_str(value);
        self.ends.push((k, self.text.len()));
    }
}

impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for KeyRows {
    /// Every pair as given (no key is dropped: see [`first_of_each_key`]).
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> KeyRows {
        let mut rows = KeyRows::default();
        for (k, v) in iter {
            rows.push(k.as_ref(), v.as_ref());
        }
        rows
    }
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
fn first_of_each_key(rows: KeyRows) -> KeyRows {
    let keep: Vec<bool> = {
        let mut seen = std::collections::HashSet::with_capacity(rows.len());
        rows.iter().map(|(k, _)| seen.insert(k)).collect()
    };
    if keep.iter().all(|k| *k) {
        return rows;
    }
    rows.iter().zip(keep).filter(|(_, keep)| *keep).map(|(kv, _)| kv).collect()
}

/// Parse a table file of the given kind.
pub fn parse_rows(kind: &str, text: &str) -> Result<Rows, TableError> {
    match kind {
        "list" | "map" | "access" => {
            let list = kind == "list";
            let mut rows = KeyRows::default();
            let mut key = String::new();
            for (_, l) in entries(text) {
                let (k, v) = split_kv(l);
                key.clear();
                key.push_str(k);
                key.make_ascii_lowercase();
                rows.push(&key, if list { "" } else { v });
            }
            Ok(Rows::Keys(first_of_each_key(rows)))
        }
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
            Rows::Keys([("a@x", "one"), ("b@x", "two words")].into_iter().collect())
        );
        assert_eq!(
            parse_rows("regexp", "/a\\/b/I OK\n").unwrap(),
            Rows::Patterns(vec![("a\\/b".into(), false, "OK".into())])
        );
        assert_eq!(parse_rows("cidr", "x y").unwrap_err().line, 1);
    }
}
