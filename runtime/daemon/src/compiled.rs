//! Compiled file tables (`mailc table compile`, [`mailpolicy_stdlib::cdb`]): the daemon
//! uses `FILE.cdb` instead of parsing `FILE` when the compiled table describes the source
//! as it is now (same kind, size and modification time), so a 1,000,000-entry table loads
//! in the time it takes to read one file, with no parsing and no hash map to build.
//!
//! A compiled table that does not match its source (the source was edited and not
//! compiled again), or that is damaged, is not used: the daemon says so once and parses the
//! source, as Postfix warns about a `.db` older than its source. A compiled table with no
//! source beside it is used only if the open-relay proof did not read that table (the host
//! checks that: [`super::lookup`]).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use mailpolicy_stdlib::cdb::{self, Cdb, Meta};
use mailpolicy_stdlib::tables::FileTable;

/// The compiled table of a source file: `users` -> `users.cdb`.
pub fn path_of(source: &Path) -> PathBuf {
    let mut p = source.as_os_str().to_os_string();
    p.push(".cdb");
    PathBuf::from(p)
}

/// What a table's freshness is judged by: the modification times of the source and of its
/// compiled table (either may be absent).
pub type Stamp = (Option<SystemTime>, Option<SystemTime>);

pub fn stamp(source: &Path) -> Stamp {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (m(source), m(&path_of(source)))
}

/// The description a compiled table of `source` must carry to stand for it.
pub fn describe(kind: &str, source: &Path, entries: u64) -> std::io::Result<Meta> {
    let m = std::fs::metadata(source)?;
    let mtime = m.modified()?.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    Ok(Meta { kind: kind.to_string(), entries, source_size: m.len(), source_mtime_ns: mtime })
}

/// What to do with a table's compiled form.
pub enum Compiled {
    /// There is none (or the kind does not compile): parse the source.
    Absent,
    /// It matches the source (or there is no source): use it.
    Use(FileTable),
    /// It exists and cannot stand for the source: parse the source; the reason is for the log.
    Stale(String),
    /// It exists and there is no source beside it.
    Alone(FileTable),
}

/// Read the compiled table of `source`, if any, and judge it against the source.
pub fn load(kind: &str, source: &Path) -> Compiled {
    if !cdb::compiles(kind) {
        return Compiled::Absent;
    }
    let cpath = path_of(source);
    let bytes = match std::fs::read(&cpath) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Compiled::Absent,
        Err(e) => return Compiled::Stale(format!("{}: {e}", cpath.display())),
    };
    let c = match Cdb::from_bytes(bytes) {
        Ok(c) => c,
        Err(e) => return Compiled::Stale(format!("{}: {e}", cpath.display())),
    };
    if c.meta().kind != kind {
        return Compiled::Stale(format!(
            "{} was compiled as a {} table, the policy says {kind}",
            cpath.display(),
            c.meta().kind
        ));
    }
    match describe(kind, source, c.meta().entries) {
        Ok(now) if now == *c.meta() => Compiled::Use(FileTable::Compiled(c)),
        Ok(_) => Compiled::Stale(format!(
            "{} is older than {} (run `mailc table compile --kind {kind} {}`)",
            cpath.display(),
            source.display(),
            source.display()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Compiled::Alone(FileTable::Compiled(c)),
        Err(e) => Compiled::Stale(format!("{}: {e}", source.display())),
    }
}

/// `mailc table compile`: write the compiled table of `source` (a `list`, `map` or
/// `access` table) beside it, atomically (a temporary file renamed over `FILE.cdb`, so a
/// daemon never reads half a table). Returns the number of entries. A source that does not
/// parse is an error with its line, and nothing is written.
pub fn compile(kind: &str, source: &Path) -> Result<u64, String> {
    if !cdb::compiles(kind) {
        return Err(format!(
            "{kind} tables do not compile (only list, map and access tables do: the others are patterns tried in order)"
        ));
    }
    let before = describe(kind, source, 0).map_err(|e| format!("{}: {e}", source.display()))?;
    let text = std::fs::read_to_string(source).map_err(|e| format!("{}: {e}", source.display()))?;
    let rows = match mailpolicy_lang::tables::parse_rows(kind, &text) {
        Ok(mailpolicy_lang::tables::Rows::Keys(rows)) => rows,
        Ok(_) => return Err(format!("{kind} tables do not compile")),
        Err(e) => return Err(format!("{}: {e}", source.display())),
    };
    let entries = rows.len() as u64;
    // The description is of the source as it was read; one changed meanwhile is refused.
    let meta = Meta { entries, ..before.clone() };
    let after = describe(kind, source, 0).map_err(|e| format!("{}: {e}", source.display()))?;
    if after != before {
        return Err(format!("{} changed while it was read; compile it again", source.display()));
    }
    let cpath = path_of(source);
    let mut tmp = cpath.as_os_str().to_os_string();
    tmp.push(format!(".tmp{}", std::process::id()));
    let io = |e: std::io::Error| format!("{}: {e}", cpath.display());
    let mut w = cdb2::CDBWriter::with_filenames(&cpath, PathBuf::from(tmp)).map_err(io)?;
    w.add(b"", meta.encode().as_bytes()).map_err(io)?;
    for (k, v) in rows.iter() {
        w.add(k.as_bytes(), v.as_bytes()).map_err(io)?;
    }
    w.finish().map_err(io)?;
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compiled_name_is_the_source_name_plus_cdb() {
        assert_eq!(path_of(Path::new("data/users")), PathBuf::from("data/users.cdb"));
        assert_eq!(path_of(Path::new("/etc/x.txt")), PathBuf::from("/etc/x.txt.cdb"));
    }

    /// A temporary directory, removed on drop.
    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    impl std::ops::Deref for Dir {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    fn dir(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("mailpolicy-compiled-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    #[test]
    fn a_compiled_table_answers_like_its_source() {
        let d = dir("same");
        for kind in ["map", "list", "access"] {
            let src = d.join(kind);
            let mut text = String::from("# comment\n\n");
            for i in 0..3000 {
                text.push_str(&format!("User{i}@Example.COM  value {i} with words\n"));
            }
            text.push_str("user7@example.com second entry loses\nexample.net REJECT 550 go away\n10.1.2 OK\n");
            std::fs::write(&src, &text).unwrap();
            assert_eq!(compile(kind, &src).unwrap(), 3002);
            let Compiled::Use(c) = load(kind, &src) else { panic!("compiled {kind} table not used") };
            let t = FileTable::parse(kind, &text).unwrap();
            assert_eq!(c.len(), t.len());
            let mut keys: Vec<String> = (0..3100).map(|i| format!("user{i}@example.com")).collect();
            keys.extend(
                ["USER5@EXAMPLE.COM", "example.net", "10.1.2", "", "nobody", "user7@example.co"].map(String::from),
            );
            for k in &keys {
                assert_eq!(c.lookup(k), t.lookup(k), "{kind} {k}");
            }
        }
    }

    #[test]
    fn a_stale_damaged_or_misnamed_compiled_table_is_not_used() {
        let d = dir("stale");
        let src = d.join("users");
        std::fs::write(&src, "a@x one\n").unwrap();
        assert!(matches!(load("map", &src), Compiled::Absent));
        compile("map", &src).unwrap();
        assert!(matches!(load("map", &src), Compiled::Use(_)));
        assert!(matches!(load("list", &src), Compiled::Stale(w) if w.contains("compiled as a map table")));
        // Edited after compiling: the size differs.
        std::fs::write(&src, "a@x two words\n").unwrap();
        assert!(matches!(load("map", &src), Compiled::Stale(w) if w.contains("older than")));
        compile("map", &src).unwrap();
        assert!(matches!(load("map", &src), Compiled::Use(t) if t.lookup("A@X").as_deref() == Some("two words")));
        // Damaged.
        let c = path_of(&src);
        let mut b = std::fs::read(&c).unwrap();
        b.truncate(100);
        std::fs::write(&c, b).unwrap();
        assert!(matches!(load("map", &src), Compiled::Stale(w) if w.contains("not a cdb")));
        // No source beside it.
        compile("map", &src).unwrap();
        std::fs::remove_file(&src).unwrap();
        assert!(matches!(load("map", &src), Compiled::Alone(_)));
        // Kinds that do not compile, and a source that does not parse.
        assert!(compile("regexp", &src).unwrap_err().contains("do not compile"));
        assert!(matches!(load("cidr", &src), Compiled::Absent));
        let bad = d.join("bad");
        std::fs::write(&bad, "10.0.0.0/33 x\n").unwrap();
        assert!(compile("cidr", &bad).is_err());
        assert!(compile("map", &d.join("missing")).unwrap_err().contains("missing"));
    }
}
