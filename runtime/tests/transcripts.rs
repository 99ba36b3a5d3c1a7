//! Every transcript of the repository (`tests/transcripts/` and `examples/`) runs through
//! the real engine and evaluator, as `mailc test` runs them.

use std::path::{Path, PathBuf};

use mailpolicy_runtime::transcript::{parse, run::Runner};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for e in entries {
        if e.is_dir() {
            collect(&e, out);
        } else if e.extension().is_some_and(|x| x == "transcript") {
            out.push(e);
        }
    }
}

fn transcripts() -> Vec<PathBuf> {
    let mut files = Vec::new();
    collect(&root().join("tests/transcripts"), &mut files);
    collect(&root().join("examples"), &mut files);
    assert!(
        !files.is_empty(),
        "no transcripts found under {}",
        root().display()
    );
    files
}

fn std_dir() -> Option<PathBuf> {
    let d = root().join("stdlib/policy");
    d.is_dir().then_some(d)
}

#[test]
fn every_transcript_parses() {
    let mut errors = Vec::new();
    for f in transcripts() {
        let text = std::fs::read_to_string(&f).unwrap();
        if let Err(errs) = parse(&f, &text) {
            for e in errs {
                errors.push(format!("{}:{}: {}", f.display(), e.line, e.message));
            }
        }
    }
    assert!(
        errors.is_empty(),
        "transcripts that do not parse:\n{}",
        errors.join("\n")
    );
}

#[test]
fn every_case_passes() {
    let mut runner = Runner::new(std_dir());
    let (mut passed, mut failed) = (0, Vec::new());
    for f in transcripts() {
        let text = std::fs::read_to_string(&f).unwrap();
        let Ok(file) = parse(&f, &text) else { continue };
        for r in runner.run_file(&file) {
            if r.passed() {
                passed += 1;
            } else {
                failed.push(format!(
                    "{}::{} (line {})\n  {}",
                    f.display(),
                    r.name,
                    r.line,
                    r.failures.join("\n  ")
                ));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} passed, {} failed:\n\n{}",
        passed,
        failed.len(),
        failed.join("\n\n")
    );
    assert!(passed >= 150, "only {passed} transcript cases ran");
}
