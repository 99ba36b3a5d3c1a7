//! Fuzzing entry points shared by the cargo-fuzz targets in `runtime/fuzz`
//! and the deterministic randomized unit tests. Not a stable API.
//!
//! Each function panics only when an engine invariant is broken.

use std::time::Duration;

use super::data::{ContentChecker, DotReceiver};
use super::{AuthOutcome, Config, Decision, Event, PeerInfo, Reply, Session, Time, TlsInfo};

/// Feeds `data` to a DATA receiver in pieces cut at `splits` (taken modulo
/// the length); returns (consumed count, content) when the end marker is found.
pub fn dot_receive(data: &[u8], splits: &[usize]) -> Option<(usize, Vec<u8>)> {
    let mut rx = DotReceiver::new(ContentChecker::new(0, 1000, 0));
    let mut pos = 0;
    let mut cuts: Vec<usize> = splits.iter().map(|s| s % (data.len() + 1)).collect();
    cuts.push(data.len());
    cuts.sort_unstable();
    for cut in cuts {
        if cut < pos {
            continue;
        }
        let piece = data.get(pos..cut)?;
        if let Some(n) = rx.feed(piece) {
            let (content, _) = rx.content.finish();
            return Some((pos + n, content));
        }
        pos = cut;
    }
    None
}

/// Obviously-correct, non-incremental model of DATA framing: the data ends
/// at the first `CRLF.CRLF` (the leading CRLF may be the DATA command's),
/// and a `.` that starts a line (after CRLF) is removed.
pub fn dot_reference(data: &[u8]) -> Option<(usize, Vec<u8>)> {
    let mut framed = b"\r\n".to_vec();
    framed.extend_from_slice(data);
    let at = framed.windows(5).position(|w| w == b"\r\n.\r\n")?;
    // content is data[..at] (the CRLF before the dot belongs to the message)
    let body = data.get(..at)?;
    let mut out = Vec::with_capacity(body.len());
    for (i, &b) in body.iter().enumerate() {
        let line_start = i == 0 || (i >= 2 && body.get(i - 2..i) == Some(b"\r\n"));
        if b == b'.' && line_start {
            continue;
        }
        out.push(b);
    }
    Some((at + 3, out))
}

/// `data_receiver` target: the incremental receiver equals the model for
/// any split of the input.
pub fn data_receiver(input: &[u8]) {
    let (splits, data) = match input {
        [a, b, c, rest @ ..] => (vec![*a as usize, (*b as usize) * 7, (*c as usize) * 31], rest),
        _ => return,
    };
    let got = dot_receive(data, &splits);
    let want = dot_reference(data);
    assert_eq!(got, want, "DATA receiver disagrees with the model");
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// `smtp_commands` target: arbitrary bytes through a session whose host
/// accepts (or, by the first byte's flags, rejects) everything. Checks that
/// the engine never panics, never loops, and only writes well-formed
/// reply lines.
pub fn smtp_commands(input: &[u8]) {
    let (flags, seed, data) = match input {
        [f, s, rest @ ..] => (*f, *s, rest),
        _ => return,
    };
    let mut config = Config { hostname: "mx.example".into(), tls_available: flags & 1 != 0, ..Config::default() };
    if flags & 2 != 0 {
        config.auth_mechanisms = vec!["PLAIN".into(), "LOGIN".into()];
        config.auth_requires_tls = flags & 64 == 0;
    }
    if flags & 4 != 0 {
        config.greet_pause = Duration::from_millis(100);
    }
    if flags & 8 != 0 {
        config.max_message_size = 200;
        config.max_recipients = 3;
        config.max_header_size = 100;
        config.max_input_buffer = 2048;
        config.max_text_line = 80;
        config.soft_error_limit = 3;
        config.hard_error_limit = 6;
    }
    if flags & 16 != 0 {
        config.extensions.enhanced_status_codes = false;
    }
    if flags & 32 != 0 {
        config.extensions.chunking = false;
    }
    if flags & 128 != 0 {
        config.vrfy_enabled = true;
        config.expn_enabled = true;
    }
    let reject_some = flags & 64 != 0;
    let mut now = Time(1_000);
    let mut s = Session::new(config, PeerInfo::default(), now);
    let mut rng = Rng(u64::from(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut out = Vec::new();
    let mut counter = 0u32;
    let mut pos = 0usize;
    let mut closed_seen = false;
    loop {
        // host loop: answer events, fire timers, flush output
        let mut guard = 0;
        loop {
            guard += 1;
            assert!(guard < 100_000, "engine does not settle");
            let mut progressed = false;
            while let Some(b) = s.poll_transmit() {
                assert!(!closed_seen || b.is_empty(), "output after Closed was reported and flushed");
                out.extend_from_slice(&b);
                progressed = true;
            }
            while let Some(ev) = s.poll_event() {
                progressed = true;
                counter += 1;
                answer(&mut s, &ev, now, reject_some && counter.rem_euclid(3) == 0);
                if ev == Event::Closed {
                    assert!(s.is_closed());
                }
            }
            if !progressed {
                match s.poll_timeout() {
                    Some(t) => {
                        assert!(t >= now, "timer in the past");
                        now = t;
                        s.handle_timeout(now);
                    }
                    None => break,
                }
            }
        }
        if s.is_closed() {
            closed_seen = true;
        }
        if pos >= data.len() {
            break;
        }
        let n = 1 + (rng.next() % 64) as usize;
        let end = (pos + n).min(data.len());
        let chunk = data.get(pos..end).unwrap_or(&[]);
        s.handle_input(chunk, now);
        pos = end;
        now += Duration::from_millis(rng.next() % 50);
    }
    check_wire(&out);
}

fn answer(s: &mut Session, ev: &Event, now: Time, reject: bool) {
    let _ = match ev {
        Event::AuthStep { data: None, .. } => s.auth_continue(b"challenge", now),
        Event::AuthStep { data: Some(d), .. } => {
            if d.len() % 2 == 0 {
                s.auth_done(AuthOutcome::Success { user: "u\r\nser".into() }, now)
            } else {
                s.auth_done(AuthOutcome::Failure { reply: None }, now)
            }
        }
        Event::StartTls => s.tls_established(TlsInfo::default(), now),
        e if e.needs_answer() => {
            let d = if reject {
                Decision::reject(Reply::new(550, (5, 7, 1), "no\r\n250 injected\r\x00"))
                    .with_delay(Duration::from_millis(30))
            } else {
                Decision::queued("Q\r\n1")
            };
            s.decide(d, now)
        }
        _ => Ok(()),
    };
}

/// Every line the engine writes is `NNN[ -]text` + CRLF, at most 512
/// octets (SASL `334` lines aside), with no CR or LF inside.
pub fn check_wire(out: &[u8]) {
    let mut rest = out;
    while !rest.is_empty() {
        let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
            panic!("unterminated reply line");
        };
        let (line, tail) = rest.split_at(lf + 1);
        rest = tail;
        assert!(line.len() >= 5 && line.ends_with(b"\r\n"), "bad line ending");
        let body = line.get(..line.len() - 2).unwrap_or(&[]);
        assert!(!body.contains(&b'\r'), "CR inside a reply line");
        assert!(body.get(..3).is_some_and(|c| c.iter().all(u8::is_ascii_digit)), "no reply code");
        assert!(matches!(body.get(3), None | Some(b' ' | b'-')), "bad separator");
        if !body.starts_with(b"334") {
            assert!(line.len() <= 512, "reply line too long");
        }
    }
}
