//! The header section of a message as bytes: where it ends, its fields, and the edits the
//! policy makes to it. No I/O, no decoding, no `&str` slicing: messages are peer input in
//! any encoding and any line-ending style.
//!
//! **The boundary.** Lines end with LF, optionally preceded by CR (CRLF); the header
//! section ends at the first empty line (an empty line or a lone CR before the LF), as
//! mail parsers read it, whatever the line-ending style: a `BODY=BINARYMIME` message with
//! bare LF line ends has its boundary at its first `LF LF`. A message that starts with an
//! empty line has an empty header section; a message with no empty line is all header.
//! Header edits touch only fields inside the boundary, never a body line (nor a line of an
//! embedded message/rfc822).

/// The offset where the header section ends: the start of the empty line that separates
/// it from the body, or `data.len()` when there is none. `data[..header_end(data)]` is the
/// header section, each of its lines with its own line end.
pub fn header_end(data: &[u8]) -> usize {
    let mut start = 0;
    while start < data.len() {
        let line_end = match data.get(start..).and_then(|rest| rest.iter().position(|b| *b == b'\n')) {
            Some(i) => start + i + 1,
            None => data.len(),
        };
        let line = data.get(start..line_end).unwrap_or(&[]);
        if is_blank(line) {
            return start;
        }
        start = line_end;
    }
    data.len()
}

/// A line that is empty apart from its line end (`LF`, `CR LF`).
fn is_blank(line: &[u8]) -> bool {
    let content = line.strip_suffix(b"\n").unwrap_or(line);
    let content = content.strip_suffix(b"\r").unwrap_or(content);
    content.is_empty() && line.last() == Some(&b'\n')
}

/// The line end the message uses (that of its first line): `\n` for bare-LF messages,
/// `\r\n` otherwise. Header lines the server adds use it, so an LF message stays LF.
pub fn line_ending(data: &[u8]) -> &'static str {
    match data.iter().position(|b| *b == b'\n') {
        Some(i) if i > 0 && data.get(i - 1) == Some(&b'\r') => "\r\n",
        Some(_) => "\n",
        None => "\r\n",
    }
}

/// The header fields of a header section, each with its continuation lines, as byte
/// ranges of `head`. Lines before the first field that are not fields (an mbox `From `
/// line) are fields of their own with no name.
pub fn fields(head: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    let mut start = 0;
    while start < head.len() {
        let end = match head.get(start..).and_then(|rest| rest.iter().position(|b| *b == b'\n')) {
            Some(i) => start + i + 1,
            None => head.len(),
        };
        let continuation = matches!(head.get(start), Some(b' ' | b'\t'));
        match out.last_mut() {
            Some(last) if continuation => last.end = end,
            _ => out.push(start..end),
        }
        start = end;
    }
    out
}

/// The field name of a field's bytes, lower case (ASCII), or empty when the line has no
/// colon. Names are compared as bytes: a name with 8-bit bytes never equals an ASCII name.
pub fn field_name(field: &[u8]) -> Vec<u8> {
    let line_end = field.iter().position(|b| *b == b'\n').unwrap_or(field.len());
    let first = field.get(..line_end).unwrap_or(field);
    match first.iter().position(|b| *b == b':') {
        Some(colon) => {
            let name = first.get(..colon).unwrap_or(&[]);
            name.trim_ascii().to_ascii_lowercase()
        }
        None => Vec::new(),
    }
}

/// How many `Received:` fields the header section holds (mail-loop detection). Body lines
/// are never counted.
pub fn received_count(data: &[u8]) -> usize {
    let head = data.get(..header_end(data)).unwrap_or(&[]);
    fields(head).into_iter().filter(|r| head.get(r.clone()).is_some_and(|f| field_name(f) == b"received")).count()
}

/// An edit of the header section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Edit {
    /// Prepend `NAME: VALUE`.
    Add(String, String),
    /// Remove every field with this name (case-insensitive).
    Remove(String),
    /// Remove every field with this name, then prepend `NAME: VALUE`.
    Replace(String, String),
    /// Append `NAME: VALUE` at the end of the header section. A value may be folded with
    /// `\n` (a milter's fields are): each line break becomes the message's line end and a
    /// continuation line always starts with white space.
    Append(String, String),
    /// Insert `NAME: VALUE` before the field at this position (0: first).
    Insert(u32, String, String),
    /// The `index`-th (1-based) field with this name gets the value; an empty value
    /// removes it; appended when there is no such field.
    Change(u32, String, String),
}

/// `NAME: VALUE` with folded lines in the message's line ending; no line can start a new
/// field (a continuation line without leading white space gets a tab).
fn folded_field(name: &str, value: &str, eol: &str) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(name.as_bytes());
    out.push(b':');
    let value = if value.starts_with([' ', '\t']) { value.to_string() } else { format!(" {value}") };
    for (i, line) in value.split('\n').enumerate() {
        let line = line.trim_end_matches('\r');
        // No control character but tab survives (a peer's value, e.g. a milter's).
        let line: String = line.chars().map(|c| if c.is_control() && c != '\t' { ' ' } else { c }).collect();
        if i > 0 {
            if line.trim().is_empty() {
                continue;
            }
            out.extend_from_slice(eol.as_bytes());
            if !line.starts_with([' ', '\t']) {
                out.push(b'\t');
            }
        }
        out.extend_from_slice(line.as_bytes());
    }
    out.extend_from_slice(eol.as_bytes());
    out
}

/// Apply `edits` to the header section of `data` and prepend `prefix` (already formatted
/// header lines, e.g. our Received:, written with `\r\n`; they are converted to the
/// message's own line end). Added fields come after `prefix` in the order of the edits;
/// the body (everything from the empty line on) is copied unchanged.
pub fn edit(data: &[u8], prefix: &str, edits: &[Edit]) -> Vec<u8> {
    let eol = line_ending(data);
    let split = header_end(data);
    let (head, body) = data.split_at(split.min(data.len()));
    // The fields of the header section, each as it was or as an edit made it.
    let mut keep: Vec<std::borrow::Cow<[u8]>> =
        fields(head).into_iter().filter_map(|r| head.get(r)).map(std::borrow::Cow::Borrowed).collect();
    let mut added: Vec<String> = Vec::new();
    for e in edits {
        match e {
            Edit::Add(name, value) => added.push(format!("{name}: {value}")),
            Edit::Remove(name) => {
                let n = name.to_ascii_lowercase().into_bytes();
                keep.retain(|f| field_name(f) != n);
            }
            Edit::Replace(name, value) => {
                let n = name.to_ascii_lowercase().into_bytes();
                keep.retain(|f| field_name(f) != n);
                added.push(format!("{name}: {value}"));
            }
            Edit::Append(name, value) => keep.push(folded_field(name, value, eol).into()),
            Edit::Insert(index, name, value) => {
                let at = (*index as usize).min(keep.len());
                keep.insert(at, folded_field(name, value, eol).into());
            }
            Edit::Change(index, name, value) => {
                let n = name.to_ascii_lowercase().into_bytes();
                let at = keep
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| field_name(f) == n)
                    .nth((*index as usize).saturating_sub(1))
                    .map(|(i, _)| i);
                match (at, value.is_empty()) {
                    (Some(i), true) => {
                        keep.remove(i);
                    }
                    (Some(i), false) => {
                        if let Some(slot) = keep.get_mut(i) {
                            *slot = folded_field(name, value, eol).into();
                        }
                    }
                    (None, true) => {}
                    (None, false) => keep.push(folded_field(name, value, eol).into()),
                }
            }
        }
    }
    let mut out = Vec::with_capacity(data.len() + prefix.len() + 256);
    for line in prefix.split_inclusive('\n') {
        let content = line.strip_suffix('\n').unwrap_or(line);
        let content = content.strip_suffix('\r').unwrap_or(content);
        out.extend_from_slice(content.as_bytes());
        out.extend_from_slice(eol.as_bytes());
    }
    for a in added {
        // A value never carries a line break of its own (the evaluator renders values on
        // one line); strip any that a peer-supplied interpolation brought in.
        let line: String = a.chars().filter(|c| *c != '\r' && *c != '\n').collect();
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(eol.as_bytes());
    }
    for f in keep {
        out.extend_from_slice(&f);
    }
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundary_for_each_line_ending_style() {
        assert_eq!(header_end(b"A: 1\r\nB: 2\r\n\r\nbody\r\n"), 12);
        assert_eq!(header_end(b"A: 1\nB: 2\n\nbody\n"), 10);
        // mixed: a CRLF header section whose blank line is a bare LF
        assert_eq!(header_end(b"A: 1\r\n\nbody"), 6);
        // an empty header section
        assert_eq!(header_end(b"\r\nHello\r\nX-Spam-Flag: YES\r\n\r\nlast\r\n"), 0);
        assert_eq!(header_end(b"\nHello\n"), 0);
        // all header
        assert_eq!(header_end(b"A: 1\r\nB: 2"), 10);
        // a line of spaces is not empty (it is a continuation line)
        assert_eq!(header_end(b"A: 1\r\n \r\nB: 2\r\n\r\nx"), 15);
    }

    #[test]
    fn milter_edits_by_position() {
        let m = b"A: 1\r\nB: 2\r\nA: 3\r\n\r\nbody\r\n";
        let out = edit(m, "", &[Edit::Change(2, "a".into(), "three\n\tfolded".into())]);
        assert_eq!(out, b"A: 1\r\nB: 2\r\na: three\r\n\tfolded\r\n\r\nbody\r\n".to_vec());
        let out =
            edit(m, "", &[Edit::Change(1, "B".into(), String::new()), Edit::Insert(0, "X".into(), "y\nZ: no".into())]);
        assert_eq!(out, b"X: y\r\n\tZ: no\r\nA: 1\r\nA: 3\r\n\r\nbody\r\n".to_vec());
        let out = edit(m, "", &[Edit::Append("C".into(), " c".into()), Edit::Change(5, "Q".into(), "q".into())]);
        assert_eq!(out, b"A: 1\r\nB: 2\r\nA: 3\r\nC: c\r\nQ: q\r\n\r\nbody\r\n".to_vec());
    }

    #[test]
    fn remove_never_touches_the_body() {
        let lf = b"Subject: s\nX-Spam-Flag: YES\n\tfolded\n\nX-Spam-Flag: body line\nReceived: body\n";
        let out = edit(lf, "", &[Edit::Remove("x-spam-flag".into())]);
        assert_eq!(out, b"Subject: s\n\nX-Spam-Flag: body line\nReceived: body\n".to_vec());
        let empty = b"\r\nHello\r\nX-Spam-Flag: YES\r\n\r\nlast\r\n";
        let out = edit(empty, "Received: x\r\n", &[Edit::Remove("X-Spam-Flag".into())]);
        assert_eq!(out, b"Received: x\r\n\r\nHello\r\nX-Spam-Flag: YES\r\n\r\nlast\r\n".to_vec());
    }

    #[test]
    fn added_lines_follow_the_message_line_ending() {
        let out = edit(b"A: 1\n\nb\n", "Received: from x\r\n\tby y\r\n", &[Edit::Add("X-New".into(), "v".into())]);
        assert_eq!(out, b"Received: from x\n\tby y\nX-New: v\nA: 1\n\nb\n".to_vec());
        let out = edit(b"A: 1\r\n\r\nb\r\n", "", &[Edit::Replace("a".into(), "2".into())]);
        assert_eq!(out, b"a: 2\r\n\r\nb\r\n".to_vec());
    }

    #[test]
    fn received_counted_in_the_header_only_and_without_str_slicing() {
        let mut m = Vec::new();
        m.extend_from_slice("Receivé: x\nReceived: a\nreceived : b\nÄÄÄÄÄ: c\n\n".as_bytes());
        for _ in 0..55 {
            m.extend_from_slice(b"Received: in the body\n");
        }
        assert_eq!(received_count(&m), 2);
        assert_eq!(received_count("Rübezahl\r\n".as_bytes()), 0);
    }
}
