//! The message as the data stage and the queue side see it: headers (decoded address
//! fields included), body text, attachments, parsed with mail-parser, a panic of it caught.

/// A message as the data stage sees it.
#[derive(Clone, Debug, Default)]
pub struct MessageFacts {
    pub size: u64,
    /// Header fields in order, names as written, values unfolded.
    pub headers: Vec<(String, String)>,
    /// Decoded text of the body.
    pub body: String,
    pub attachment_names: Vec<String>,
    pub attachment_types: Vec<String>,
}

impl MessageFacts {
    /// Parse a message with mail-parser: header values unfolded and decoded (RFC 2047
    /// encoded words and RFC 6532 UTF-8 in text fields, and in the display names and
    /// mailboxes of address fields: `Müller <m@example.de>`); the body is the decoded text
    /// of every text part (HTML reduced to text), so `:contains` and `:regex` see what a
    /// reader sees whatever the transfer encoding; attachment names and part types come
    /// from every MIME part (R21, R41).
    ///
    /// A panic inside the parser on a hostile message is contained: the message gets the
    /// facts of an unparsed message (no header fields, the raw text as its body); hosts that
    /// must refuse such a message use [`MessageFacts::try_parse`].
    pub fn parse(data: &[u8]) -> MessageFacts {
        MessageFacts::try_parse(data).unwrap_or_else(|_| MessageFacts {
            size: data.len() as u64,
            body: String::from_utf8_lossy(data).into_owned(),
            ..Default::default()
        })
    }

    /// [`MessageFacts::parse`], or `Err` when the MIME parser panicked on this message.
    pub fn try_parse(data: &[u8]) -> Result<MessageFacts, ParserPanic> {
        std::panic::catch_unwind(|| MessageFacts::parse_inner(data)).map_err(|_| ParserPanic)
    }

    fn parse_inner(data: &[u8]) -> MessageFacts {
        use mail_parser::{HeaderValue, MessageParser, MimeHeaders};
        let mut m = MessageFacts { size: data.len() as u64, ..Default::default() };
        let Some(msg) = MessageParser::default().parse(data) else {
            // Not parseable as a message: keep the raw text so checks still see it.
            m.body = String::from_utf8_lossy(data).into_owned();
            return m;
        };
        let unfold =
            |v: &str| v.split(['\r', '\n']).map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ");
        for h in msg.headers() {
            let raw = msg
                .raw_message()
                .get(h.offset_start as usize..h.offset_end as usize)
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            let value = match h.value() {
                HeaderValue::Text(t) => unfold(t),
                HeaderValue::TextList(l) => unfold(&l.join(", ")),
                HeaderValue::Address(a) => match render_addresses(a) {
                    v if v.is_empty() => unfold(&raw),
                    v => unfold(&v),
                },
                _ => unfold(&raw),
            };
            m.headers.push((h.name().to_string(), value));
        }
        let mut body = String::new();
        for i in 0..msg.text_body.len() {
            if let Some(t) = msg.body_text(i) {
                if !body.is_empty() {
                    body.push_str("\r\n");
                }
                body.push_str(&t);
            }
        }
        m.body = body;
        for part in msg.parts.iter() {
            if let Some(ct) = part.content_type() {
                let t = match ct.subtype() {
                    Some(sub) => format!("{}/{}", ct.ctype(), sub),
                    None => ct.ctype().to_string(),
                }
                .to_ascii_lowercase();
                if !m.attachment_types.contains(&t) {
                    m.attachment_types.push(t);
                }
            }
            if let Some(name) = part.attachment_name() {
                let n = name.to_string();
                if !m.attachment_names.contains(&n) {
                    m.attachment_names.push(n);
                }
            }
        }
        m
    }

    pub fn header(&self, name: &str) -> Vec<String> {
        self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone()).collect()
    }
}

/// The MIME parser panicked on a message (a defect of the parser, contained to that message).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParserPanic;

/// An address field as a reader sees it: each mailbox as `Display Name <local@domain>` (or
/// the bare address), decoded, joined with `, `; a group as `Name: members;`.
fn render_addresses(a: &mail_parser::Address<'_>) -> String {
    fn one(a: &mail_parser::Addr<'_>) -> String {
        let name = a.name.as_deref().map(str::trim).filter(|n| !n.is_empty());
        match (name, a.address.as_deref()) {
            (Some(n), Some(addr)) => format!("{n} <{addr}>"),
            (None, Some(addr)) => addr.to_string(),
            (Some(n), None) => n.to_string(),
            (None, None) => String::new(),
        }
    }
    let list = |v: &[mail_parser::Addr<'_>]| v.iter().map(one).filter(|s| !s.is_empty()).collect::<Vec<_>>().join(", ");
    match a {
        mail_parser::Address::List(v) => list(v),
        mail_parser::Address::Group(groups) => groups
            .iter()
            .map(|g| match g.name.as_deref() {
                Some(n) => format!("{n}: {};", list(&g.addresses)),
                None => list(&g.addresses),
            })
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(", "),
    }
}
