//! `mailc table compile` and `mailc table query`: compiled file tables (spec/cli.md).
//!
//! `mailc table compile [--kind list|map|access] FILE...` writes `FILE.cdb` beside each
//! source, the indexed form `mailc serve` then uses instead of parsing the text (as
//! `postmap` does for Postfix). `mailc table query [--kind K] [--source] [--stats] FILE
//! [KEY...]` looks keys up the way the daemon does (the compiled table when it stands for
//! the source, the text otherwise; `--source` always the text), keys from standard input
//! when none are given. `mailc table query [--policy FILE] TABLE KEY...` asks a table of
//! the policy by its name, as the daemon asks it (LDAP and SQL tables too): when `--policy`
//! is given, or when `TABLE` is not a file.

use std::ffi::OsString;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Instant;

use mailpolicy_daemon::compiled::{self, Compiled};
use mailpolicy_engine::eval::{Answer, Request};
use mailpolicy_stdlib::tables::FileTable;

const USAGE: &str = "usage: mailc table compile [--kind list|map|access] FILE...\n       mailc table query [--kind KIND] [--source] [--stats] FILE [KEY...]   (keys on standard input when none are given)\n       mailc table query [--policy FILE] TABLE KEY...   (a table of the policy by its name)";

fn usage(msg: &str) -> u8 {
    eprintln!("mailc table: {msg}\n{USAGE}");
    2
}

pub fn main(args: Vec<OsString>) -> u8 {
    let mut parser = lexopt::Parser::from_args(args);
    let sub = match parser.next() {
        Ok(Some(lexopt::Arg::Value(v))) => v.to_string_lossy().into_owned(),
        _ => return usage("compile or query?"),
    };
    let mut kind = "map".to_string();
    let mut source_only = false;
    let mut stats = false;
    let mut values: Vec<String> = Vec::new();
    let mut policy: Option<PathBuf> = None;
    loop {
        match parser.next() {
            Ok(Some(lexopt::Arg::Long("policy"))) if sub == "query" => match parser.value() {
                Ok(v) => policy = Some(PathBuf::from(v)),
                Err(e) => return usage(&e.to_string()),
            },
            Ok(Some(lexopt::Arg::Long("kind"))) => match parser.value().ok().and_then(|v| v.into_string().ok()) {
                Some(k) => kind = k,
                None => return usage("--kind takes a table kind"),
            },
            Ok(Some(lexopt::Arg::Long("source"))) if sub == "query" => source_only = true,
            Ok(Some(lexopt::Arg::Long("stats"))) if sub == "query" => stats = true,
            Ok(Some(lexopt::Arg::Value(v))) => values.push(v.to_string_lossy().into_owned()),
            Ok(Some(other)) => return usage(&format!("unexpected argument {}", other.unexpected())),
            Ok(None) => break,
            Err(e) => return usage(&e.to_string()),
        }
    }
    if !matches!(kind.as_str(), "list" | "map" | "access" | "cidr" | "regexp" | "pcre") {
        return usage(&format!("`{kind}` is not a file table kind"));
    }
    let by_name = policy.is_some() || values.first().is_some_and(|f| !std::path::Path::new(f).exists());
    match sub.as_str() {
        "query" if by_name => policy_query(policy, &values),
        "compile" => compile(&kind, &values),
        "query" => query(&kind, source_only, stats, &values),
        other => usage(&format!("unknown subcommand {other:?}")),
    }
}

fn compile(kind: &str, files: &[String]) -> u8 {
    if files.is_empty() {
        return usage("which table files?");
    }
    let mut code = 0;
    for f in files {
        let src = PathBuf::from(f);
        match compiled::compile(kind, &src) {
            Ok(n) => println!("{}: {n} entries", compiled::path_of(&src).display()),
            Err(e) => {
                eprintln!("mailc table compile: {e}");
                code = 1;
            }
        }
    }
    code
}

fn query(kind: &str, source_only: bool, stats: bool, args: &[String]) -> u8 {
    let Some((file, keys)) = args.split_first() else { return usage("which table file?") };
    let src = PathBuf::from(file);
    let t0 = Instant::now();
    let compiled = if source_only { Compiled::Absent } else { compiled::load(kind, &src) };
    let (table, form) = match compiled {
        Compiled::Use(t) | Compiled::Alone(t) => (t, "compiled"),
        other => {
            if let Compiled::Stale(why) = other {
                eprintln!("mailc table query: the compiled table is not used, the source is read: {why}");
            }
            let text = match std::fs::read_to_string(&src) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("mailc table query: {}: {e}", src.display());
                    return 2;
                }
            };
            match FileTable::parse(kind, &text) {
                Ok(t) => (t, "source"),
                Err(e) => {
                    eprintln!("mailc table query: {}: {e}", src.display());
                    return 1;
                }
            }
        }
    };
    let loaded = t0.elapsed();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut found = false;
    let mut n = 0u64;
    let mut spent = std::time::Duration::ZERO;
    let mut one = |key: &str, out: &mut dyn Write| {
        let t = Instant::now();
        let v = table.lookup(key);
        spent += t.elapsed();
        n += 1;
        if let Some(v) = v {
            found = true;
            let _ = if keys.is_empty() { writeln!(out, "{key}\t{v}") } else { writeln!(out, "{v}") };
        }
    };
    if keys.is_empty() {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            one(line.trim_end_matches('\r'), &mut out);
        }
    } else {
        for k in keys {
            one(k, &mut out);
        }
    }
    let _ = out.flush();
    if stats {
        let each = if n > 0 { spent.as_nanos() as f64 / n as f64 } else { 0.0 };
        eprintln!(
            "mailc table query: {} ({form}, {} entries) loaded in {:.1} ms; {n} lookups in {:.1} ms, {each:.0} ns each",
            src.display(),
            table.len(),
            loaded.as_secs_f64() * 1000.0,
            spent.as_secs_f64() * 1000.0
        );
    }
    if found {
        0
    } else {
        1
    }
}

/// `mailc table query [--policy FILE] TABLE KEY...`: what the policy's table `TABLE` gives
/// each key, asked as the daemon asks it (file tables, LDAP, SQL), the policy found as
/// `mailc serve` finds it. Exit 0 every key found, 1 some not, 2 an error.
fn policy_query(policy: Option<PathBuf>, words: &[String]) -> u8 {
    let Some((table, keys)) = words.split_first().filter(|(_, k)| !k.is_empty()) else {
        return usage("name a table and at least one key");
    };
    let (prog, _, lookups, rt) = match crate::route::daemon_view("table", policy) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let Some(id) = prog.tables.iter().position(|t| t.name == *table) else {
        let names: Vec<&str> = prog.tables.iter().map(|t| t.name.as_str()).collect();
        eprintln!("mailc table: the policy has no table `{table}` (its tables: {})", names.join(", "));
        return 2;
    };
    let mut code = 0;
    for key in keys {
        let req = Request::Lookup { table: mailpolicy_lang::ir::TableId(id as u32), key: key.clone() };
        match rt.block_on(lookups.answer(&prog, &req, now_ms())) {
            Answer::Value(Some(v)) => println!("{v}"),
            Answer::Value(None) => code = code.max(1),
            other => {
                eprintln!("mailc table: {table} {key}: {other}");
                code = 2;
            }
        }
    }
    code
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
