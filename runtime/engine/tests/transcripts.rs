//! Every transcript of the repository (`tests/transcripts/` and `examples/`) runs through
//! the real engine and evaluator, as `mailc test` runs them.

use std::path::{Path, PathBuf};

use mailpolicy_engine::transcript::{parse, run::Runner};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
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
    assert!(!files.is_empty(), "no transcripts found under {}", root().display());
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
    assert!(errors.is_empty(), "transcripts that do not parse:\n{}", errors.join("\n"));
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
            } else if r.failures.iter().any(|f| f.contains("has no DKIM signer")) {
                // DKIM signing needs a cryptography crate, which the engine has none of: these
                // cases (and their expectations about the signature, which fail with it) run
                // under `mailc test` (tests/run.sh), whose runner has the daemon's signer.
                continue;
            } else {
                failed.push(format!("{}::{} (line {})\n  {}", f.display(), r.name, r.line, r.failures.join("\n  ")));
            }
        }
    }
    assert!(failed.is_empty(), "{} passed, {} failed:\n\n{}", passed, failed.len(), failed.join("\n\n"));
    assert!(passed >= 150, "only {passed} transcript cases ran");
}

/// Issue 6, B1: every open-relay policy of `tests/assurance/` (`relay_*`) gives a
/// counterexample, and that transcript relays (its final RCPT gets 250) under the real
/// engine; every safe twin (`safe_*`) is proven and gives none.
#[test]
fn open_relay_counterexamples_relay() {
    use mailpolicy_lang::{analysis, FsLoader};
    let dir = root().join("tests/assurance");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/assurance")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "mailpolicy"))
        .collect();
    files.sort();
    let out = std::env::temp_dir().join(format!("mailc-counterexamples-{}", std::process::id()));
    std::fs::create_dir_all(&out).expect("temp dir");
    let loader = FsLoader { std_dir: std_dir() };
    let mut runner = Runner::new(std_dir());
    let (mut relays, mut safe) = (0, 0);
    let mut failures = Vec::new();
    for f in &files {
        let stem = f.file_stem().unwrap().to_string_lossy().into_owned();
        let (c, cases) = analysis::check(&f.display().to_string(), &loader);
        let flagged = c.diagnostics.iter().any(|d| d.code == "mailc::open-relay");
        if stem.starts_with("safe_") {
            safe += 1;
            if flagged || !cases.is_empty() {
                failures.push(format!("{stem}: a safe twin was not proven"));
            }
            continue;
        }
        if !stem.starts_with("relay_") {
            continue;
        }
        relays += 1;
        if !flagged || cases.is_empty() {
            failures.push(format!("{stem}: the open relay was not caught"));
            continue;
        }
        for (i, cx) in cases.iter().enumerate() {
            // As `mailc check` does: the finding stands when one of its transcripts relays.
            let mut tried = vec![cx.transcript.clone()];
            tried.extend(cx.alternatives.iter().cloned());
            let mut first_failure = None;
            let mut relayed = false;
            for (k, t) in tried.iter().enumerate() {
                let path = out.join(format!("{stem}.{i}.{k}.transcript"));
                let text = format!("policy: {}\n\n{t}", f.display());
                std::fs::write(&path, &text).expect("write counterexample");
                let file = match parse(&path, &text) {
                    Ok(t) => t,
                    Err(e) => {
                        first_failure.get_or_insert(format!("does not parse: {e:?}\n{text}"));
                        continue;
                    }
                };
                let results = runner.run_file(&file);
                match results.iter().find(|r| !r.passed()) {
                    None => {
                        relayed = true;
                        break;
                    }
                    Some(r) => {
                        first_failure.get_or_insert(format!("does not relay: {:?}\n{text}", r.failures));
                    }
                }
            }
            if !relayed {
                failures.push(format!("{stem}: counterexample {}", first_failure.unwrap_or_default()));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&out);
    assert!(relays >= 90, "only {relays} open-relay policies");
    assert!(safe >= 60, "only {safe} safe twins");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// B5: a case keeps each verdict's rule and trace, for `mailc explain`.
#[test]
fn verdicts_keep_their_trace() {
    let path = root().join("examples/access-dnsbl.transcript");
    let text = std::fs::read_to_string(&path).expect("example transcript");
    let file = parse(&path, &text).expect("parses");
    let case = file.cases.iter().find(|c| c.name == "relaying is refused").expect("the relaying case");
    let r = Runner::new(std_dir()).run_case(&file, case);
    assert!(r.passed(), "{:?}", r.failures);
    let rcpt = r.verdicts.iter().find(|v| v.stage == mailpolicy_lang::ir::Stage::Rcpt).expect("a rcpt verdict");
    assert!(rcpt.outcome.starts_with("reject 554"), "{}", rcpt.outcome);
    assert!(rcpt.rule.is_some(), "the relay check decided");
    let tests =
        rcpt.trace.iter().filter(|t| matches!(t, mailpolicy_engine::eval::Trace::Test { result: true, .. })).count();
    assert_eq!(tests, 1, "the relay check's test was true: {:?}", rcpt.trace);
}
