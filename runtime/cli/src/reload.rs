//! `mailc reload [--policy FILE] [--spool DIR]`: ask the running daemon, through its control
//! socket (`daemon/control.rs`), to recompile its policy now and swap it in, as SIGHUP
//! does, and say how it went: a policy with errors (the open-relay proof included) is
//! refused with its diagnostics and the running one stays.

use std::ffi::OsString;
use std::path::PathBuf;

use mailpolicy_daemon::control;

const USAGE: &str = "usage: mailc reload [--policy FILE] [--spool DIR]
Exit codes: 0 reloaded, 1 the new policy was refused (the old one runs on), 2 no daemon or an I/O error.";

pub fn main(args: Vec<OsString>) -> u8 {
    let mut parser = lexopt::Parser::from_args(args);
    let (mut policy, mut spool) = (None, None);
    loop {
        match parser.next() {
            Ok(Some(lexopt::Arg::Long("policy"))) => match parser.value() {
                Ok(v) => policy = Some(PathBuf::from(v)),
                Err(e) => return usage(&e.to_string()),
            },
            Ok(Some(lexopt::Arg::Long("spool"))) => match parser.value() {
                Ok(v) => spool = Some(PathBuf::from(v)),
                Err(e) => return usage(&e.to_string()),
            },
            Ok(Some(lexopt::Arg::Long("help") | lexopt::Arg::Short('h'))) => {
                println!("{USAGE}");
                return 0;
            }
            Ok(Some(other)) => return usage(&format!("unexpected argument {}", other.unexpected())),
            Ok(None) => break,
            Err(e) => return usage(&e.to_string()),
        }
    }
    let spool = match spool.or_else(|| std::env::var_os("MAILPOLICY_SPOOL").map(PathBuf::from)) {
        Some(s) => s,
        None => match crate::sendmail::spool_of(policy) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("mailc reload: {e}");
                return 2;
            }
        },
    };
    match control::request(&spool, &control::Op::Reload, std::time::Duration::from_secs(300)) {
        control::Reached::Answered(a) if a.ok => {
            println!("mailc reload: {}", a.text);
            0
        }
        control::Reached::Answered(a) => {
            eprintln!("mailc reload: {}", a.text);
            a.code.max(1)
        }
        control::Reached::NoDaemon(why) => {
            eprintln!(
                "mailc reload: no daemon answers on the control socket ({why}); the policy is read when it starts"
            );
            2
        }
    }
}

fn usage(msg: &str) -> u8 {
    eprintln!("mailc reload: {msg}\n{USAGE}");
    2
}
