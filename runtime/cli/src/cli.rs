//! The command line's one definition (clap's builder): `--help` on every command and
//! subcommand, `--version`, `mailc completions SHELL` and `mailc man [DIR]` are all made
//! from it, and [`check`] holds every invocation to it before a command runs, so what the
//! help, the completions and the manual pages say is what the commands accept.
//!
//! Each command module then reads its own arguments (the lexopt loops they had): clap is
//! the gate and the documentation, the modules keep their exit codes and messages. An
//! option added to a module must be added here too, or clap refuses it (exit 2);
//! `tests/cli.rs` walks this tree. `sendmail` is the exception: its options are
//! sendmail's (`-oi`, `-bs`, `-f<>`), which clap cannot parse, so they are described in
//! its help and passed through untouched; argv0 `sendmail`, `mailq` and `newaliases` never
//! come here.

use clap::{Arg, ArgAction, Command};
use std::ffi::OsString;

fn flag(name: &'static str, help: &'static str) -> Arg {
    Arg::new(name).long(name).action(ArgAction::SetTrue).help(help)
}

fn opt(name: &'static str, value: &'static str, help: &'static str) -> Arg {
    Arg::new(name).long(name).value_name(value).action(ArgAction::Set).help(help)
}

fn files(name: &'static str, help: &'static str) -> Arg {
    Arg::new(name).value_name(name).num_args(0..).action(ArgAction::Append).help(help)
}

fn spool() -> Arg {
    opt("spool", "DIR", "the spool directory").global(true).value_hint(clap::ValueHint::DirPath)
}

fn policy() -> Arg {
    opt(
        "policy",
        "FILE",
        "the policy (default: $MAILPOLICY_POLICY, /etc/mailpolicy/main.mailpolicy, else the embedded default)",
    )
    .value_hint(clap::ValueHint::FilePath)
}

fn id() -> Arg {
    Arg::new("ID").required(true).help("a queue id (as `mailc queue list` shows it, with or without its mark)")
}

const SENDMAIL_HELP: &str = "\
Local submission, as /usr/sbin/sendmail: the message on standard input, the recipients as
arguments. Options (sendmail's own syntax):
  -t              also send to the To:, Cc: and Bcc: addresses (Bcc: is removed)
  -i, -oi         a line with a single dot does not end the message
  -f ADDR, -r ADDR  the envelope sender (-f '<>' the null sender)
  -F NAME         the full name of the From: field the message lacks
  -C FILE         the policy
  -bm             deliver mail (the default)    -bs  an SMTP session on standard input and output
  -bp             list the queue (mailq)        -bi  newaliases
  -q              make deferred mail due now
  -oX, -OX, -v, -N DSN, -R RET, -V ENVID, -B TYPE, -L LABEL, -X FILE, -h N, -G, -U, -n
                  accepted and ignored
Exit codes (sysexits.h): 0 submitted, 64 usage, 65 bad message, 67 bad address,
73 the maildrop cannot be written, 75 temporary failure, 78 policy errors.";

/// The whole command line.
pub fn command() -> Command {
    Command::new("mailc")
        .version(env!("CARGO_PKG_VERSION"))
        .about("compile, test and run mailpolicy files")
        .long_about(
            "mailc compiles and lints mail policies (check, fmt, lsp), runs them against SMTP transcripts \
             (test, explain), runs the mail server (serve) and administers it (queue, table, route). \
             Installed as sendmail, mailq or newaliases it behaves as those commands.",
        )
        .after_help("Exit codes: 0 success, 1 errors found, 2 usage or I/O error (sendmail: sysexits.h).")
        .subcommand_required(true)
        .arg_required_else_help(true)
        .subcommand(
            Command::new("check")
                .about("compile policies and prove them (open relay, backscatter, dead rules)")
                .arg(
                    opt("format", "FORMAT", "diagnostics as human text on standard error, or JSON lines on standard output")
                        .value_parser(["human", "json"]),
                )
                .arg(flag("deny-warnings", "treat warnings as errors"))
                .arg(
                    opt("emit-counterexample", "DIR", "write a transcript of each open relay found to DIR")
                        .value_hint(clap::ValueHint::DirPath),
                )
                .arg(files("FILE", "policy files").value_hint(clap::ValueHint::FilePath)),
        )
        .subcommand(
            Command::new("test")
                .about("run transcript tests")
                .arg(Arg::new("verbose").short('v').long("verbose").action(ArgAction::SetTrue).help("print each case's verdicts and lookups"))
                .arg(opt("filter", "TEXT", "run only the cases whose name contains TEXT"))
                .arg(files("PATH", "transcript files, or folders searched for *.transcript").value_hint(clap::ValueHint::AnyPath)),
        )
        .subcommand(
            Command::new("explain")
                .about("replay transcripts and show which rule decided each verdict, and why")
                .arg(opt("filter", "TEXT", "only the cases whose name contains TEXT"))
                .arg(files("TRANSCRIPT", "transcript files").value_hint(clap::ValueHint::FilePath)),
        )
        .subcommand(
            Command::new("fmt")
                .about("lay policies out in the canonical layout")
                .arg(flag("check", "write nothing; exit 1 when a file is not in the layout"))
                .arg(files("PATH", "files, folders (searched for *.mailpolicy), or - for standard input").value_hint(clap::ValueHint::AnyPath)),
        )
        .subcommand(
            Command::new("lsp")
                .about("a language server (LSP) on standard input and output")
                .arg(flag("stdio", "the transport (the only one; accepted because editors pass it)")),
        )
        .subcommand(
            Command::new("serve")
                .about("run the mail server")
                .arg(policy())
                .arg(opt("spool", "DIR", "overrides the policy's spool directory").value_hint(clap::ValueHint::DirPath))
                .arg(opt("user", "NAME", "run as this user after binding the listeners (overrides the policy's server user)")),
        )
        .subcommand(
            Command::new("reload")
                .about("make the running daemon recompile its policy now (through its control socket)")
                .arg(policy())
                .arg(opt("spool", "DIR", "the spool directory (its control socket)").value_hint(clap::ValueHint::DirPath)),
        )
        .subcommand(
            Command::new("queue")
                .about("list and administer the queue (as postqueue and postsuper)")
                .subcommand_required(true)
                .arg_required_else_help(true)
                .arg(spool())
                .subcommand(Command::new("list").about("the queue, as postqueue -p").arg(flag("json", "one JSON array, one object per message")))
                .subcommand(Command::new("show").about("a message: envelope, states and text").arg(id()))
                .subcommand(Command::new("hold").about("put a message on hold").arg(id()))
                .subcommand(Command::new("release").about("release a message from hold").arg(id()))
                .subcommand(Command::new("delete").about("delete a message").arg(id()))
                .subcommand(Command::new("requeue").about("route a message again and retry it now").arg(id()))
                .subcommand(
                    Command::new("flush")
                        .about("retry deferred mail now, all of it or for one recipient domain")
                        .arg(Arg::new("DOMAIN").help("only recipients in this domain")),
                ),
        )
        .subcommand(
            Command::new("table")
                .about("compile file tables, and ask tables as the daemon does (postmap)")
                .subcommand_required(true)
                .arg_required_else_help(true)
                .subcommand(
                    Command::new("compile")
                        .about("write FILE.cdb, the indexed form of each table file")
                        .arg(
                            // cidr, regexp and pcre are named so the command can say why they
                            // do not compile (exit 1), as it always has.
                            opt("kind", "KIND", "the table kind (list, map or access; default map)")
                                .value_parser(["list", "map", "access", "cidr", "regexp", "pcre"]),
                        )
                        .arg(files("FILE", "table files").value_hint(clap::ValueHint::FilePath)),
                )
                .subcommand(
                    Command::new("query")
                        .about("look keys up in a table file, or in a table of the policy by its name (postmap -q)")
                        .long_about(
                            "mailc table query [--kind KIND] [--source] [--stats] FILE [KEY...]: a table file (keys on \
                             standard input when none are given).\n\
                             mailc table query [--policy FILE] TABLE KEY...: a table of the policy by its name, \
                             asked as the daemon asks it (LDAP and SQL too).",
                        )
                        .arg(opt("kind", "KIND", "the kind of the table file").value_parser(["list", "map", "access", "cidr", "regexp", "pcre"]))
                        .arg(flag("source", "read the text even when FILE.cdb stands for it"))
                        .arg(flag("stats", "write the load time and the time per lookup to standard error"))
                        .arg(policy())
                        .arg(files("ARGS", "FILE [KEY...], or TABLE KEY... with --policy")),
                ),
        )
        .subcommand(
            Command::new("route")
                .about("show where an address goes: rewriting, expansion and routing, as the queue manager does (exim -bt)")
                .arg(policy())
                .arg(opt("from", "ADDR", "the envelope sender the route stage sees (default: the null sender)"))
                .arg(Arg::new("ADDRESS").required(true).num_args(1..).help("recipient addresses")),
        )
        .subcommand(
            Command::new("hash-password")
                .about("print a SCRAM-SHA-256 verifier for the password on standard input")
                .arg(opt("iterations", "N", "PBKDF2 iterations (at least 4096)")),
        )
        .subcommand(
            Command::new("batv-tag")
                .about("sign an address with BATV, as the daemon signs an envelope sender")
                .arg(opt("keys", "FILE", "the batv_keys secret's contents (default: standard input)").value_hint(clap::ValueHint::FilePath))
                .arg(opt("key", "N", "the key number to sign with (default: the highest)"))
                .arg(opt("date", "YYYY-MM-DD", "the day of signing (default: today, UTC)"))
                .arg(opt("lifetime", "DAYS", "the server's batv_lifetime in days (default 7)"))
                .arg(Arg::new("ADDRESS").required(true)),
        )
        .subcommand(
            Command::new("sendmail")
                .about("submit a message locally (also as /usr/sbin/sendmail)")
                .long_about(SENDMAIL_HELP)
                // `-h N` is sendmail's hop count: only `--help` is help here.
                .disable_help_flag(true)
                .arg(Arg::new("help").long("help").action(ArgAction::Help).help("print this help"))
                .arg(
                    Arg::new("ARGS")
                        .num_args(0..)
                        .allow_hyphen_values(true)
                        .trailing_var_arg(true)
                        .help("sendmail options and recipients"),
                ),
        )
        .subcommand(
            Command::new("mailq")
                .about("list the queue (also as mailq)")
                .arg(opt("spool", "DIR", "the spool directory").value_hint(clap::ValueHint::DirPath))
                .arg(flag("json", "one JSON array, one object per message")),
        )
        .subcommand(Command::new("newaliases").about("nothing to rebuild: alias tables are read when they change (also as newaliases)"))
        .subcommand(
            Command::new("completions")
                .about("print a shell completion script")
                .arg(Arg::new("SHELL").required(true).value_parser(["bash", "zsh", "fish"])),
        )
        .subcommand(
            Command::new("man")
                .about("write the manual pages (mailc.1, mailc-check.1, ...) to DIR, or mailc.1 to standard output")
                .arg(Arg::new("DIR").value_hint(clap::ValueHint::DirPath)),
        )
}

/// Hold `args` (the whole argv, program name first) to the definition. `Err(code)`: the
/// help or the version was printed (0), or a usage error (2).
pub fn check(args: &[OsString]) -> Result<clap::ArgMatches, u8> {
    match command().try_get_matches_from(args) {
        Ok(m) => Ok(m),
        Err(e) => {
            let _ = e.print();
            Err(match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => 2,
            })
        }
    }
}

/// `mailc completions SHELL`.
pub fn completions(shell: &str) -> u8 {
    use clap_complete::Shell;
    let sh = match shell {
        "bash" => Shell::Bash,
        "zsh" => Shell::Zsh,
        "fish" => Shell::Fish,
        _ => return 2,
    };
    let mut cmd = command();
    let mut script = Vec::new();
    clap_complete::generate(sh, &mut cmd, "mailc", &mut script);
    write_out(&script)
}

/// Standard output, a reader that stops early (`| head`) included: exit 0 quietly.
fn write_out(bytes: &[u8]) -> u8 {
    use std::io::Write;
    match std::io::stdout().lock().write_all(bytes) {
        Ok(()) => 0,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            eprintln!("mailc: {e}");
            2
        }
    }
}

/// `mailc man [DIR]`.
pub fn man(dir: Option<&std::path::Path>) -> u8 {
    let r = match dir {
        Some(d) => std::fs::create_dir_all(d).and_then(|_| clap_mangen::generate_to(command(), d)),
        None => {
            let mut cmd = command().disable_help_subcommand(true);
            cmd.build();
            let mut page = Vec::new();
            match clap_mangen::Man::new(cmd).render(&mut page) {
                Ok(()) => return write_out(&page),
                Err(e) => Err(e),
            }
        }
    };
    match r {
        Ok(()) => {
            if let Some(d) = dir {
                println!("mailc man: pages written to {}", d.display());
            }
            0
        }
        Err(e) => {
            eprintln!("mailc man: {e}");
            2
        }
    }
}
