//! The diagnostics corpus: every `tests/check/*.mailpolicy` file is compiled with
//! [`mailpolicy_lang::compile`] and an [`FsLoader`], and the set of diagnostics it gives is
//! compared with the expectations written in the file itself. Every file in `examples/` must
//! compile with no diagnostic at all.
//!
//! # Expectation format
//!
//! Expectations are `#` comments, so a case file is still a policy:
//!
//! ```text
//! # expect: clean                               the file gives no diagnostic at all
//! # expect: error mailc::stage 4:6              a diagnostic at line 4, column 6 of this file
//! # expect: warning mailc::unused -             a diagnostic with no location
//! # expect: error mailc::include includes/cycle_b.mailpolicy:1:9
//!                                               a diagnostic in another file, named relative
//!                                               to tests/check/
//!   reject 450;
//! #~^ error mailc::reply 10                     on the line above, column 10
//! #~^^ error mailc::stage 6                     two lines above (one `^` per line), column 6
//! ```
//!
//! Lines and columns are 1-based; columns count characters, as `mailc check` prints them.
//! A `#~` line may also stand at the end of a code line (`reject 450; #~ error mailc::reply 10`
//! means this very line). The comparison is on the multiset of (severity, code, file, line,
//! column): every expected diagnostic must be produced, as many times as it is expected
//! (two identical lines expect it twice), and nothing else. A file without any
//! expectation fails, so no case can pass by accident. On a mismatch the test prints, per
//! file, the missing and the unexpected diagnostics with their messages.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mailpolicy_lang::{analysis, compile, Compilation, FsLoader, MemLoader, Severity};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("lang/ has a parent").to_path_buf()
}

fn loader() -> FsLoader {
    FsLoader { std_dir: Some(root().join("stdlib/policy")) }
}

/// (severity, code, file, line, column); file is "" for the case file itself and "-" with
/// line and column 0 for a diagnostic without a location.
type Key = (String, String, String, u32, u32);

fn parse_loc(loc: &str) -> Result<(String, u32, u32), String> {
    if loc == "-" {
        return Ok(("-".into(), 0, 0));
    }
    let mut parts: Vec<&str> = loc.rsplitn(3, ':').collect();
    parts.reverse();
    let (file, line, col) = match parts.as_slice() {
        [l, c] => (String::new(), *l, *c),
        [f, l, c] => (f.to_string(), *l, *c),
        _ => return Err(format!("bad location `{loc}`")),
    };
    let line = line.parse().map_err(|_| format!("bad line in `{loc}`"))?;
    let col = col.parse().map_err(|_| format!("bad column in `{loc}`"))?;
    Ok((file, line, col))
}

fn severity(word: &str) -> Result<String, String> {
    match word {
        "error" | "warning" => Ok(word.to_string()),
        other => Err(format!("severity must be error or warning, not `{other}`")),
    }
}

/// The expectations of a case file: None for `clean`.
fn expectations(text: &str) -> Result<BTreeMap<Key, usize>, String> {
    let mut out = BTreeMap::new();
    let mut clean = false;
    let mut any = false;
    for (i, line) in text.lines().enumerate() {
        let lineno = i as u32 + 1;
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("# expect:") {
            any = true;
            let words: Vec<&str> = rest.split_whitespace().collect();
            match words.as_slice() {
                ["clean"] => clean = true,
                [sev, code, loc] => {
                    let (file, l, c) = parse_loc(loc).map_err(|e| format!("line {lineno}: {e}"))?;
                    *out.entry((severity(sev)?, code.to_string(), file, l, c)).or_insert(0) += 1;
                }
                _ => {
                    return Err(format!(
                        "line {lineno}: expected `# expect: clean` or `# expect: SEVERITY CODE LINE:COL`"
                    ))
                }
            }
            continue;
        }
        // `#~` annotations: at the start of a line they point up with `^`; after code they
        // point at their own line.
        let Some(pos) = line.find("#~") else { continue };
        let own_line = !line[..pos].trim().is_empty();
        let after = &line[pos + 2..];
        let ups = after.chars().take_while(|c| *c == '^').count() as u32;
        if own_line && ups > 0 {
            return Err(format!("line {lineno}: `#~^` must start its line"));
        }
        if !own_line && ups == 0 {
            return Err(format!("line {lineno}: `#~` at the start of a line needs `^`"));
        }
        if ups >= lineno {
            return Err(format!("line {lineno}: `#~{}` points above the file", "^".repeat(ups as usize)));
        }
        any = true;
        let words: Vec<&str> = after[ups as usize..].split_whitespace().collect();
        let [sev, code, col] = words.as_slice() else {
            return Err(format!("line {lineno}: expected `#~^ SEVERITY CODE COLUMN`"));
        };
        let col: u32 = col.parse().map_err(|_| format!("line {lineno}: bad column `{col}`"))?;
        *out.entry((severity(sev)?, code.to_string(), String::new(), lineno - ups, col)).or_insert(0) += 1;
    }
    if !any {
        return Err("no expectation: write `# expect: clean` or the diagnostics it must give".into());
    }
    if clean && !out.is_empty() {
        return Err("`# expect: clean` together with expected diagnostics".into());
    }
    Ok(out)
}

fn actual(c: &Compilation, base: &Path, case: &Path) -> Vec<(Key, String)> {
    c.diagnostics
        .iter()
        .map(|d| {
            let sev = match d.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            };
            let (file, line, col) = match d.span {
                None => ("-".to_string(), 0, 0),
                Some(span) => {
                    let f = c.sources.get(span.file);
                    let (l, col) = c.sources.line_col(span);
                    let file = if f.path == case {
                        String::new()
                    } else {
                        f.path.strip_prefix(base).unwrap_or(&f.path).display().to_string()
                    };
                    (file, l, col)
                }
            };
            ((sev.to_string(), d.code.to_string(), file, line, col), d.message.clone())
        })
        .collect()
}

fn show(k: &Key) -> String {
    let loc = match (k.2.as_str(), k.3) {
        ("-", _) => "-".to_string(),
        ("", l) => format!("{l}:{}", k.4),
        (f, l) => format!("{f}:{l}:{}", k.4),
    };
    format!("{} {} {loc}", k.0, k.1)
}

fn policy_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "mailpolicy"))
        .collect();
    files.sort();
    files
}

#[test]
fn corpus() {
    run_corpus("tests/check", 60, |f| compile(f, &loader()));
}

/// The assurance corpus (issue 6): the same expectations, checked as `mailc check` does,
/// with the open-relay proof and the rule analyses.
#[test]
fn assurance() {
    run_corpus("tests/assurance", 40, |f| analysis::check(f, &loader()).0);
}

fn run_corpus(dir: &str, min: usize, check: impl Fn(&str) -> Compilation) {
    let base = root().join(dir);
    let files = policy_files(&base);
    assert!(files.len() >= min, "the corpus has {} cases", files.len());
    let mut failures = Vec::new();
    for case in &files {
        let name = case.strip_prefix(&base).unwrap_or(case).display().to_string();
        let text = std::fs::read_to_string(case).expect("read case");
        let want = match expectations(&text) {
            Ok(w) => w,
            Err(e) => {
                failures.push(format!("{name}: bad expectations: {e}"));
                continue;
            }
        };
        let c = check(&case.display().to_string());
        let got = actual(&c, &base, case);
        let mut got_keys: BTreeMap<Key, usize> = BTreeMap::new();
        for (k, _) in &got {
            *got_keys.entry(k.clone()).or_insert(0) += 1;
        }
        if got_keys == want {
            continue;
        }
        let mut report = format!("{name}:");
        for (k, n) in &want {
            let g = got_keys.get(k).copied().unwrap_or(0);
            for _ in g..*n {
                report.push_str(&format!("\n  - missing:    {}", show(k)));
            }
        }
        for (k, n) in &got_keys {
            let w = want.get(k).copied().unwrap_or(0);
            let msg = got.iter().find(|(g, _)| g == k).map_or("", |(_, m)| m.as_str());
            for _ in w..*n {
                report.push_str(&format!("\n  + unexpected: {}  ({msg})", show(k)));
            }
        }
        failures.push(report);
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), files.len(), failures.join("\n"));
}

#[test]
fn examples_are_clean() {
    let files = policy_files(&root().join("examples"));
    assert!(files.len() >= 6, "examples/ has {} policies", files.len());
    let mut failures = Vec::new();
    for f in &files {
        // As `mailc check --deny-warnings` sees them: proven not an open relay, no warning.
        let c = analysis::check(&f.display().to_string(), &loader()).0;
        for d in &c.diagnostics {
            failures.push(d.render_short(&c.sources));
        }
        if c.diagnostics.is_empty() && c.program.is_none() {
            failures.push(format!("{}: no program", f.display()));
        }
    }
    assert!(failures.is_empty(), "examples with diagnostics:\n{}", failures.join("\n"));
}

#[test]
fn missing_entry_file_is_an_io_error() {
    let c = compile("/nonexistent/dir/policy.mailpolicy", &loader());
    let codes: Vec<&str> = c.diagnostics.iter().map(|d| d.code).collect();
    assert_eq!(codes, ["mailc::io"]);
    assert!(c.diagnostics[0].span.is_none());
    assert!(c.program.is_none());
}

#[test]
fn expectation_parser_rejects_files_without_expectations() {
    assert!(expectations("on connect { accept; }\n").is_err());
    assert!(expectations("# expect: clean\n# expect: error mailc::type 1:1\n").is_err());
    assert!(expectations("#~^ error mailc::type 3\n").is_err());
    let e = expectations("on connect {\n  rejct;\n#~^ error mailc::undefined 3\n}\n").unwrap();
    assert_eq!(
        e.into_iter().collect::<Vec<_>>(),
        [(("error".into(), "mailc::undefined".into(), String::new(), 2, 3), 1)]
    );
}

/// A policy of 10,000 rules checks, and lowers to one instruction pair per rule.
#[test]
fn ten_thousand_rules() {
    let mut text = String::from("list blocked = cidr [\"192.0.2.0/24\"];\non rcpt {\n");
    for i in 0..10_000 {
        text.push_str(&format!(
            "  if recipient :is \"user{i}@example.com\" and client.ip not in blocked {{ reject 550 5.1.1 \"no user{i}\"; }}\n"
        ));
    }
    text.push_str("}\n");
    let c = compile("big.mailpolicy", &MemLoader::single("big.mailpolicy", &text));
    let msgs: Vec<String> = c.diagnostics.iter().map(|d| d.render_short(&c.sources)).collect();
    assert!(msgs.is_empty(), "{msgs:?}");
    let prog = c.program.expect("program");
    let rcpt = prog.stage(mailpolicy_lang::ir::Stage::Rcpt);
    assert!(rcpt.len() >= 20_000, "{} instructions", rcpt.len());
    // The whole of `mailc check`, analysis included, stays bounded on thousands of rules
    // whose conditions the attacker decides (this once exhausted the machine's memory).
    let mut text = String::from("on rcpt {\n");
    for i in 0..10_000 {
        text.push_str(&format!(
            "  if sender.domain :matches \"*.spam{i}.example\" and helo.name :is \"h{i}.example\" {{ tempfail 451 4.7.1 \"later\"; }}\n"
        ));
    }
    text.push_str("}\n");
    let (c, _) = mailpolicy_lang::analysis::check("big2.mailpolicy", &MemLoader::single("big2.mailpolicy", &text));
    assert!(!c.has_errors(), "{:?}", c.diagnostics.iter().map(|d| d.render_short(&c.sources)).collect::<Vec<_>>());
}

/// Cutting a valid policy at every byte offset never panics; every proper prefix that
/// ends inside a block is reported as an error.
#[test]
fn truncation_never_panics() {
    let path = root().join("tests/check/clean_everything.mailpolicy");
    let text = std::fs::read_to_string(&path).expect("read clean_everything");
    let common =
        std::fs::read_to_string(root().join("tests/check/includes/common.mailpolicy")).expect("read includes/common");
    let loader = |policy: &str| {
        let mut l = MemLoader::single("t.mailpolicy", policy);
        l.files.insert("includes/common.mailpolicy".into(), common.clone());
        l
    };
    let full = compile("t.mailpolicy", &loader(&text));
    let msgs: Vec<String> = full.diagnostics.iter().map(|d| d.render_short(&full.sources)).collect();
    assert!(msgs.is_empty(), "the full policy must check: {msgs:?}");
    let mut cut_errors = 0;
    for i in 0..text.len() {
        let Some(prefix) = text.get(..i) else {
            continue;
        };
        let c = compile("t.mailpolicy", &loader(prefix));
        if c.has_errors() {
            cut_errors += 1;
            assert!(c.program.is_none(), "a program despite errors at offset {i}");
        }
    }
    assert!(cut_errors > text.len() / 2, "only {cut_errors} prefixes failed");
}

/// Every policy of the repository is in the canonical layout, and laying it out otherwise
/// (other indentation, other spacing, line breaks joined) formats back to the same text.
#[test]
fn formatting_is_canonical() {
    use mailpolicy_lang::format::format;
    use mailpolicy_lang::syntax::{lex, Kind};
    let mut files = Vec::new();
    for dir in ["examples", "tests/check", "tests/check/includes", "tests/assurance", "tests/transcripts/policies"] {
        files.extend(policy_files(&root().join(dir)));
    }
    files.extend(policy_files(&root().join("stdlib/policy")));
    assert!(files.len() > 150, "{} policies", files.len());
    let mut failures = Vec::new();
    for (n, f) in files.iter().enumerate() {
        let text = std::fs::read_to_string(f).expect("read policy");
        match format(&text) {
            Ok(out) if out == text => {}
            Ok(_) => failures.push(format!("{}: not formatted", f.display())),
            Err(e) => failures.push(format!("{}: {e}", f.display())),
        }
        // The same tokens with other white space: a line break is joined unless a comment
        // or an open string needs it, or it makes a blank line; spaces vary.
        let toks = lex(&text);
        let mut mangled = String::new();
        for (i, t) in toks.iter().enumerate() {
            if i > 0 {
                let prev = toks[i - 1];
                let needs_break = matches!(prev.kind, Kind::Comment | Kind::Str(false)) || t.kind == Kind::Comment;
                if t.newlines_before > 1 {
                    mangled.push_str("\n\n");
                } else if t.newlines_before == 1 && needs_break {
                    mangled.push('\n');
                }
                // Characters outside the language keep their spacing.
                if prev.kind != Kind::Other && t.kind != Kind::Other {
                    mangled.push_str(&" ".repeat(1 + (i + n) % 3));
                } else if t.start > prev.end {
                    mangled.push(' ');
                }
            }
            mangled.push_str(t.text(&text));
        }
        match format(&mangled) {
            Ok(out) if out == text => {}
            Ok(out) => failures.push(format!("{}: laid out otherwise, formats to:\n{out}", f.display())),
            Err(e) => failures.push(format!("{}: {e}", f.display())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `std:` modules come from the binary when no stdlib directory is given (an installed
/// `mailc`), and the built-in copies are the files of `stdlib/policy/`, every one of them.
#[test]
fn std_modules_are_built_in() {
    let dir = root().join("stdlib/policy");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .expect("stdlib/policy")
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".mailpolicy")).map(str::to_string))
        .collect();
    on_disk.sort();
    let mut built_in: Vec<String> = mailpolicy_lang::STD_MODULES.iter().map(|(n, _)| n.to_string()).collect();
    built_in.sort();
    assert_eq!(on_disk, built_in, "every stdlib/policy module is in STD_MODULES");
    for (name, text) in mailpolicy_lang::STD_MODULES {
        let file = std::fs::read_to_string(dir.join(format!("{name}.mailpolicy"))).expect("module file");
        assert_eq!(&file, text, "std:{name}");
    }
    let case = root().join("tests/check/include_std_modules.mailpolicy");
    let c = compile(&case.display().to_string(), &FsLoader { std_dir: None });
    let errors: Vec<String> = c.diagnostics.iter().filter(|d| d.is_error()).map(|d| d.message.clone()).collect();
    assert!(errors.is_empty() && c.program.is_some(), "{errors:?}");
    let tmp = std::env::temp_dir().join(format!("std-missing-{}.mailpolicy", std::process::id()));
    std::fs::write(&tmp, "include \"std:nosuch\";\n").expect("temp policy");
    let c = compile(&tmp.display().to_string(), &FsLoader { std_dir: None });
    let _ = std::fs::remove_file(&tmp);
    assert!(
        c.diagnostics.iter().any(|d| d.is_error() && d.message.contains("std:nosuch")),
        "{:?}",
        c.diagnostics.iter().map(|d| d.message.clone()).collect::<Vec<_>>()
    );
}

/// The settings tables of spec/language.md (sections 5.1 and 5.2) and the option tables of
/// tables, scanners, milters and mailing lists (sections 4.4, 4.6, 4.9) against the one
/// definition of each option (`mailpolicy_lang::settings`, `mailpolicy_lang::resources`):
/// every option has exactly one row, no row names an option that does not exist, the value
/// column says the option's type, and the row says the option's default as the definition
/// has it.
#[test]
fn settings_tables_match_the_definitions() {
    use mailpolicy_lang::resources::{MAILING_LIST, SCANNER, SCANNER_MILTER, TABLE_COMMON, TABLE_LDAP, TABLE_SQL};
    use mailpolicy_lang::schema::{OptSpec, OptTy};
    use mailpolicy_lang::settings::{LISTENER, SERVER};
    let spec = std::fs::read_to_string(root().join("spec/language.md")).expect("spec/language.md");
    // A section's rows up to the next heading; a marker's rows: the first table after it.
    let section = |title: &str| -> Vec<(String, String, String)> {
        let start = spec.find(title).unwrap_or_else(|| panic!("spec/language.md has no `{title}`"));
        let rest = &spec[start + title.len()..];
        let end = if title.starts_with('#') {
            rest.find("\n#").unwrap_or(rest.len())
        } else {
            let table = rest.find("\n|").unwrap_or(rest.len());
            table + rest[table..].find("\n\n").unwrap_or(rest.len() - table)
        };
        rest[..end]
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| {
                // `|` inside a cell is written `\|`
                let cells: Vec<String> =
                    l.replace("\\|", "\u{1}").split('|').map(|c| c.trim().replace('\u{1}', "|")).collect();
                (cells[1].trim_matches('`').to_string(), cells[2].clone(), cells[3].clone())
            })
            .collect()
    };
    let ty_text = |ty: OptTy| -> String {
        match ty {
            OptTy::Str => "string".into(),
            OptTy::Num => "number".into(),
            OptTy::Size => "size".into(),
            OptTy::Duration => "duration".into(),
            OptTy::Bool => "`true` / `false`".into(),
            OptTy::Word(w) => w.iter().map(|w| format!("`{w}`")).collect::<Vec<_>>().join(" | "),
            OptTy::Strings => "list of strings".into(),
            OptTy::Secret => "secret name".into(),
            OptTy::Table => "table name".into(),
            OptTy::List => "list name".into(),
        }
    };
    let mut problems = Vec::new();
    for (title, specs) in [
        ("### 5.1 `server`", SERVER),
        ("### 5.2 `listener`", LISTENER),
        ("Options of every table:", TABLE_COMMON),
        ("Options of `ldap` tables", TABLE_LDAP),
        ("Options of `sql` tables", TABLE_SQL),
        ("A content scanner (R9, R24)", SCANNER),
        ("**Failure modes.**", SCANNER_MILTER),
        ("`mailc check` warns, `mailc::open-list`", MAILING_LIST),
    ] {
        let rows = section(title);
        for (name, ..) in &rows {
            let n = rows.iter().filter(|r| &r.0 == name).count();
            if n > 1 {
                problems.push(format!("{title}: `{name}` has {n} rows"));
            }
            if !specs.iter().any(|s| s.name == name) {
                problems.push(format!("{title}: `{name}` is not an option (settings.rs)"));
            }
        }
        for s in specs.iter() {
            let s: &OptSpec = s;
            let Some((_, ty, meaning)) = rows.iter().find(|r| r.0 == s.name) else {
                problems.push(format!("{title}: no row for `{}`", s.name));
                continue;
            };
            if *ty != ty_text(s.ty) {
                problems.push(format!(
                    "{title}: `{}` is written `{ty}`, the definition says `{}`",
                    s.name,
                    ty_text(s.ty)
                ));
            }
            if let Some(d) = s.default.text() {
                let row = meaning.replace('`', "").to_lowercase();
                let d = d.replace('`', "").to_lowercase();
                if !(row.contains(&format!("default {d}")) || row.contains(&format!("default: {d}"))) {
                    problems.push(format!("{title}: the row of `{}` does not say \"default {d}\": {meaning}", s.name));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "spec/language.md and lang/src/settings.rs or resources.rs disagree:\n{}",
        problems.join("\n")
    );
}
