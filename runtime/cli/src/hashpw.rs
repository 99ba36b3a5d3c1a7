//! `mailc hash-password [--iterations N]`: read a password from standard input and print
//! the SCRAM-SHA-256 verifier to put in a listener's credentials table
//! (`alice SCRAM-SHA-256$4096:...`). PLAIN, LOGIN and SCRAM-SHA-256 all check against it.

use std::ffi::OsString;
use std::io::BufRead;

use mailpolicy_daemon::sasl::Verifier;

pub fn main(args: Vec<OsString>) -> u8 {
    let mut iterations = 4096u32;
    let mut parser = lexopt::Parser::from_args(args);
    loop {
        match parser.next() {
            Ok(Some(lexopt::Arg::Long("iterations"))) => {
                match parser.value().ok().and_then(|v| v.into_string().ok()).and_then(|v| v.parse().ok()) {
                    Some(n) if n >= 4096 => iterations = n,
                    _ => return usage("--iterations takes a number of at least 4096 (RFC 7677)"),
                }
            }
            Ok(Some(other)) => return usage(&format!("unexpected argument {}", other.unexpected())),
            Ok(None) => break,
            Err(e) => return usage(&e.to_string()),
        }
    }
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line).is_err() {
        return usage("cannot read the password from standard input");
    }
    let pw = line.trim_end_matches(['\r', '\n']);
    if pw.is_empty() {
        return usage("empty password");
    }
    println!("{}", Verifier::hash(pw, iterations));
    0
}

fn usage(msg: &str) -> u8 {
    eprintln!("mailc hash-password: {msg}\nusage: echo PASSWORD | mailc hash-password [--iterations N]");
    2
}
