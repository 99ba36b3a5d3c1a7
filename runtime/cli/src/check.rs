//! `mailc check`: compile policies and print every diagnostic.

use std::ffi::OsString;

use mailpolicy_lang::analysis;
use mailpolicy_lang::{Diagnostic, FsLoader, Severity, SourceMap};
use miette::{LabeledSpan, NamedSource};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Human,
    Json,
}

pub fn main(args: Vec<OsString>) -> u8 {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut format = Format::Human;
    let mut deny_warnings = false;
    let mut emit: Option<std::path::PathBuf> = None;
    let mut files: Vec<String> = Vec::new();
    loop {
        let arg = match parser.next() {
            Ok(Some(a)) => a,
            Ok(None) => break,
            Err(e) => return usage(&e.to_string()),
        };
        match arg {
            Long("format") => match parser.value().ok().and_then(|v| v.into_string().ok()).as_deref() {
                Some("json") => format = Format::Json,
                Some("human") => format = Format::Human,
                _ => return usage("--format takes human or json"),
            },
            Long("deny-warnings") => deny_warnings = true,
            Long("emit-counterexample") => match parser.value() {
                Ok(v) => emit = Some(v.into()),
                Err(_) => return usage("--emit-counterexample needs a folder"),
            },
            Value(v) => match v.into_string() {
                Ok(s) => files.push(s),
                Err(_) => return usage("file names must be UTF-8"),
            },
            other => return usage(&format!("unexpected argument {}", other.unexpected())),
        }
    }
    if files.is_empty() {
        return usage("no policy file given");
    }
    let loader = FsLoader { std_dir: std_dir() };
    let mut worst = 0u8;
    for file in &files {
        let (mut c, counterexamples) = analysis::check(file, &loader);
        let counterexamples = confirm(file, &mut c.diagnostics, counterexamples);
        if let Some(dir) = &emit {
            if let Err(e) = write_counterexamples(dir, file, &counterexamples) {
                eprintln!("mailc check: cannot write counterexamples to {}: {e}", dir.display());
                worst = 2;
            }
        }
        let io_error = c.diagnostics.iter().any(|d| d.code == "mailc::io");
        for d in &c.diagnostics {
            let mut d = d.clone();
            if deny_warnings && d.severity == Severity::Warning {
                d.severity = Severity::Error;
            }
            match format {
                Format::Json => println!("{}", json_line(&d, &c.sources)),
                Format::Human => eprintln!("{:?}", to_report(&d, &c.sources)),
            }
        }
        let errors = c.diagnostics.iter().filter(|d| d.is_error() || deny_warnings).count();
        let code = if io_error {
            2
        } else if errors > 0 {
            1
        } else {
            0
        };
        if format == Format::Human {
            let warnings = c.diagnostics.iter().filter(|d| !d.is_error()).count();
            if code == 0 {
                eprintln!("{file}: ok ({warnings} warning{})", if warnings == 1 { "" } else { "s" });
            } else if code == 1 {
                eprintln!("{file}: {errors} error{}", if errors == 1 { "" } else { "s" });
            }
        }
        worst = worst.max(code);
    }
    worst
}

/// Replay every counterexample through the real engine (`mailc test`'s runner). A finding
/// whose transcripts do not relay stays an error, but says the proof could not decide
/// instead of calling the listener an open relay; its counterexample is not written.
fn confirm(
    file: &str,
    diags: &mut [Diagnostic],
    cases: Vec<analysis::Counterexample>,
) -> Vec<analysis::Counterexample> {
    let Ok(policy) = std::fs::canonicalize(file) else { return cases };
    let mut out = Vec::new();
    for mut cx in cases {
        let mut tried = vec![cx.transcript.clone()];
        tried.extend(cx.alternatives.iter().cloned());
        let mut why = Vec::new();
        let good = tried.into_iter().find(|t| {
            match mailpolicy_engine::transcript::replay(
                std_dir(),
                &policy,
                t,
                Some(mailpolicy_daemon::auth::transcript_dkim),
            ) {
                Ok(()) => true,
                Err(f) => {
                    if why.is_empty() {
                        why = f;
                    }
                    false
                }
            }
        });
        match good {
            Some(t) => {
                cx.transcript = t;
                out.push(cx);
            }
            None => {
                if let Some(d) = diags.get_mut(cx.diagnostic) {
                    d.message = d.message.replace("is an open relay", "could not be proven not to relay");
                    let first = why.first().cloned().unwrap_or_default();
                    d.help = Some(format!(
                        "{}\n(the counterexample the proof built does not relay under `mailc test`: {first}; the proof cannot rule this path out)",
                        d.help.clone().unwrap_or_default()
                    ));
                }
            }
        }
    }
    out
}

/// Write one transcript per relaying listener: `DIR/<policy stem>.<listener>.transcript`,
/// naming the policy by its absolute path so it runs from anywhere.
fn write_counterexamples(dir: &std::path::Path, file: &str, cases: &[analysis::Counterexample]) -> std::io::Result<()> {
    if cases.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    let policy = std::fs::canonicalize(file)?;
    let stem = policy.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "policy".into());
    for c in cases {
        let name = c.listener.as_deref().unwrap_or("default");
        let path = dir.join(format!("{stem}.{name}.transcript"));
        let text = format!("policy: {}\n\n{}", policy.display(), c.transcript);
        std::fs::write(&path, text)?;
        eprintln!("{file}: counterexample written to {}", path.display());
    }
    Ok(())
}

/// Where `include "std:NAME"` finds the standard library's policy snippets.
pub fn std_dir() -> Option<std::path::PathBuf> {
    if let Some(dir) = std::env::var_os("MAILPOLICY_STDLIB") {
        return Some(dir.into());
    }
    let built = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../stdlib/policy");
    built.is_dir().then_some(built)
}

fn usage(msg: &str) -> u8 {
    eprintln!(
        "mailc check: {msg}\nusage: mailc check [--format human|json] [--deny-warnings] [--emit-counterexample DIR] FILE..."
    );
    2
}

fn json_line(d: &Diagnostic, sources: &SourceMap) -> String {
    json_value(d, sources).to_string()
}

/// Start and end (1-based line, 1-based column counting characters) of a span.
fn span_pos(sources: &SourceMap, span: mailpolicy_lang::source::Span) -> (String, u32, u32, u32, u32) {
    let f = sources.get(span.file);
    let (l, c) = f.line_col(span.start);
    let (el, ec) = f.line_col(span.end);
    (f.name.clone(), l, c, el, ec)
}

/// One diagnostic as the JSON object `--format json` prints (spec/cli.md).
pub fn json_value(d: &Diagnostic, sources: &SourceMap) -> serde_json::Value {
    let (file, line, column, end_line, end_column) = match d.span.map(|s| span_pos(sources, s)) {
        Some((f, l, c, el, ec)) => (Some(f), Some(l), Some(c), Some(el), Some(ec)),
        None => (None, None, None, None, None),
    };
    let related: Vec<serde_json::Value> = d
        .related
        .iter()
        .map(|(s, text)| {
            let (f, l, c, el, ec) = span_pos(sources, *s);
            serde_json::json!({
                "file": f, "line": l, "column": c, "end_line": el, "end_column": ec, "message": text,
            })
        })
        .collect();
    serde_json::json!({
        "severity": d.severity.as_str(),
        "code": d.code,
        "message": d.message,
        "file": file,
        "line": line,
        "column": column,
        "end_line": end_line,
        "end_column": end_column,
        "label": d.label,
        "help": d.help,
        "related": related,
    })
}

fn to_report(d: &Diagnostic, sources: &SourceMap) -> miette::Report {
    let severity = match d.severity {
        Severity::Error => miette::Severity::Error,
        Severity::Warning => miette::Severity::Warning,
    };
    let mut labels = Vec::new();
    let mut source = None;
    if let Some(span) = d.span {
        let f = sources.get(span.file);
        source = Some(NamedSource::new(f.name.clone(), f.text.clone()));
        labels.push(LabeledSpan::new_primary_with_span(d.label.clone(), (span.start as usize, span.len())));
        for (s, text) in &d.related {
            if s.file == span.file {
                labels.push(LabeledSpan::new_with_span(Some(text.clone()), (s.start as usize, s.len())));
            }
        }
    }
    let mut diag =
        miette::MietteDiagnostic::new(d.message.clone()).with_code(d.code).with_severity(severity).with_labels(labels);
    let mut help = d.help.clone();
    for (s, text) in &d.related {
        if d.span.is_some_and(|p| p.file != s.file) {
            let (l, c) = sources.line_col(*s);
            let extra = format!("{text}: {}:{l}:{c}", sources.get(s.file).name);
            help = Some(match help {
                Some(h) => format!("{h}\n{extra}"),
                None => extra,
            });
        }
    }
    if let Some(h) = help {
        diag = diag.with_help(h);
    }
    let report = miette::Report::new(diag);
    match source {
        Some(s) => report.with_source_code(s),
        None => report,
    }
}
