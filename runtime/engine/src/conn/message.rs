//! The message as it is queued: the DATA stage's header edits and the `Received:` field
//! inside the header section, and a field put on top.

use super::*;

impl Conn {
    /// Apply header changes and prepend the Received: header, inside the header section
    /// only ([`crate::headers`]: the boundary as a parser finds it, any line-ending style).
    pub(super) fn edit_message(&self, data: &[u8]) -> (Vec<u8>, Vec<(String, String)>) {
        use crate::headers::Edit;
        let mut added = Vec::new();
        let mut edits = Vec::new();
        for e in &self.tx.headers {
            match e {
                Effect::HeaderAdd { name, value } => {
                    edits.push(Edit::Add(name.clone(), value.clone()));
                    added.push((name.clone(), value.clone()));
                }
                Effect::HeaderRemove(name) => edits.push(Edit::Remove(name.clone())),
                Effect::HeaderAppend { name, value } => {
                    edits.push(Edit::Append(name.clone(), value.clone()));
                    added.push((name.clone(), value.clone()));
                }
                Effect::HeaderInsert { index, name, value } => {
                    edits.push(Edit::Insert(*index, name.clone(), value.clone()));
                    added.push((name.clone(), value.clone()));
                }
                Effect::HeaderChange { index, name, value } => {
                    edits.push(Edit::Change(*index, name.clone(), value.clone()))
                }
                Effect::HeaderReplace { name, value } => {
                    edits.push(Edit::Replace(name.clone(), value.clone()));
                    added.push((name.clone(), value.clone()));
                }
                _ => {}
            }
        }
        (crate::headers::edit(data, &self.received_header(), &edits), added)
    }

    fn received_header(&self) -> String {
        let helo = self.facts.helo.as_ref().map(|h| h.0.as_str()).unwrap_or("unknown");
        let hostname = &self.session.config().hostname;
        let proto = match (
            self.facts.helo.as_ref().is_some_and(|h| h.1),
            self.facts.tls.is_some(),
            self.facts.auth.is_some(),
        ) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, true, false) => "ESMTPS",
            (true, false, true) => "ESMTPA",
            (true, true, true) => "ESMTPSA",
        };
        let clean = |s: &str| s.chars().filter(|c| !c.is_control() && *c != '(' && *c != ')').collect::<String>();
        format!(
            "Received: from {} ({} [{}])\r\n\tby {} (mailpolicy) with {}; {}\r\n",
            clean(helo),
            clean(&self.facts.client_name),
            self.facts.client_ip,
            hostname,
            proto,
            crate::date::rfc2822(self.facts.now_ms)
        )
    }
}

/// `field` (with or without its CRLF) on top of `data`.
pub(super) fn prepend_field(field: &str, data: &[u8]) -> Vec<u8> {
    let f = field.trim_end_matches(['\r', '\n']);
    let mut out = Vec::with_capacity(f.len() + 2 + data.len());
    if !f.is_empty() && f.contains(':') {
        out.extend_from_slice(f.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(data);
    out
}
