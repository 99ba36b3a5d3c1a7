//! `mailc table query [--policy FILE] TABLE KEY...`: what a table of the policy gives a key,
//! asked as the daemon asks it (file tables, LDAP, SQL), like Postfix's `postmap -q`.

use std::ffi::OsString;
use std::path::PathBuf;

use mailpolicy_daemon::{self as daemon, lookup::Lookups, ServeOptions};
use mailpolicy_engine::eval::{Answer, Request};

const USAGE: &str = "\
Usage: mailc table query [--policy FILE] TABLE KEY...
  Prints, for each KEY, the value TABLE gives it (one line per key); a key the table does
  not hold prints nothing. The policy is found as `mailc serve` finds it.
Exit codes: 0 every key found, 1 some key not found, 2 usage error, an unknown table or a
failed lookup.";

pub fn main(args: Vec<OsString>) -> u8 {
    let mut it = args.into_iter();
    if it.next().as_deref() != Some(std::ffi::OsStr::new("query")) {
        eprintln!("{USAGE}");
        return 2;
    }
    let mut policy: Option<PathBuf> = None;
    let mut words: Vec<String> = Vec::new();
    let mut p = lexopt::Parser::from_args(it);
    loop {
        match p.next() {
            Ok(Some(lexopt::Arg::Long("policy"))) => match p.value() {
                Ok(v) => policy = Some(PathBuf::from(v)),
                Err(e) => return usage(&e.to_string()),
            },
            Ok(Some(lexopt::Arg::Long("help") | lexopt::Arg::Short('h'))) => {
                println!("{USAGE}");
                return 0;
            }
            Ok(Some(lexopt::Arg::Value(v))) => match v.into_string() {
                Ok(s) => words.push(s),
                Err(_) => return usage("a key is not UTF-8"),
            },
            Ok(Some(other)) => return usage(&format!("unexpected argument {}", other.unexpected())),
            Ok(None) => break,
            Err(e) => return usage(&e.to_string()),
        }
    }
    let Some((table, keys)) = words.split_first().filter(|(_, k)| !k.is_empty()) else {
        return usage("name a table and at least one key");
    };
    let opts =
        ServeOptions { policy: crate::sendmail::policy_path(policy), spool: None, std_dir: crate::check::std_dir() };
    let (prog, dir, _) = match daemon::load_policy(&opts) {
        Ok(x) => x,
        Err(c) => {
            for d in c.diagnostics.iter().filter(|d| d.is_error()) {
                eprintln!("{}", d.render_short(&c.sources));
            }
            eprintln!("mailc table: the policy has errors");
            return 2;
        }
    };
    let Some(id) = prog.tables.iter().position(|t| t.name == *table) else {
        let names: Vec<&str> = prog.tables.iter().map(|t| t.name.as_str()).collect();
        eprintln!("mailc table: the policy has no table `{table}` (its tables: {})", names.join(", "));
        return 2;
    };
    let lookups = match Lookups::new(&prog, &dir) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("mailc table: {e}");
            return 2;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mailc table: {e}");
            return 2;
        }
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

fn usage(msg: &str) -> u8 {
    eprintln!("mailc table: {msg}\n\n{USAGE}");
    2
}
