//! `mailc`: a thin command line over the `lang`, `stdlib`, `engine` and `daemon` crates.

mod batv;
mod check;
mod explain;
mod fmt;
mod hashpw;
mod lsp;
mod queue;
mod reload;
mod sendmail;
mod serve;
mod table;
mod test;

use std::process::ExitCode;

const USAGE: &str = "\
mailc: compile, test and run mailpolicy files

Usage:
  mailc check [--format human|json] [--deny-warnings] [--emit-counterexample DIR] FILE...
  mailc test [--verbose] [--filter TEXT] PATH...
  mailc explain [--filter TEXT] TRANSCRIPT...
  mailc fmt [--check] PATH...
  mailc lsp                                (a language server on standard input and output)
  mailc serve [--policy FILE] [--spool DIR] [--user NAME]
  mailc reload [--policy FILE] [--spool DIR]   (the running daemon recompiles its policy now)
  mailc hash-password [--iterations N]     (password on standard input)
  mailc batv-tag [--keys FILE] [--key N] [--date YYYY-MM-DD] [--lifetime DAYS] ADDRESS
  mailc table compile [--kind list|map|access] FILE...   (writes FILE.cdb)
  mailc table query [--kind KIND] [--source] [--stats] FILE [KEY...]   (a table file, as postmap -q)
  mailc table query [--policy FILE] TABLE KEY...   (a table of the policy, LDAP and SQL too)
  mailc queue list [--json]|show ID|hold ID|release ID|delete ID|requeue ID|flush [DOMAIN] [--spool DIR]
  mailc sendmail [-t] [-i] [-f ADDR] [-F NAME] [RECIPIENT...]   (local submission; also as sendmail)
  mailc mailq [--spool DIR]                 (the queue; also as mailq)
  mailc newaliases                          (also as newaliases)
  mailc help

Exit codes: 0 success, 1 errors found, 2 usage or I/O error.";

fn main() -> ExitCode {
    // Installed under the names other mail software calls (sendmail, mailq, newaliases).
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let called = std::path::Path::new(&argv0).file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
    let all: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    match called.as_str() {
        "sendmail" => return ExitCode::from(sendmail::main(all)),
        "mailq" => return ExitCode::from(sendmail::mailq(all)),
        "newaliases" => return ExitCode::from(sendmail::newaliases()),
        _ => {}
    }
    let mut args = std::env::args_os().skip(1);
    let Some(cmd) = args.next() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest: Vec<std::ffi::OsString> = args.collect();
    let code = match cmd.to_str() {
        Some("check") => check::main(rest),
        Some("test") => test::main(rest),
        Some("explain") => explain::main(rest),
        Some("fmt") => fmt::main(rest),
        Some("lsp") => lsp::main(rest),
        Some("queue") => queue::main(rest),
        Some("hash-password") => hashpw::main(rest),
        Some("batv-tag") => batv::main(rest),
        Some("serve") => serve::main(rest),
        Some("reload") => reload::main(rest),
        Some("sendmail") => sendmail::main(rest),
        Some("mailq") => sendmail::mailq(rest),
        Some("newaliases") => sendmail::newaliases(),
        Some("table") => table::main(rest),
        Some("help" | "--help" | "-h") => {
            println!("{USAGE}");
            0
        }
        Some("--version" | "-V") => {
            println!("mailc {}", env!("CARGO_PKG_VERSION"));
            0
        }
        _ => {
            eprintln!("mailc: unknown command {:?}\n\n{USAGE}", cmd);
            2
        }
    };
    ExitCode::from(code)
}
