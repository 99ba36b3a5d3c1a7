//! `mailc fmt [--check] PATH...`: lay policies out in the one canonical layout
//! (`mailpolicy_lang::format`). Folders are searched for `*.mailpolicy`; `-` is standard
//! input, written formatted to standard output.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub fn main(args: Vec<OsString>) -> u8 {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut check = false;
    let mut paths: Vec<PathBuf> = Vec::new();
    loop {
        match parser.next() {
            Ok(Some(Long("check"))) => check = true,
            Ok(Some(Value(v))) => paths.push(v.into()),
            Ok(Some(other)) => return usage(&format!("unexpected argument {}", other.unexpected())),
            Ok(None) => break,
            Err(e) => return usage(&e.to_string()),
        }
    }
    if paths.is_empty() {
        return usage("no file given");
    }
    let mut files = Vec::new();
    for p in &paths {
        if p.as_os_str() == "-" {
            files.push(p.clone());
        } else if p.is_dir() {
            let before = files.len();
            collect(p, &mut files);
            if files.len() == before {
                eprintln!("mailc fmt: no *.mailpolicy file in {}", p.display());
                return 2;
            }
        } else if p.exists() {
            files.push(p.clone());
        } else {
            eprintln!("mailc fmt: {}: no such file or directory", p.display());
            return 2;
        }
    }
    let mut worst = 0u8;
    for f in &files {
        worst = worst.max(one(f, check));
    }
    worst
}

fn one(path: &Path, check: bool) -> u8 {
    let stdin = path.as_os_str() == "-";
    let name = if stdin { "<stdin>".to_string() } else { path.display().to_string() };
    let text = if stdin {
        let mut s = String::new();
        if let Err(e) = std::io::stdin().read_to_string(&mut s) {
            eprintln!("mailc fmt: cannot read standard input: {e}");
            return 2;
        }
        s
    } else {
        match std::fs::read_to_string(path) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("mailc fmt: cannot read {name}: {e}");
                return 2;
            }
        }
    };
    let out = match mailpolicy_lang::format::format(&text) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("mailc fmt: {name}: {e}");
            return 2;
        }
    };
    if check {
        if out != text {
            eprintln!("{name}: not formatted (run `mailc fmt {name}`)");
            if let Some(line) = first_difference(&text, &out) {
                eprintln!("  first difference at line {line}");
            }
            return 1;
        }
        return 0;
    }
    if stdin {
        let mut o = std::io::stdout().lock();
        if o.write_all(out.as_bytes()).and_then(|_| o.flush()).is_err() {
            return 2;
        }
        return 0;
    }
    if out == text {
        return 0;
    }
    // Write beside the file and rename over it: an interrupted run never leaves half a policy.
    // A symbolic link is followed, so the link stays a link.
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let path = real.as_path();
    let tmp = path.with_file_name(format!(
        ".{}.fmt-{}",
        path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    let res = std::fs::write(&tmp, out.as_bytes())
        .and_then(|_| {
            if let Ok(meta) = std::fs::metadata(path) {
                std::fs::set_permissions(&tmp, meta.permissions())?;
            }
            Ok(())
        })
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        eprintln!("mailc fmt: cannot write {name}: {e}");
        return 2;
    }
    eprintln!("{name}: formatted");
    0
}

fn first_difference(a: &str, b: &str) -> Option<usize> {
    let mut la = a.lines();
    let mut lb = b.lines();
    let mut n = 1;
    loop {
        match (la.next(), lb.next()) {
            (None, None) => return None,
            (x, y) if x != y => return Some(n),
            _ => n += 1,
        }
    }
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect(&p, out);
        } else if p.extension().is_some_and(|e| e == "mailpolicy") {
            out.push(p);
        }
    }
}

fn usage(msg: &str) -> u8 {
    eprintln!(
        "mailc fmt: {msg}\nusage: mailc fmt [--check] PATH...   (PATH: a file, a folder, or - for standard input)"
    );
    2
}
