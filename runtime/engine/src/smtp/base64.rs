//! Strict standard base64 (RFC 4648, with padding) for SASL exchanges.

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub(crate) fn encode(input: &[u8]) -> String {
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b0 = chunk.first().copied().unwrap_or(0) as u32;
        let b1 = chunk.get(1).copied().unwrap_or(0) as u32;
        let b2 = chunk.get(2).copied().unwrap_or(0) as u32;
        let n = (b0 << 16) | (b1 << 8) | b2;
        let idx = |shift: u32| ALPHABET[((n >> shift) & 63) as usize] as char;
        out.push(idx(18));
        out.push(idx(12));
        out.push(if chunk.len() > 1 { idx(6) } else { '=' });
        out.push(if chunk.len() > 2 { idx(0) } else { '=' });
    }
    out
}

fn value(c: u8) -> Option<u32> {
    Some(match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    } as u32)
}

/// Decodes canonical padded base64; `None` on any deviation.
pub(crate) fn decode(input: &[u8]) -> Option<Vec<u8>> {
    if input.len() & 3 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(input.len() / 4 * 3);
    let n_chunks = input.len() / 4;
    for (i, chunk) in input.chunks(4).enumerate() {
        let last = i + 1 == n_chunks;
        let (c0, c1, c2, c3) = match chunk {
            [a, b, c, d] => (*a, *b, *c, *d),
            _ => return None,
        };
        let v0 = value(c0)?;
        let v1 = value(c1)?;
        match (c2, c3) {
            (b'=', b'=') if last => {
                if v1 & 0x0f != 0 {
                    return None;
                }
                out.push(((v0 << 2) | (v1 >> 4)) as u8);
            }
            (_, b'=') if last && c2 != b'=' => {
                let v2 = value(c2)?;
                if v2 & 0x03 != 0 {
                    return None;
                }
                let n = (v0 << 18) | (v1 << 12) | (v2 << 6);
                out.push((n >> 16) as u8);
                out.push((n >> 8) as u8);
            }
            _ => {
                let n = (v0 << 18) | (v1 << 12) | (value(c2)? << 6) | value(c3)?;
                out.push((n >> 16) as u8);
                out.push((n >> 8) as u8);
                out.push(n as u8);
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        for s in ["", "f", "fo", "foo", "foob", "fooba", "foobar", "\0user\0pass"] {
            let e = encode(s.as_bytes());
            assert_eq!(decode(e.as_bytes()).unwrap(), s.as_bytes(), "{e}");
        }
        assert_eq!(encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(encode(b"fo"), "Zm8=");
    }

    #[test]
    fn rejects_bad() {
        for s in ["Zm9", "Zm9v=", "Zm==Zm9v", "Zm8", "Z===", "Zm9!", "Zm9=", "Zh=="] {
            assert!(decode(s.as_bytes()).is_none(), "{s}");
        }
    }
}
