//! `mailc explain TRANSCRIPT...`: replay transcripts and show, for each policy verdict,
//! the rule (file:line and its source) that decided it, each test's result and each
//! lookup's answer (B5).

use std::ffi::OsString;
use std::path::PathBuf;

use mailpolicy_engine::eval::Trace;
use mailpolicy_engine::transcript::{self, run::Runner};
use mailpolicy_lang::analysis::source_line;
use mailpolicy_lang::{compile, FsLoader};

pub fn main(args: Vec<OsString>) -> u8 {
    let mut paths: Vec<PathBuf> = Vec::new();
    let mut filter: Option<String> = None;
    let mut parser = lexopt::Parser::from_args(args);
    loop {
        match parser.next() {
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
        return usage("no transcript given");
    }
    let std_dir = crate::check::std_dir();
    let mut runner = Runner::new(std_dir.clone()).with_dkim(Some(mailpolicy_daemon::auth::transcript_dkim));
    let mut worst = 0u8;
    for path in &paths {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("mailc explain: {}: {e}", path.display());
                return 2;
            }
        };
        let file = match transcript::parse(path, &text) {
            Ok(f) => f,
            Err(errs) => {
                for e in errs {
                    println!("{}:{}: error: {}", path.display(), e.line, e.message);
                }
                worst = 1;
                continue;
            }
        };
        for case in &file.cases {
            if filter.as_ref().is_some_and(|f| !case.name.contains(f.as_str())) {
                continue;
            }
            let policy = case
                .items
                .iter()
                .find_map(|(_, i)| match i {
                    transcript::Item::Policy(p) => Some(p.clone()),
                    _ => None,
                })
                .or_else(|| file.policy.clone());
            // The same compilation the runner makes, for the rules' source lines.
            let compiled =
                policy.as_ref().map(|p| compile(&p.display().to_string(), &FsLoader { std_dir: std_dir.clone() }));
            let r = runner.run_case(&file, case);
            println!("case {}::{} ({})", path.display(), r.name, if r.passed() { "passed" } else { "FAILED" });
            if !r.passed() {
                worst = 1;
            }
            let Some(c) = compiled.as_ref() else { continue };
            let Some(prog) = c.program.as_ref() else {
                println!("  the policy does not compile");
                continue;
            };
            let rule = |loc| format!("{}  {}", prog.describe_loc(loc), source_line(prog, &c.sources, loc));
            for v in &r.verdicts {
                match v.rule {
                    Some(loc) => println!("  {}: {} by {}", v.stage.name(), v.outcome, rule(loc)),
                    None => println!(
                        "  {}: {} (no rule decided: the stage fell off its end{})",
                        v.stage.name(),
                        v.outcome,
                        if v.stage == mailpolicy_lang::ir::Stage::Rcpt {
                            ", the built-in relay rule applies"
                        } else {
                            ""
                        }
                    ),
                }
                for t in &v.trace {
                    match t {
                        Trace::Test { loc, result } => {
                            println!("      test   {} -> {result}", rule(*loc))
                        }
                        Trace::Lookup { request, answer } => {
                            println!("      lookup {} -> {answer}", request.describe(prog))
                        }
                        Trace::SenderAuth { check, answer } => println!("      lookup {} -> {answer}", check.name()),
                        Trace::Action { loc } => println!("      action {}", rule(*loc)),
                    }
                }
            }
            for f in &r.failures {
                println!("  failed: {f}");
            }
        }
    }
    worst
}

fn usage(msg: &str) -> u8 {
    eprintln!("mailc explain: {msg}\nusage: mailc explain [--filter TEXT] TRANSCRIPT...");
    2
}
