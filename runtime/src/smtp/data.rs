//! Message content receivers: the DATA dot-framing decoder and the content
//! checker shared by DATA and BDAT.
//!
//! **Strict line endings.** Only `CR LF . CR LF` ends DATA (the first CR LF
//! may be the one that ended the DATA command). A bare CR or bare LF never
//! counts as a line end for framing, so none of the SMTP smuggling sequences
//! (`LF . LF`, `LF . CR LF`, `CR . CR LF`, `CR LF . LF`, ...) can end the
//! message early. The content checker flags any bare CR or bare LF; the
//! session then rejects the whole message with `550 5.5.2` after the end of
//! data and keeps the session (Postfix `smtpd_forbid_bare_newline = reject`).

/// Outcome flags of a message, evaluated after the end of data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ContentFlags {
    pub too_big: bool,
    pub bare_newline: bool,
    pub long_line: bool,
    pub header_too_big: bool,
}

/// Checks unstuffed content bytes incrementally and stores them (until the
/// size limit is hit; then storage stops and memory is released).
#[derive(Debug)]
pub(crate) struct ContentChecker {
    data: Vec<u8>,
    /// Bytes of the message kept in `data` once the header section is over (0: all);
    /// the rest goes to `spill` for the host to write out (bounded memory per session).
    keep: u64,
    spill: Vec<u8>,
    spilled: u64,
    size: u64,
    max_size: u64,
    max_line: usize,
    max_header: u64,
    line_len: usize,
    prev_cr: bool,
    in_headers: bool,
    /// Current header line: 0 = at line start, 1 = in field name, 2 = past colon / continuation.
    header_line_state: u8,
    header_bytes: u64,
    pub flags: ContentFlags,
}

impl ContentChecker {
    /// `max_size` 0 = unlimited; `max_line` counts CRLF.
    pub fn new(max_size: u64, max_line: usize, max_header: u64) -> Self {
        ContentChecker {
            data: Vec::new(),
            keep: 0,
            spill: Vec::new(),
            spilled: 0,
            size: 0,
            max_size,
            max_line: max_line.saturating_sub(2),
            max_header,
            line_len: 0,
            prev_cr: false,
            in_headers: true,
            header_line_state: 0,
            header_bytes: 0,
            flags: ContentFlags::default(),
        }
    }

    /// Bytes accepted so far (stored or not).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Keep at most `keep` bytes in memory once the header section is over; the rest is
    /// handed out by [`ContentChecker::take_spill`].
    pub fn with_keep(mut self, keep: u64) -> Self {
        self.keep = keep;
        self
    }

    /// Bytes past the in-memory part, in order, since the last call.
    pub fn take_spill(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.spill)
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.size = self.size.saturating_add(bytes.len() as u64);
        if self.max_size > 0 && self.size > self.max_size {
            if !self.flags.too_big {
                self.flags.too_big = true;
                self.data = Vec::new();
                self.spill = Vec::new();
            }
            for &b in bytes {
                self.scan(b);
            }
        } else if self.keep == 0 {
            self.data.extend_from_slice(bytes);
            for &b in bytes {
                self.scan(b);
            }
        } else {
            for &b in bytes {
                let full = self.data.len() as u64
                    >= self.keep.saturating_add(if self.in_headers { self.max_header } else { 0 });
                if full && (self.spilled > 0 || !self.in_headers || self.max_header == 0) {
                    self.spill.push(b);
                    self.spilled += 1;
                } else {
                    self.data.push(b);
                }
                self.scan(b);
            }
        }
    }

    fn line_end(&mut self) {
        if self.in_headers && self.line_len == 0 {
            // empty line: end of the header section
            self.in_headers = false;
        }
        self.line_len = 0;
        self.header_line_state = 0;
    }

    fn scan(&mut self, b: u8) {
        if self.in_headers {
            self.header_bytes += 1;
            if self.max_header > 0 && self.header_bytes > self.max_header {
                self.flags.header_too_big = true;
            }
        }
        if self.prev_cr {
            self.prev_cr = false;
            if b == b'\n' {
                self.line_end();
                return;
            }
            self.flags.bare_newline = true;
            self.count_char(b'\r');
        }
        match b {
            b'\r' => self.prev_cr = true,
            b'\n' => {
                self.flags.bare_newline = true;
                self.line_end();
            }
            _ => self.count_char(b),
        }
    }

    fn count_char(&mut self, b: u8) {
        self.line_len += 1;
        if self.line_len > self.max_line {
            self.flags.long_line = true;
        }
        if self.in_headers {
            self.header_line_state = match (self.header_line_state, b) {
                (0, b' ' | b'\t') => 2,
                (0 | 1, b':') if self.line_len > 1 => 2,
                (0 | 1, 33..=126) => 1,
                (0 | 1, _) => {
                    // not a header field: the body starts here
                    self.in_headers = false;
                    2
                }
                (s, _) => s,
            };
        }
    }

    /// Ends the content; returns the stored bytes and final flags.
    pub fn finish(mut self) -> (Vec<u8>, ContentFlags) {
        if self.prev_cr {
            self.flags.bare_newline = true;
        }
        (self.data, self.flags)
    }

    /// [`ContentChecker::finish`], with the spill not yet taken.
    pub fn finish_spilling(mut self) -> (Vec<u8>, ContentFlags, Vec<u8>, u64) {
        let spill = std::mem::take(&mut self.spill);
        let spilled = self.spilled;
        let (d, f) = self.finish();
        (d, f, spill, spilled)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frame {
    /// At the start of a line (after CR LF).
    LineStart,
    /// Saw `.` at line start.
    Dot,
    /// Saw `.` CR at line start.
    DotCr,
    /// Inside a line.
    Mid,
    /// Saw CR inside a line (or at line start).
    Cr,
}

/// Incremental DATA decoder: dot-unstuffing and end-of-data detection.
#[derive(Debug)]
pub(crate) struct DotReceiver {
    state: Frame,
    pub content: ContentChecker,
}

impl DotReceiver {
    pub fn new(content: ContentChecker) -> Self {
        DotReceiver { state: Frame::LineStart, content }
    }

    /// Feeds `input`. Returns `Some(consumed)` when the end-of-data marker
    /// was found (`consumed` includes it), `None` if all input was consumed
    /// and more is needed.
    pub fn feed(&mut self, input: &[u8]) -> Option<usize> {
        // Content bytes are forwarded in runs to keep the checker fast.
        let mut run_start = 0;
        let mut i = 0;
        let mut out: Vec<u8> = Vec::new();
        while let Some(&b) = input.get(i) {
            match self.state {
                Frame::LineStart => {
                    if b == b'.' {
                        // flush content before the dot; the dot is held back
                        out.extend_from_slice(input.get(run_start..i).unwrap_or(&[]));
                        run_start = i + 1;
                        self.state = Frame::Dot;
                    } else {
                        self.state = Self::after(b);
                    }
                }
                Frame::Dot => {
                    if b == b'\r' {
                        // hold the CR back until we know whether LF follows
                        run_start = i + 1;
                        self.state = Frame::DotCr;
                    } else {
                        // stuffed dot: dropped; b is content
                        self.state = Self::after(b);
                    }
                }
                Frame::DotCr => {
                    if b == b'\n' {
                        self.flush(&mut out);
                        return Some(i + 1);
                    }
                    // ".\r" + not LF: the dot was stuffing, the CR is content (bare)
                    out.push(b'\r');
                    run_start = i;
                    self.state = if b == b'\r' { Frame::Cr } else { Self::after(b) };
                }
                Frame::Mid => self.state = Self::after(b),
                Frame::Cr => {
                    self.state = match b {
                        b'\n' => Frame::LineStart,
                        _ => Self::after(b),
                    }
                }
            }
            i += 1;
        }
        if !matches!(self.state, Frame::DotCr | Frame::Dot) {
            out.extend_from_slice(input.get(run_start..).unwrap_or(&[]));
        }
        self.flush(&mut out);
        None
    }

    fn flush(&mut self, out: &mut Vec<u8>) {
        if !out.is_empty() {
            self.content.push(out);
            out.clear();
        }
    }

    /// State after a content byte inside a line. Bare LF does NOT start a
    /// new line for framing purposes.
    fn after(b: u8) -> Frame {
        if b == b'\r' {
            Frame::Cr
        } else {
            Frame::Mid
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> Option<(Vec<u8>, ContentFlags, Vec<u8>)> {
        let mut r = DotReceiver::new(ContentChecker::new(0, 1000, 0));
        let mut rest = Vec::new();
        let mut done = false;
        for c in chunks {
            if done {
                rest.extend_from_slice(c);
                continue;
            }
            if let Some(n) = r.feed(c) {
                done = true;
                rest.extend_from_slice(&c[n..]);
            }
        }
        if !done {
            return None;
        }
        let (d, f) = r.content.finish();
        Some((d, f, rest))
    }

    #[test]
    fn basic_and_unstuffing() {
        let (d, f, rest) = run(&[b"Subject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n"]).unwrap();
        assert_eq!(d, b"Subject: x\r\n\r\n.dot\r\n");
        assert_eq!(f, ContentFlags::default());
        assert_eq!(rest, b"QUIT\r\n");
        let (d, _, _) = run(&[b".\r\n"]).unwrap();
        assert_eq!(d, b"");
        let (d, f, _) = run(&[b".\r.x\r\n.\r\n"]).unwrap();
        assert_eq!(d, b"\r.x\r\n");
        assert!(f.bare_newline);
    }

    #[test]
    fn split_everywhere() {
        let msg: &[u8] = b"A: b\r\n\r\n..x\r\n.y\r\n\r\n.\r\nNEXT";
        let whole = run(&[msg]).unwrap();
        for i in 0..msg.len() {
            for j in i..msg.len() {
                let parts = [&msg[..i], &msg[i..j], &msg[j..]];
                assert_eq!(run(&parts).unwrap(), whole, "{i} {j}");
            }
        }
    }

    #[test]
    fn smuggling_never_ends_data() {
        for s in [
            &b"a\n.\nMAIL FROM:<x@y>\r\n"[..],
            b"a\n.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r\n.\nMAIL FROM:<x@y>\r\n",
            b"a\r\n\x00.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r\n.\rMAIL FROM:<x@y>\r\n",
            b"a\r.\rMAIL\r\n",
            b"a\n.\rMAIL\r\n",
        ] {
            assert!(run(&[s]).is_none(), "{:?}", String::from_utf8_lossy(s));
            let mut full = s.to_vec();
            full.extend_from_slice(b".\r\n");
            let (d, f, _) = run(&[&full]).unwrap();
            let stuffed = usize::from(s.windows(3).any(|w| w == b"\r\n."));
            assert_eq!(d.len(), s.len() - stuffed, "{s:?}");
            let has_bare = !s.starts_with(b"a\r\n\x00");
            assert_eq!(f.bare_newline, has_bare, "{:?}", String::from_utf8_lossy(s));
        }
    }

    #[test]
    fn limits() {
        let mut c = ContentChecker::new(10, 1000, 0);
        c.push(b"0123456789");
        assert!(!c.flags.too_big);
        c.push(b"x");
        let (d, f) = c.finish();
        assert!(f.too_big);
        assert!(d.is_empty());

        let mut c = ContentChecker::new(0, 1000, 0);
        c.push(&[b'a'; 998]);
        c.push(b"\r\n");
        assert!(!c.flags.long_line);
        c.push(&[b'a'; 999]);
        assert!(c.flags.long_line);

        let mut c = ContentChecker::new(0, 1000, 20);
        c.push(b"Subject: 0123456789\r\n\r\n");
        assert!(c.flags.header_too_big);
        let mut c = ContentChecker::new(0, 1000, 30);
        c.push(b"Subject: 0123456789\r\n\r\nbody body body body body body body\r\n");
        assert!(!c.flags.header_too_big);
        // a line that is not a header field ends the header section
        let mut c = ContentChecker::new(0, 1000, 10);
        c.push(b"no header here at all\r\nmore body\r\n");
        assert!(!c.flags.header_too_big);
    }
}
