//! `mailc`: a thin command line over the `lang`, `stdlib`, `engine` and `daemon` crates.
//! The command line itself is defined once, in `cli.rs`.

mod batv;
mod check;
mod cli;
mod explain;
mod fmt;
mod hashpw;
mod lsp;
mod queue;
mod reload;
mod route;
mod sendmail;
mod serve;
mod table;
mod test;

use std::process::ExitCode;

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
    // Everything else is held to the one definition (`cli.rs`): --help, --version and
    // usage errors (exit 2) are answered there, before a command runs.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let matches = match cli::check(&argv) {
        Ok(m) => m,
        Err(code) => return ExitCode::from(code),
    };
    let Some((cmd, sub)) = matches.subcommand() else {
        return ExitCode::from(2);
    };
    let rest: Vec<std::ffi::OsString> = all.into_iter().skip(1).collect();
    let code = match cmd {
        "check" => check::main(rest),
        "test" => test::main(rest),
        "explain" => explain::main(rest),
        "fmt" => fmt::main(rest),
        "lsp" => lsp::main(rest),
        "queue" => queue::main(rest),
        "hash-password" => hashpw::main(rest),
        "batv-tag" => batv::main(rest),
        "serve" => serve::main(rest),
        "reload" => reload::main(rest),
        "sendmail" => sendmail::main(rest),
        "mailq" => sendmail::mailq(rest),
        "newaliases" => sendmail::newaliases(),
        "table" => table::main(rest),
        "route" => route::main(rest),
        "completions" => cli::completions(sub.get_one::<String>("SHELL").map(String::as_str).unwrap_or("")),
        "man" => cli::man(sub.get_one::<String>("DIR").map(std::path::Path::new)),
        other => {
            eprintln!("mailc: `{other}` is not available in this build");
            2
        }
    };
    ExitCode::from(code)
}
