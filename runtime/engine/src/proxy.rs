//! The PROXY protocol, versions 1 and 2 (HAProxy's `proxy-protocol.txt`), as a load
//! balancer sends it before the first SMTP byte: who the client really is. Sans-IO: bytes
//! in, a verdict out; the daemon reads the socket and decides whom to believe (the
//! listener's `proxy_protocol` networks).
//!
//! [`parse`] looks at the bytes received so far: it asks for more while they can still
//! become a header, and refuses as soon as they cannot. Nothing here panics on any input
//! (fuzzed: `runtime/fuzz` target `proxy_header`, and `fuzz` over generated inputs in the
//! tests); a header is at most [`V1_MAX`] bytes (v1) or 16 + 65,535 (v2).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The longest v1 line, CRLF included (the specification's 107).
pub const V1_MAX: usize = 107;
/// The v2 signature.
pub const V2_SIGNATURE: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// What the header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: Version,
    /// The client and the address it connected to, or None when the header says the
    /// connection is the proxy's own (v1 `UNKNOWN`, v2 `LOCAL`, or an address family other
    /// than TCP over IPv4/IPv6): then the socket's own addresses stand.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parse {
    /// These bytes may still become a header: read more.
    Incomplete,
    /// A header of `len` bytes; what follows it is the client's.
    Done { header: Header, len: usize },
    /// Not a PROXY header, or a malformed one.
    Invalid(&'static str),
}

/// Parse the start of a connection's bytes.
pub fn parse(buf: &[u8]) -> Parse {
    let Some(first) = buf.first() else { return Parse::Incomplete };
    if *first == b'P' {
        return v1(buf);
    }
    if *first == V2_SIGNATURE[0] {
        return v2(buf);
    }
    Parse::Invalid("not a PROXY protocol header")
}

fn v1(buf: &[u8]) -> Parse {
    const PREFIX: &[u8] = b"PROXY ";
    let n = buf.len().min(PREFIX.len());
    if buf.get(..n) != PREFIX.get(..n) {
        return Parse::Invalid("not a PROXY protocol header");
    }
    let window = buf.get(..buf.len().min(V1_MAX)).unwrap_or(buf);
    let Some(cr) = window.iter().position(|b| *b == b'\r') else {
        if buf.len() >= V1_MAX {
            return Parse::Invalid("PROXY v1 line longer than 107 bytes");
        }
        if window.contains(&b'\n') {
            return Parse::Invalid("PROXY v1 line ends without CRLF");
        }
        return Parse::Incomplete;
    };
    if cr + 2 > V1_MAX {
        return Parse::Invalid("PROXY v1 line longer than 107 bytes");
    }
    if window.get(..cr).is_some_and(|l| l.contains(&b'\n')) {
        return Parse::Invalid("PROXY v1 line ends without CRLF");
    }
    match buf.get(cr + 1) {
        None => return Parse::Incomplete,
        Some(b'\n') => {}
        _ => return Parse::Invalid("PROXY v1 line ends without CRLF"),
    }
    let Some(line) = buf.get(PREFIX.len()..cr) else { return Parse::Invalid("PROXY v1 line too short") };
    let Ok(line) = std::str::from_utf8(line) else { return Parse::Invalid("PROXY v1 line is not ASCII") };
    let len = cr + 2;
    let fields: Vec<&str> = line.split(' ').collect();
    let header = |addresses| Parse::Done { header: Header { version: Version::V1, addresses }, len };
    match fields.as_slice() {
        // "UNKNOWN" may be followed by anything, which is ignored.
        ["UNKNOWN", ..] => header(None),
        [proto @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let (Some(src), Some(dst)) = (v1_ip(src, *proto == "TCP4"), v1_ip(dst, *proto == "TCP4")) else {
                return Parse::Invalid("PROXY v1 address does not match its protocol");
            };
            let (Some(sport), Some(dport)) = (v1_port(sport), v1_port(dport)) else {
                return Parse::Invalid("PROXY v1 port is not a number from 0 to 65535");
            };
            header(Some((SocketAddr::new(src, sport), SocketAddr::new(dst, dport))))
        }
        ["TCP4" | "TCP6", ..] => Parse::Invalid("PROXY v1 line needs four addresses and ports"),
        _ => Parse::Invalid("PROXY v1 protocol is not TCP4, TCP6 or UNKNOWN"),
    }
}

fn v1_ip(s: &str, v4: bool) -> Option<IpAddr> {
    if v4 {
        s.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
    } else {
        s.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
    }
}

fn v1_port(s: &str) -> Option<u16> {
    // Digits only (no sign, no space), no leading zero but for "0" itself.
    let ok =
        !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if ok {
        s.parse().ok()
    } else {
        None
    }
}

fn v2(buf: &[u8]) -> Parse {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf.get(..n) != V2_SIGNATURE.get(..n) {
        return Parse::Invalid("not a PROXY protocol header");
    }
    let Some(fixed) = buf.get(..16) else { return Parse::Incomplete };
    let (ver_cmd, fam) = (fixed[12], fixed[13]);
    let body = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
    if ver_cmd >> 4 != 2 {
        return Parse::Invalid("PROXY v2 version is not 2");
    }
    let local = match ver_cmd & 0x0F {
        0 => true,
        1 => false,
        _ => return Parse::Invalid("PROXY v2 command is neither LOCAL nor PROXY"),
    };
    let need = match fam {
        0x11 => 12,
        0x21 => 36,
        _ => 0,
    };
    if body < need {
        return Parse::Invalid("PROXY v2 addresses are longer than the header");
    }
    let Some(addr) = buf.get(16..16 + body) else { return Parse::Incomplete };
    let len = 16 + body;
    let port = |i: usize| addr.get(i..i + 2).map(|p| u16::from_be_bytes([p[0], p[1]])).unwrap_or(0);
    let addresses = match fam {
        _ if local => None,
        0x11 => {
            let ip = |i: usize| -> IpAddr {
                let mut o = [0u8; 4];
                o.copy_from_slice(addr.get(i..i + 4).unwrap_or(&[0; 4]));
                IpAddr::V4(Ipv4Addr::from(o))
            };
            Some((SocketAddr::new(ip(0), port(8)), SocketAddr::new(ip(4), port(10))))
        }
        0x21 => {
            let ip = |i: usize| -> IpAddr {
                let mut o = [0u8; 16];
                o.copy_from_slice(addr.get(i..i + 16).unwrap_or(&[0; 16]));
                IpAddr::V6(Ipv6Addr::from(o))
            };
            Some((SocketAddr::new(ip(0), port(32)), SocketAddr::new(ip(16), port(34))))
        }
        // UNSPEC, UDP and UNIX sockets: the proxy's own addresses stand.
        _ => None,
    };
    Parse::Done { header: Header { version: Version::V2, addresses }, len }
}

/// The header a proxy would send, for tests and the fuzzer's round trips.
pub fn encode(version: Version, addresses: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    match version {
        Version::V1 => match addresses {
            None => b"PROXY UNKNOWN\r\n".to_vec(),
            Some((s, d)) => {
                let proto = if s.is_ipv4() { "TCP4" } else { "TCP6" };
                format!("PROXY {proto} {} {} {} {}\r\n", s.ip(), d.ip(), s.port(), d.port()).into_bytes()
            }
        },
        Version::V2 => {
            let mut out = V2_SIGNATURE.to_vec();
            match addresses {
                None => out.extend_from_slice(&[0x20, 0x00, 0, 0]),
                Some((s, d)) => {
                    let mut body = Vec::new();
                    let fam = match (s.ip(), d.ip()) {
                        (IpAddr::V4(a), IpAddr::V4(b)) => {
                            body.extend_from_slice(&a.octets());
                            body.extend_from_slice(&b.octets());
                            0x11
                        }
                        (a, b) => {
                            let v6 = |ip: IpAddr| match ip {
                                IpAddr::V4(x) => x.to_ipv6_mapped(),
                                IpAddr::V6(x) => x,
                            };
                            body.extend_from_slice(&v6(a).octets());
                            body.extend_from_slice(&v6(b).octets());
                            0x21
                        }
                    };
                    body.extend_from_slice(&s.port().to_be_bytes());
                    body.extend_from_slice(&d.port().to_be_bytes());
                    out.extend_from_slice(&[0x21, fam]);
                    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
                    out.extend_from_slice(&body);
                }
            }
            out
        }
    }
}

/// The fuzz target's body (`runtime/fuzz` target `proxy_header`): no panic on any input;
/// the verdict on every prefix agrees with the verdict on the whole (more bytes never
/// turn a refusal into a header, nor change a header once it is complete); a header's
/// length is within the input and the version's bound.
pub fn fuzz(data: &[u8]) {
    let whole = parse(data);
    match &whole {
        Parse::Done { header, len } => {
            assert!(*len <= data.len());
            match header.version {
                Version::V1 => assert!(*len <= V1_MAX),
                Version::V2 => assert!(*len <= 16 + 65_535),
            }
            for cut in 0..=data.len() {
                let p = parse(data.get(..cut).unwrap_or(data));
                if cut < *len {
                    assert_eq!(p, Parse::Incomplete, "prefix {cut} of a {len}-byte header");
                } else {
                    assert_eq!(&p, &whole, "prefix {cut} of a {len}-byte header");
                }
            }
            // What it says, said again, reads the same.
            let again = encode(header.version, header.addresses);
            if let Parse::Done { header: h, .. } = parse(&again) {
                assert_eq!(h.addresses, header.addresses);
            } else {
                panic!("re-encoded header does not parse");
            }
        }
        Parse::Invalid(_) => {
            // Refused at some prefix already, and refused at every longer one.
            let first = (0..=data.len()).find(|c| matches!(parse(data.get(..*c).unwrap_or(data)), Parse::Invalid(_)));
            if let Some(first) = first {
                for cut in first..=data.len() {
                    assert!(matches!(parse(data.get(..cut).unwrap_or(data)), Parse::Invalid(_)), "cut {cut}");
                }
            }
        }
        Parse::Incomplete => {
            for cut in 0..=data.len() {
                assert_eq!(parse(data.get(..cut).unwrap_or(data)), Parse::Incomplete);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[test]
    fn v1_tcp4_tcp6_unknown() {
        let h = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\nEHLO x\r\n";
        assert_eq!(
            parse(h),
            Parse::Done {
                header: Header {
                    version: Version::V1,
                    addresses: Some((sa("192.0.2.7:56324"), sa("198.51.100.1:25")))
                },
                len: 44
            }
        );
        let h = b"PROXY TCP6 2001:db8::7 2001:db8::1 1000 25\r\n";
        assert!(
            matches!(parse(h), Parse::Done { header: Header { addresses: Some((s, _)), .. }, .. } if s == sa("[2001:db8::7]:1000"))
        );
        assert!(matches!(parse(b"PROXY UNKNOWN\r\n"), Parse::Done { header: Header { addresses: None, .. }, len: 15 }));
        assert!(matches!(
            parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"),
            Parse::Done { header: Header { addresses: None, .. }, .. }
        ));
    }

    #[test]
    fn v1_refusals() {
        for bad in [
            &b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n"[..],
            b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n",
            b"PROXY TCP6 192.0.2.1 198.51.100.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 25\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 025 25\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 +25 25\r\n",
            b"PROXY TCP4  192.0.2.7 198.51.100.1 25 25\r\n",
            b"PROXY UDP4 192.0.2.7 198.51.100.1 25 25\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 25 25\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 25 25\rX",
            b"PROXY\r\n",
            b"EHLO client.example\r\n",
            b"proxy TCP4 1.2.3.4 1.2.3.4 1 1\r\n",
        ] {
            assert!(matches!(parse(bad), Parse::Invalid(_)), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = [b"PROXY UNKNOWN ".to_vec(), vec![b'x'; 200]].concat();
        assert!(matches!(parse(&long), Parse::Invalid(_)));
        assert_eq!(parse(b"PROXY TCP4 192.0.2.7"), Parse::Incomplete);
        assert_eq!(parse(b"PRO"), Parse::Incomplete);
        assert_eq!(parse(b""), Parse::Incomplete);
    }

    #[test]
    fn v2_round_trips_and_refusals() {
        for addrs in [
            Some((sa("192.0.2.7:56324"), sa("198.51.100.1:25"))),
            Some((sa("[2001:db8::7]:1"), sa("[2001:db8::1]:25"))),
            None,
        ] {
            let mut h = encode(Version::V2, addrs);
            let len = h.len();
            h.extend_from_slice(b"EHLO x\r\n");
            assert_eq!(parse(&h), Parse::Done { header: Header { version: Version::V2, addresses: addrs }, len });
            fuzz(&h);
        }
        // TLVs after the addresses are skipped.
        let mut h = encode(Version::V2, Some((sa("192.0.2.7:1"), sa("192.0.2.8:25"))));
        h[15] += 7;
        h.extend_from_slice(&[0x04, 0x00, 0x04, 1, 2, 3, 4]);
        assert!(matches!(parse(&h), Parse::Done { len: 35, .. }));
        let good = encode(Version::V2, Some((sa("192.0.2.7:1"), sa("192.0.2.8:25"))));
        let mut bad = good.clone();
        bad[12] = 0x11; // version 1 in a v2 header
        assert!(matches!(parse(&bad), Parse::Invalid(_)));
        let mut bad = good.clone();
        bad[12] = 0x22; // command 2
        assert!(matches!(parse(&bad), Parse::Invalid(_)));
        let mut bad = good.clone();
        bad[15] = 4; // shorter than its addresses
        assert!(matches!(parse(&bad), Parse::Invalid(_)));
        let mut bad = good.clone();
        bad[5] = 0; // signature
        assert!(matches!(parse(&bad), Parse::Invalid(_)));
        assert_eq!(parse(&good[..20]), Parse::Incomplete);
        // UNIX sockets and UNSPEC: the proxy's own addresses stand.
        let mut unix = V2_SIGNATURE.to_vec();
        unix.extend_from_slice(&[0x21, 0x31, 0, 216]);
        unix.extend_from_slice(&[0u8; 216]);
        assert!(matches!(parse(&unix), Parse::Done { header: Header { addresses: None, .. }, len: 232 }));
    }

    /// The fuzz target over generated inputs on stable: random bytes, and valid headers of
    /// both versions with a byte changed, cut, or with bytes added.
    #[test]
    fn fuzz_100k() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..100_000u32 {
            let r = next();
            let mut input = match i % 4 {
                0 => (0..(r % 64) as usize).map(|_| next() as u8).collect::<Vec<u8>>(),
                1 => {
                    let v4 = r & 1 == 0;
                    let ip = |n: u64| -> IpAddr {
                        if v4 {
                            IpAddr::V4(Ipv4Addr::from(n as u32))
                        } else {
                            IpAddr::V6(Ipv6Addr::from((n as u128) << 64 | n as u128))
                        }
                    };
                    let a = (SocketAddr::new(ip(next()), next() as u16), SocketAddr::new(ip(next()), next() as u16));
                    encode(if r & 2 == 0 { Version::V1 } else { Version::V2 }, Some(a))
                }
                2 => encode(Version::V1, Some((sa("192.0.2.7:56324"), sa("198.51.100.1:25")))),
                _ => encode(Version::V2, Some((sa("[2001:db8::7]:1"), sa("[2001:db8::1]:25")))),
            };
            if i % 4 != 0 && !input.is_empty() {
                let at = (next() as usize) % input.len();
                match next() % 4 {
                    0 => input[at] = next() as u8,
                    1 => input.truncate(at),
                    2 => input.insert(at, next() as u8),
                    _ => input.extend((0..(next() % 8)).map(|_| next() as u8)),
                }
            }
            fuzz(&input);
        }
    }
}
