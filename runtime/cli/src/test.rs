//! `mailc test PATH...`: run transcript files (or every `*.transcript` under folders).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use mailpolicy_engine::transcript::{self, run::Runner};

pub fn main(args: Vec<OsString>) -> u8 {
    let mut paths: Vec<PathBuf> = Vec::new();
    let mut verbose = false;
    let mut filter: Option<String> = None;
    let mut parser = lexopt::Parser::from_args(args);
    loop {
        match parser.next() {
            Ok(Some(lexopt::Arg::Long("verbose")) | Some(lexopt::Arg::Short('v'))) => verbose = true,
            Ok(Some(lexopt::Arg::Long("filter"))) => match parser.value().ok().and_then(|v| v.into_string().ok()) {
                Some(f) => filter = Some(f),
                None => return usage("--filter needs a text"),
            },
            Ok(Some(lexopt::Arg::Value(v))) => paths.push(v.into()),
            Ok(Some(other)) => return usage(&format!("unexpected argument {}", other.unexpected())),
            Ok(None) => break,
            Err(e) => return usage(&e.to_string()),
        }
    }
    if paths.is_empty() {
        return usage("no transcript file or folder given");
    }
    let mut files = Vec::new();
    for p in &paths {
        if !p.exists() {
            return usage(&format!("{}: no such file or folder", p.display()));
        }
        collect(p, &mut files);
    }
    files.sort();
    if files.is_empty() {
        return usage("no *.transcript files found");
    }
    let mut runner = Runner::new(crate::check::std_dir()).with_dkim(Some(mailpolicy_daemon::auth::transcript_dkim));
    let (mut passed, mut failed) = (0usize, 0usize);
    let mut failures: Vec<(String, Vec<String>)> = Vec::new();
    for f in &files {
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {}: {e}", f.display());
                failed += 1;
                failures.push((f.display().to_string(), vec![format!("cannot read: {e}")]));
                continue;
            }
        };
        let file = match transcript::parse(f, &text) {
            Ok(t) => t,
            Err(errs) => {
                for e in &errs {
                    println!("{}:{}: error: {}", f.display(), e.line, e.message);
                }
                failed += 1;
                failures.push((
                    f.display().to_string(),
                    errs.iter().map(|e| format!("line {}: {}", e.line, e.message)).collect(),
                ));
                continue;
            }
        };
        for case in &file.cases {
            if filter.as_ref().is_some_and(|flt| !case.name.contains(flt.as_str())) {
                continue;
            }
            let r = runner.run_case(&file, case);
            let id = format!("{}::{}", f.display(), r.name);
            if r.passed() {
                passed += 1;
                println!("case {id} ... ok");
            } else {
                failed += 1;
                println!("case {id} ... FAILED");
                failures.push((format!("{id} (line {})", r.line), r.failures.clone()));
            }
            if verbose {
                for l in &r.log {
                    println!("{l}");
                }
            }
        }
    }
    if !failures.is_empty() {
        println!("\nfailures:");
        for (id, fs) in &failures {
            println!("\n---- {id} ----");
            for f in fs {
                println!("  {f}");
            }
        }
    }
    println!();
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        1
    } else {
        0
    }
}

fn collect(p: &Path, out: &mut Vec<PathBuf>) {
    if p.is_dir() {
        let Ok(rd) = std::fs::read_dir(p) else { return };
        let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for e in entries {
            if e.is_dir() || e.extension().is_some_and(|x| x == "transcript") {
                collect(&e, out);
            }
        }
    } else {
        out.push(p.to_path_buf());
    }
}

fn usage(msg: &str) -> u8 {
    eprintln!("mailc test: {msg}\nusage: mailc test [--verbose] [--filter TEXT] PATH...");
    2
}
