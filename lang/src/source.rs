//! Source files, spans and the loader that reads a policy and its includes.
//!
//! This is the only place `lang` touches the file system, and only through [`Loader`].

use std::path::{Path, PathBuf};

/// Index of a file in a [`SourceMap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct FileId(pub u32);

/// A byte range in one source file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Span {
    pub file: FileId,
    pub start: u32,
    pub end: u32,
}

impl Span {
    pub fn new(file: FileId, start: usize, end: usize) -> Span {
        Span { file, start: start as u32, end: end as u32 }
    }
    pub fn to(self, other: Span) -> Span {
        Span { file: self.file, start: self.start.min(other.start), end: self.end.max(other.end) }
    }
    pub fn len(self) -> usize {
        (self.end - self.start) as usize
    }
    pub fn is_empty(self) -> bool {
        self.end == self.start
    }
}

/// One loaded source file.
#[derive(Debug)]
pub struct SourceFile {
    /// The name shown in diagnostics (the path as given, or as resolved for includes).
    pub name: String,
    pub path: PathBuf,
    pub text: String,
    line_starts: Vec<u32>,
}

impl SourceFile {
    pub fn new(name: String, path: PathBuf, text: String) -> SourceFile {
        let mut line_starts = vec![0];
        for (i, b) in text.bytes().enumerate() {
            if b == b'\n' {
                line_starts.push(i as u32 + 1);
            }
        }
        SourceFile { name, path, text, line_starts }
    }

    /// Byte range of a 1-based line, without its line end.
    pub fn line_range(&self, line: u32) -> Option<(usize, usize)> {
        let i = (line as usize).checked_sub(1)?;
        let start = *self.line_starts.get(i)? as usize;
        let end = self.line_starts.get(i + 1).map(|e| *e as usize).unwrap_or(self.text.len());
        let text = self.text.get(start..end)?;
        Some((start, start + text.trim_end_matches(['\r', '\n']).len()))
    }

    /// 1-based line and column (column counts characters) of a byte offset.
    pub fn line_col(&self, offset: u32) -> (u32, u32) {
        let line = match self.line_starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i - 1,
        };
        let start = self.line_starts[line] as usize;
        let end = (offset as usize).min(self.text.len());
        let col = self.text.get(start..end).map(|s| s.chars().count()).unwrap_or(end - start);
        (line as u32 + 1, col as u32 + 1)
    }
}

/// All files of one compilation.
#[derive(Debug, Default)]
pub struct SourceMap {
    files: Vec<SourceFile>,
}

impl SourceMap {
    pub fn add(&mut self, file: SourceFile) -> FileId {
        self.files.push(file);
        FileId(self.files.len() as u32 - 1)
    }
    pub fn get(&self, id: FileId) -> &SourceFile {
        &self.files[id.0 as usize]
    }
    pub fn files(&self) -> impl Iterator<Item = (FileId, &SourceFile)> {
        self.files.iter().enumerate().map(|(i, f)| (FileId(i as u32), f))
    }
    pub fn find(&self, path: &Path) -> Option<FileId> {
        self.files.iter().position(|f| f.path == path).map(|i| FileId(i as u32))
    }
    pub fn text(&self, span: Span) -> &str {
        self.get(span.file).text.get(span.start as usize..span.end as usize).unwrap_or("")
    }
    pub fn line_col(&self, span: Span) -> (u32, u32) {
        self.get(span.file).line_col(span.start)
    }
}

/// Reads policy sources. The compiler asks it for the entry file and every include.
pub trait Loader {
    /// Resolve `name` as written in an `include` of `from` (None for the entry file).
    fn resolve(&self, name: &str, from: Option<&Path>) -> PathBuf;
    /// Read the file. The error text is shown to the user.
    fn load(&self, path: &Path) -> Result<String, String>;
}

/// Loader over the real file system. Includes resolve relative to the including file;
/// `std:NAME` resolves to the standard library's snippets: from `std_dir` when given (a
/// checkout's `stdlib/policy/`, or `MAILPOLICY_STDLIB`), else the copies built into the
/// binary ([`STD_MODULES`]), so an installed `mailc` needs no file of the build tree.
pub struct FsLoader {
    pub std_dir: Option<PathBuf>,
}

/// The standard library's modules (`stdlib/policy/NAME.mailpolicy`), built in.
pub const STD_MODULES: &[(&str, &str)] = &[
    ("dictionary", include_str!("../../stdlib/policy/dictionary.mailpolicy")),
    ("hygiene", include_str!("../../stdlib/policy/hygiene.mailpolicy")),
    ("receipts", include_str!("../../stdlib/policy/receipts.mailpolicy")),
];

/// The built-in text of `std:NAME`.
pub fn std_module(name: &str) -> Option<&'static str> {
    STD_MODULES.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

impl Loader for FsLoader {
    fn resolve(&self, name: &str, from: Option<&Path>) -> PathBuf {
        if let Some(rest) = name.strip_prefix("std:") {
            match &self.std_dir {
                Some(dir) => return dir.join(format!("{rest}.mailpolicy")),
                // Named as written: `load` serves it from the built-in copies.
                None => return PathBuf::from(name),
            }
        }
        let p = Path::new(name);
        match from.and_then(|f| f.parent()) {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.to_path_buf(),
        }
    }
    fn load(&self, path: &Path) -> Result<String, String> {
        if self.std_dir.is_none() {
            if let Some(rest) = path.to_str().and_then(|p| p.strip_prefix("std:")) {
                return std_module(rest).map(str::to_string).ok_or_else(|| {
                    let names: Vec<&str> = STD_MODULES.iter().map(|(n, _)| *n).collect();
                    format!("no standard module `std:{rest}` (there are {})", names.join(", "))
                });
            }
        }
        std::fs::read_to_string(path).map_err(|e| e.to_string())
    }
}

/// Loader over in-memory sources, for tests and the fuzzer.
#[derive(Default)]
pub struct MemLoader {
    pub files: std::collections::HashMap<PathBuf, String>,
}

impl MemLoader {
    pub fn single(name: &str, text: &str) -> MemLoader {
        let mut files = std::collections::HashMap::new();
        files.insert(PathBuf::from(name), text.to_string());
        MemLoader { files }
    }
}

impl Loader for MemLoader {
    fn resolve(&self, name: &str, _from: Option<&Path>) -> PathBuf {
        PathBuf::from(name)
    }
    fn load(&self, path: &Path) -> Result<String, String> {
        self.files.get(path).cloned().ok_or_else(|| "no such file".to_string())
    }
}
