//! What the open-relay proof read of the file tables, kept so that the daemon never uses a
//! table's contents the proof has not seen (B1: no table edit opens a relay unchecked).
//!
//! The rows are what `mailc serve`'s own check read (not a second reading of every file).
//! The stamps say which files still hold what was read: a table whose file was written
//! around the time of the check (or was missing then) is proven again when it is first
//! loaded; any later change is proven again when it is read (`lookup.rs`).

use std::path::Path;
use std::time::{Duration, SystemTime};

use mailpolicy_lang::ir::Program;
use mailpolicy_lang::tables::Rows;

/// A source file's modification time and size.
pub type Stamp = (SystemTime, u64);

/// A write this close before the check began may not be what it read: file times come
/// from a coarse clock.
const MARGIN: Duration = Duration::from_secs(1);

/// What one open-relay proof read, per declared table (in `Program::tables` order).
#[derive(Debug, Clone, Default)]
pub struct Proven {
    /// The rows the proof used (None: not a file table, or not readable then).
    pub rows: Vec<Option<Rows>>,
    /// The source's stamp when it is known to hold those rows (None: unknown).
    pub stamps: Vec<Option<Stamp>>,
}

impl Proven {
    /// The rows read by a check that began at `began`, with the stamps of the files that
    /// have not been written since a moment before it.
    pub fn after_check(prog: &Program, dir: &Path, rows: Vec<Option<Rows>>, began: SystemTime) -> Proven {
        let since = began.checked_sub(MARGIN).unwrap_or(SystemTime::UNIX_EPOCH);
        let stamps = prog
            .tables
            .iter()
            .zip(rows.iter())
            .map(|(t, r)| {
                r.as_ref()?;
                let stamp = source_stamp(&dir.join(t.source.as_ref()?))?;
                (stamp.0 < since).then_some(stamp)
            })
            .collect();
        Proven { rows, stamps }
    }

    /// Read the tables now, as a check would (a daemon started without `load_policy`).
    pub fn read(prog: &Program, dir: &Path) -> Proven {
        let began = SystemTime::now();
        let rows = mailpolicy_lang::analysis::read_tables(prog, dir, &mailpolicy_lang::FsLoader { std_dir: None });
        Proven::after_check(prog, dir, rows, began)
    }

    /// Whether the file at `path` still holds what the proof read of table `idx`.
    pub fn unchanged(&self, idx: usize, path: &Path) -> bool {
        match self.stamps.get(idx) {
            Some(Some(s)) => source_stamp(path).as_ref() == Some(s),
            _ => false,
        }
    }
}

/// `path`'s modification time and size, if it is a readable file.
pub fn source_stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_written_during_the_check_is_not_taken_as_proven() {
        let dir = std::env::temp_dir().join(format!("mp-proven-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("old"), "a@example.com x\n").expect("write");
        std::fs::write(dir.join("new"), "a@example.com x\n").expect("write");
        let policy = "table old = map \"old\";\ntable new = map \"new\";\ntable gone = map \"gone\";\n";
        let c = mailpolicy_lang::compile("p.mailpolicy", &mailpolicy_lang::MemLoader::single("p.mailpolicy", policy));
        let prog = c.program.expect("compiles");
        let rows = mailpolicy_lang::analysis::read_tables(&prog, &dir, &mailpolicy_lang::FsLoader { std_dir: None });
        // "old" was written long before this check began; "new" just before it.
        let later = SystemTime::now() + Duration::from_secs(3600);
        let p = Proven::after_check(&prog, &dir, rows.clone(), later);
        assert!(p.unchanged(0, &dir.join("old")) && p.unchanged(1, &dir.join("new")));
        let p = Proven::after_check(&prog, &dir, rows, SystemTime::now());
        assert!(!p.unchanged(0, &dir.join("old")), "written within the margin");
        assert!(!p.unchanged(2, &dir.join("gone")), "missing at check time");
        let p = Proven::after_check(&prog, &dir, p.rows, later);
        std::fs::write(dir.join("old"), "a@example.com x\nb@example.com y\n").expect("write");
        assert!(!p.unchanged(0, &dir.join("old")), "changed since");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
