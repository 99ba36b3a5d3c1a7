//! `mailc`: a thin command line over the `lang`, `stdlib` and `runtime` crates.

mod check;
mod explain;
mod fmt;
mod hashpw;
mod lsp;
mod queue;
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
  mailc serve [--policy FILE] [--spool DIR]
  mailc hash-password [--iterations N]     (password on standard input)
  mailc table compile [--kind list|map|access] FILE...   (writes FILE.cdb)
  mailc table query [--kind KIND] [--source] [--stats] FILE [KEY...]
  mailc queue list|show ID|hold ID|release ID|delete ID|requeue ID|flush [DOMAIN] [--spool DIR]
  mailc help

Exit codes: 0 success, 1 errors found, 2 usage or I/O error.";

fn main() -> ExitCode {
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
        Some("serve") => serve::main(rest),
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
