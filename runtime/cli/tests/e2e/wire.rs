//! SMTP clients of the tests: `Client` (one connection, many messages) and `Smtp` (a message sent in three ways: DATA, raw DATA, BDAT), and checking what was delivered.

use super::*;

/// A minimal SMTP client: one connection, many messages; returns the markers of the
/// messages the server acknowledged with 250 after DATA.
pub(super) struct Client {
    pub(super) r: BufReader<TcpStream>,
    pub(super) w: TcpStream,
}

impl Client {
    pub(super) fn connect(port: u16) -> std::io::Result<Client> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.set_write_timeout(Some(Duration::from_secs(20)))?;
        let mut c = Client { r: BufReader::new(s.try_clone()?), w: s };
        c.expect(220)?;
        c.cmd("EHLO load.test", 250)?;
        Ok(c)
    }

    pub(super) fn reply(&mut self) -> std::io::Result<(u16, String)> {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line)? == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
            }
            text.push_str(&line);
            let code = line
                .get(..3)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad reply {line:?}")))?;
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok((code, text));
            }
        }
    }

    pub(super) fn expect(&mut self, code: u16) -> std::io::Result<String> {
        let (c, t) = self.reply()?;
        if c != code {
            return Err(std::io::Error::other(format!("expected {code}, got {t}")));
        }
        Ok(t)
    }

    pub(super) fn cmd(&mut self, line: &str, code: u16) -> std::io::Result<String> {
        self.w.write_all(format!("{line}\r\n").as_bytes())?;
        self.expect(code)
    }

    /// Sends one message; Ok(true) when the server said 250 to its data.
    pub(super) fn send(&mut self, marker: &str) -> std::io::Result<bool> {
        self.cmd("MAIL FROM:<load@s.test>", 250)?;
        self.cmd("RCPT TO:<sink@far.test>", 250)?;
        self.cmd("DATA", 354)?;
        let body = format!(
            "From: load@s.test\r\nTo: sink@far.test\r\nSubject: {marker}\r\nMessage-ID: <{marker}@load.test>\r\n\r\n{}.\r\n",
            format!("{}\r\n", "0123456789abcdef".repeat(4)).repeat(16)
        );
        self.w.write_all(body.as_bytes())?;
        let (code, _) = self.reply()?;
        Ok(code == 250)
    }
}

/// How a message is sent to the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Way {
    /// DATA with every line end made CRLF, as a well-behaved client sends it.
    Data,
    /// DATA with the file's bytes as they are (bare LF and CR included), dot-stuffed.
    Raw,
    /// BDAT `BODY=BINARYMIME` with the file's bytes as they are, in 64 KiB chunks.
    Bdat,
}

/// Every line end CRLF (bare LF and bare CR alike), ending with one.
pub(super) fn crlf(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 20 + 2);
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b'\r' if data.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 2;
                continue;
            }
            b'\r' | b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// What the daemon receives as the message for each way of sending `data`.
pub(super) fn as_received(data: &[u8], way: Way) -> Vec<u8> {
    match way {
        Way::Data => crlf(data),
        Way::Raw => {
            let mut v = data.to_vec();
            if !v.ends_with(b"\r\n") {
                v.extend_from_slice(b"\r\n");
            }
            v
        }
        Way::Bdat => data.to_vec(),
    }
}

/// A plain SMTP client for raw bytes.
pub(super) struct Smtp {
    pub(super) r: BufReader<TcpStream>,
    pub(super) w: TcpStream,
}

impl Smtp {
    pub(super) fn connect(port: u16) -> std::io::Result<Smtp> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        s.set_write_timeout(Some(Duration::from_secs(60)))?;
        let mut c = Smtp { r: BufReader::new(s.try_clone()?), w: s };
        let (code, text) = c.reply()?;
        if code != 220 {
            return Err(std::io::Error::other(format!("banner {text}")));
        }
        c.cmd("EHLO corpus.test")?;
        Ok(c)
    }

    pub(super) fn reply(&mut self) -> std::io::Result<(u16, String)> {
        let mut text = String::new();
        loop {
            let mut line = Vec::new();
            if self.r.read_until(b'\n', &mut line)? == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("closed after {text:?}")));
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            text.push_str(&line);
            let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok((code, text));
            }
        }
    }

    pub(super) fn cmd(&mut self, line: &str) -> std::io::Result<(u16, String)> {
        self.w.write_all(format!("{line}\r\n").as_bytes())?;
        self.reply()
    }

    /// One transaction; the reply to the message (or to the first refused command).
    pub(super) fn send(&mut self, from: &str, to: &[&str], data: &[u8], way: Way) -> std::io::Result<(u16, String)> {
        let eight_bit = data.iter().any(|b| *b >= 0x80);
        let body = match way {
            Way::Bdat => " BODY=BINARYMIME",
            _ if eight_bit => " BODY=8BITMIME",
            _ => "",
        };
        let (c, t) = self.cmd(&format!("MAIL FROM:<{from}>{body}"))?;
        if c != 250 {
            return Ok((c, t));
        }
        let mut any = false;
        for r in to {
            let (c, _) = self.cmd(&format!("RCPT TO:<{r}>"))?;
            any |= c == 250;
        }
        if !any {
            let (c, t) = self.cmd("RSET")?;
            return Ok((if c == 250 { 554 } else { c }, t));
        }
        match way {
            Way::Bdat => {
                let chunks: Vec<&[u8]> = data.chunks(64 * 1024).collect();
                if chunks.is_empty() {
                    return self.cmd("BDAT 0 LAST");
                }
                for (i, ch) in chunks.iter().enumerate() {
                    let last = i + 1 == chunks.len();
                    self.w.write_all(format!("BDAT {}{}\r\n", ch.len(), if last { " LAST" } else { "" }).as_bytes())?;
                    self.w.write_all(ch)?;
                    let (c, t) = self.reply()?;
                    if last || c != 250 {
                        return Ok((c, t));
                    }
                }
                unreachable!("the last chunk returned")
            }
            Way::Data | Way::Raw => {
                let (c, t) = self.cmd("DATA")?;
                if c != 354 {
                    return Ok((c, t));
                }
                let content = as_received(data, way);
                // Dot-stuffing at the line starts the server recognises (after CRLF).
                let mut out = Vec::with_capacity(content.len() + 64);
                let mut at_start = true;
                let mut prev = 0u8;
                for &b in &content {
                    if at_start && b == b'.' {
                        out.push(b'.');
                    }
                    out.push(b);
                    at_start = prev == b'\r' && b == b'\n';
                    prev = b;
                }
                out.extend_from_slice(b".\r\n");
                self.w.write_all(&out)?;
                self.reply()
            }
        }
    }
}

/// Line ends as Maildir delivery writes them (CRLF to LF).
pub(super) fn to_lf(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i] == b'\r' && data.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(data[i]);
        i += 1;
    }
    out
}

/// The test's own reading of a message: its header fields (each with its continuation
/// lines) and its body (from the empty line on), for any line-ending style.
pub(super) fn split_message(data: &[u8]) -> (Vec<Vec<u8>>, Vec<u8>) {
    let mut fields: Vec<Vec<u8>> = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let end = data[pos..].iter().position(|b| *b == b'\n').map(|i| pos + i + 1).unwrap_or(data.len());
        let line = &data[pos..end];
        let content = line.strip_suffix(b"\n").unwrap_or(line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        if content.is_empty() && line.ends_with(b"\n") {
            return (fields, data[pos..].to_vec());
        }
        match (line.first(), fields.last_mut()) {
            (Some(b' ' | b'\t'), Some(last)) => last.extend_from_slice(line),
            _ => fields.push(line.to_vec()),
        }
        pos = end;
    }
    (fields, Vec::new())
}

pub(super) fn field_is(field: &[u8], name: &str) -> bool {
    let colon = field.iter().position(|b| *b == b':').unwrap_or(0);
    field.get(..colon).is_some_and(|n| n.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
}

/// `delivered` (a Maildir file) is `received` with the fields named in `removed` taken out of
/// its header section, below header fields whose names are all in `added`.
pub(super) fn check_delivered(
    delivered: &[u8],
    received: &[u8],
    added: &[&str],
    removed: &[&str],
) -> Result<(), String> {
    let (fields, body) = split_message(received);
    let mut expected = Vec::new();
    for f in fields.iter().filter(|f| !removed.iter().any(|r| field_is(f, r))) {
        expected.extend_from_slice(f);
    }
    expected.extend_from_slice(&body);
    let mut expected = to_lf(&expected);
    if !expected.ends_with(b"\n") {
        expected.push(b'\n');
    }
    let Some(prefix_len) = delivered.len().checked_sub(expected.len()) else {
        return Err(format!("delivered {} bytes, fewer than the {} expected", delivered.len(), expected.len()));
    };
    if delivered[prefix_len..] != expected[..] {
        let at = delivered[prefix_len..].iter().zip(&expected).position(|(a, b)| a != b).unwrap_or(0);
        return Err(format!(
            "the delivered message differs from what was sent at byte {at} of {}: got {:?}, expected {:?}",
            expected.len(),
            String::from_utf8_lossy(&delivered[prefix_len + at..(prefix_len + at + 80).min(delivered.len())]),
            String::from_utf8_lossy(&expected[at..(at + 80).min(expected.len())]),
        ));
    }
    let (ours, rest) = split_message(&delivered[..prefix_len]);
    if !rest.is_empty() {
        return Err(format!(
            "an empty line in the fields added on top: {:?}",
            String::from_utf8_lossy(&delivered[..prefix_len])
        ));
    }
    for f in &ours {
        if !added.iter().any(|a| field_is(f, a)) {
            return Err(format!("a field nobody added: {:?}", String::from_utf8_lossy(f)));
        }
    }
    for r in removed {
        let (fields, _) = split_message(delivered);
        if let Some(f) = fields.iter().find(|f| field_is(f, r)) {
            return Err(format!("{r} was to be removed: {:?}", String::from_utf8_lossy(f)));
        }
    }
    Ok(())
}

/// The Maildir files of `dir/new`, as bytes.
pub(super) fn maildir_bytes(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(rd) = std::fs::read_dir(dir.join("new")) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()).filter_map(|e| std::fs::read(e.path()).ok()).collect()
}
