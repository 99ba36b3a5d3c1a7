//! Compiled file tables: a `list`, `map` or `access` table as a cdb file ("constant
//! database", D. J. Bernstein's format, the one `postmap` users know as `cdb:`), built by
//! `mailc table compile` next to its source (`users` -> `users.cdb`).
//!
//! The file is a standard cdb: the table's keys (lower-cased, the first entry of a key
//! wins, as the text format says) map to their values, so `cdbget` reads it too. One more
//! record, under the empty key (which no table line can have), describes it:
//! `mailpolicy-table 1 KIND ENTRIES SIZE MTIME_NS`, with the kind, the number of entries and
//! the size and modification time of the source it was compiled from. The host compares
//! those with the source file and uses the compiled table only when they match, so what
//! it answers is what the source says (and what the open-relay proof read).
//!
//! This module reads a cdb held in memory, with every offset checked: a damaged or hostile
//! file is an error or a miss, never a panic. (The file is read, not mapped: a mapped file
//! truncated under the daemon would kill it with SIGBUS.)

/// What a compiled table says about itself (its record under the empty key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub kind: String,
    pub entries: u64,
    /// Size of the source file it was compiled from, in bytes.
    pub source_size: u64,
    /// Modification time of that source, in nanoseconds since the epoch.
    pub source_mtime_ns: u128,
}

impl Meta {
    /// The value stored under the empty key.
    pub fn encode(&self) -> String {
        format!("mailpolicy-table 1 {} {} {} {}", self.kind, self.entries, self.source_size, self.source_mtime_ns)
    }

    pub fn decode(v: &[u8]) -> Option<Meta> {
        let s = std::str::from_utf8(v).ok()?;
        let mut w = s.split(' ');
        if w.next()? != "mailpolicy-table" || w.next()? != "1" {
            return None;
        }
        let kind = w.next()?.to_string();
        let entries = w.next()?.parse().ok()?;
        let source_size = w.next()?.parse().ok()?;
        let source_mtime_ns = w.next()?.parse().ok()?;
        if w.next().is_some() || !matches!(kind.as_str(), "list" | "map" | "access") {
            return None;
        }
        Some(Meta { kind, entries, source_size, source_mtime_ns })
    }
}

/// The kinds of table that compile (exact keys; `cidr`, `regexp` and `pcre` are ordered
/// lists of patterns, searched in order).
pub fn compiles(kind: &str) -> bool {
    matches!(kind, "list" | "map" | "access")
}

/// The cdb hash (djb's: h = 5381; h = (h * 33) ^ c).
pub fn hash(key: &[u8]) -> u32 {
    key.iter().fold(5381u32, |h, &c| (h << 5).wrapping_add(h) ^ u32::from(c))
}

/// A compiled table in memory.
#[derive(Clone)]
pub struct Cdb {
    bytes: Vec<u8>,
    meta: Meta,
}

impl std::fmt::Debug for Cdb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cdb").field("meta", &self.meta).field("bytes", &self.bytes.len()).finish()
    }
}

fn u32_at(b: &[u8], pos: usize) -> Option<u32> {
    let s = b.get(pos..pos.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

impl Cdb {
    /// A compiled table from the bytes of its file: a cdb with the description record.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Cdb, String> {
        if bytes.len() < 2048 || u32::try_from(bytes.len()).is_err() {
            return Err("not a cdb file (wrong size)".into());
        }
        let meta = find(&bytes, b"")
            .ok_or_else(|| "not a compiled table (a cdb without its mailpolicy-table record)".to_string())?;
        let meta = Meta::decode(meta).ok_or("not a compiled table of this version (its description is unknown)")?;
        Ok(Cdb { bytes, meta })
    }

    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// The value of `key` (already lower-cased), or None. The empty key is never a table key.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        if key.is_empty() {
            return None;
        }
        find(&self.bytes, key)
    }
}

/// The first record of `key` in a cdb, every offset checked.
fn find<'a>(b: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let h = hash(key);
    let slot = ((h & 0xff) as usize) << 3;
    let hpos = u32_at(b, slot)? as usize;
    let hslots = u32_at(b, slot + 4)? as usize;
    if hslots == 0 {
        return None;
    }
    let end = hpos.checked_add(hslots.checked_mul(8)?)?;
    let mut kpos = hpos.checked_add((((h >> 8) as usize) % hslots) * 8)?;
    for _ in 0..hslots {
        let sh = u32_at(b, kpos)?;
        let rpos = u32_at(b, kpos + 4)? as usize;
        if rpos == 0 {
            return None;
        }
        if sh == h {
            let klen = u32_at(b, rpos)? as usize;
            let dlen = u32_at(b, rpos + 4)? as usize;
            let kstart = rpos + 8;
            let dstart = kstart.checked_add(klen)?;
            if klen == key.len() && b.get(kstart..dstart)? == key {
                return b.get(dstart..dstart.checked_add(dlen)?);
            }
        }
        kpos += 8;
        if kpos >= end {
            kpos = hpos;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cdb written by the cdb2 crate (the writer `mailc table compile` uses).
    fn write(records: &[(&[u8], &[u8])]) -> Vec<u8> {
        let dir = std::env::temp_dir().join(format!("mailpolicy-cdb-{}-{}", std::process::id(), records.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.cdb");
        let mut w = cdb2::CDBWriter::create(&path).unwrap();
        for (k, v) in records {
            w.add(k, v).unwrap();
        }
        w.finish().unwrap();
        let b = std::fs::read(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        b
    }

    fn meta(n: u64) -> String {
        Meta { kind: "map".into(), entries: n, source_size: 10, source_mtime_ns: 1234 }.encode()
    }

    #[test]
    fn answers_like_the_reference_reader() {
        let keys: Vec<String> = (0..5000).map(|i| format!("user{i}@example.com")).collect();
        let vals: Vec<String> = (0..5000).map(|i| format!("value {i}")).collect();
        let m = meta(5000);
        let mut recs: Vec<(&[u8], &[u8])> = vec![(b"", m.as_bytes())];
        recs.extend(keys.iter().zip(&vals).map(|(k, v)| (k.as_bytes(), v.as_bytes())));
        let bytes = write(&recs);
        let c = Cdb::from_bytes(bytes).unwrap();
        assert_eq!(c.meta().entries, 5000);
        for (k, v) in keys.iter().zip(&vals) {
            assert_eq!(c.get(k.as_bytes()), Some(v.as_bytes()), "{k}");
        }
        for k in ["user5000@example.com", "nobody", "USER1@EXAMPLE.COM", "user1@example.co"] {
            assert_eq!(c.get(k.as_bytes()), None, "{k}");
        }
        // The description is not a key.
        assert_eq!(c.get(b""), None);
    }

    #[test]
    fn a_plain_cdb_or_a_damaged_file_is_an_error_or_a_miss_never_a_panic() {
        assert!(Cdb::from_bytes(Vec::new()).is_err());
        assert!(Cdb::from_bytes(vec![0; 100]).is_err());
        let plain = write(&[(b"a", b"b")]);
        assert!(Cdb::from_bytes(plain).unwrap_err().contains("mailpolicy-table"));
        let m = meta(2);
        let good = write(&[(b"", m.as_bytes()), (b"one", b"1"), (b"two", b"2")]);
        // Every truncation and a byte flipped at every position: no panic.
        for n in 0..good.len() {
            let _ = Cdb::from_bytes(good[..n].to_vec()).map(|c| c.get(b"one").map(<[u8]>::to_vec));
        }
        for i in 0..good.len() {
            for x in [0x01u8, 0x80, 0xff] {
                let mut b = good.clone();
                b[i] ^= x;
                if let Ok(c) = Cdb::from_bytes(b) {
                    let _ = (c.get(b"one"), c.get(b"two"), c.get(b"three"));
                }
            }
        }
        // Hash slots pointing past the end.
        let mut b = good.clone();
        for i in 0..256 {
            b[i * 8..i * 8 + 4].copy_from_slice(&u32::MAX.to_le_bytes());
            b[i * 8 + 4..i * 8 + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        }
        assert!(Cdb::from_bytes(b).is_err());
    }

    #[test]
    fn meta_round_trips_and_rejects_what_it_does_not_know() {
        let m = Meta { kind: "access".into(), entries: 3, source_size: 99, source_mtime_ns: 1_700_000_000_123_456_789 };
        assert_eq!(Meta::decode(m.encode().as_bytes()), Some(m));
        assert_eq!(Meta::decode(b"mailpolicy-table 2 map 1 1 1"), None);
        assert_eq!(Meta::decode(b"mailpolicy-table 1 regexp 1 1 1"), None);
        assert_eq!(Meta::decode(b"mailpolicy-table 1 map 1 1 1 extra"), None);
        assert_eq!(Meta::decode(b"\xff"), None);
    }
}
