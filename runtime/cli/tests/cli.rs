//! The command line's conventions through the binary (issue 14 item 5): `--help` on every
//! command and subcommand (found by walking the `Commands:` lists of the help itself),
//! `--version`, usage errors, shell completions that the shells parse, manual pages that
//! `man` renders, and `mailc route` showing where an address goes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const MAILC: &str = env!("CARGO_BIN_EXE_mailc");

fn run(args: &[&str]) -> Output {
    Command::new(MAILC).args(args).stdin(Stdio::null()).output().expect("run mailc")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("mailc-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The subcommands a help text lists under `Commands:` (clap's `help` left out).
fn listed_subcommands(help: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in help.lines() {
        if line.trim_end() == "Commands:" {
            inside = true;
            continue;
        }
        if inside {
            if line.trim().is_empty() || !line.starts_with("  ") {
                break;
            }
            if let Some(w) = line.split_whitespace().next().filter(|w| *w != "help") {
                out.push(w.to_string());
            }
        }
    }
    out
}

/// Every command path under `mailc`, depth first.
fn all_commands() -> Vec<Vec<String>> {
    let mut todo = vec![Vec::<String>::new()];
    let mut all = Vec::new();
    while let Some(path) = todo.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let o = run(&args);
        let help = text(&o.stdout);
        assert_eq!(o.status.code(), Some(0), "mailc {} --help: {}", path.join(" "), text(&o.stderr));
        for s in listed_subcommands(&help) {
            let mut p = path.clone();
            p.push(s);
            todo.push(p);
        }
        all.push(path);
    }
    all
}

#[test]
fn every_command_has_help_and_the_version_is_printed() {
    let all = all_commands();
    let names: Vec<String> = all.iter().map(|p| p.join(" ")).collect();
    for want in [
        "check",
        "test",
        "explain",
        "fmt",
        "lsp",
        "serve",
        "queue",
        "queue list",
        "queue show",
        "queue hold",
        "queue release",
        "queue delete",
        "queue requeue",
        "queue flush",
        "table",
        "table compile",
        "table query",
        "route",
        "hash-password",
        "batv-tag",
        "sendmail",
        "mailq",
        "newaliases",
        "completions",
        "man",
    ] {
        assert!(names.iter().any(|n| n == want), "`mailc {want}` is not listed: {names:?}");
    }
    for path in &all {
        let flags: &[&str] =
            if path.first().is_some_and(|c| c == "sendmail") { &["--help"] } else { &["--help", "-h"] };
        for flag in flags {
            let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
            args.push(flag);
            let o = run(&args);
            let out = text(&o.stdout);
            assert_eq!(o.status.code(), Some(0), "mailc {} {flag}", path.join(" "));
            assert!(out.contains(&format!("Usage: mailc {}", path.join(" ")).trim_end().to_string()), "{out}");
            assert!(out.lines().count() >= 3, "mailc {} {flag}: {out}", path.join(" "));
        }
        // `mailc help PATH` says the same.
        let mut args = vec!["help"];
        args.extend(path.iter().map(String::as_str));
        assert_eq!(run(&args).status.code(), Some(0), "mailc help {}", path.join(" "));
    }
    for v in ["--version", "-V"] {
        let o = run(&[v]);
        assert_eq!(o.status.code(), Some(0));
        assert_eq!(text(&o.stdout), format!("mailc {}\n", env!("CARGO_PKG_VERSION")));
    }
    // sendmail's own options are described in its help.
    let o = run(&["sendmail", "--help"]);
    assert!(text(&o.stdout).contains("-oi") && text(&o.stdout).contains("sysexits.h"), "{}", text(&o.stdout));
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &[][..],
        &["nosuch"][..],
        &["check", "--format", "xml", "x.mailpolicy"][..],
        &["check", "--nosuch"][..],
        &["queue"][..],
        &["queue", "list", "--nosuch"][..],
        &["queue", "show"][..],
        &["table"][..],
        &["route"][..],
        &["completions", "tcsh"][..],
        &["serve", "--policy"][..],
    ] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(2), "mailc {args:?}: {}", text(&o.stderr));
        assert!(!text(&o.stderr).is_empty(), "mailc {args:?} says why");
    }
    // A command's own checks keep their codes: a missing policy file is an I/O error (2),
    // a policy with errors is 1.
    let t = TempDir::new("codes");
    let bad = t.path().join("bad.mailpolicy");
    std::fs::write(&bad, "on rcpt { nonsense; }\n").expect("policy");
    assert_eq!(run(&["check", bad.to_str().unwrap_or("")]).status.code(), Some(1));
    assert_eq!(run(&["check", "/nonexistent/x.mailpolicy"]).status.code(), Some(2));
}

fn have(prog: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {prog}")]).output().is_ok_and(|o| o.status.success())
}

#[test]
fn completions_parse_in_their_shells() {
    let t = TempDir::new("completions");
    for (shell, check) in
        [("bash", vec!["bash", "-n"]), ("zsh", vec!["zsh", "-n"]), ("fish", vec!["fish", "--no-execute"])]
    {
        let o = run(&["completions", shell]);
        assert_eq!(o.status.code(), Some(0), "{shell}: {}", text(&o.stderr));
        let script = text(&o.stdout);
        for word in ["route", "queue", "flush", "completions", "policy"] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
        let file = t.path().join(format!("mailc.{shell}"));
        std::fs::write(&file, &script).expect("script");
        assert!(have(check[0]), "{} not found (Debian package {}); run tests/run.sh", check[0], check[0]);
        let st = Command::new(check[0]).args(&check[1..]).arg(&file).output().expect("run the shell");
        assert!(st.status.success(), "{shell} does not parse its completions: {}", text(&st.stderr));
    }
    // bash: the function completes subcommands when sourced.
    let probe = format!(
        "source {}; COMP_WORDS=(mailc qu); COMP_CWORD=1; COMP_LINE='mailc qu'; COMP_POINT=8; _mailc mailc qu mailc; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        t.path().join("mailc.bash").display()
    );
    let o = Command::new("bash").args(["-c", &probe]).output().expect("bash");
    assert!(text(&o.stdout).lines().any(|l| l == "queue"), "{} {}", text(&o.stdout), text(&o.stderr));
}

#[test]
fn man_pages_render() {
    let t = TempDir::new("man");
    let dir = t.path().join("man1");
    let o = run(&["man", dir.to_str().unwrap_or("")]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let mut pages: Vec<PathBuf> =
        std::fs::read_dir(&dir).expect("pages").filter_map(|e| e.ok()).map(|e| e.path()).collect();
    pages.sort();
    for want in ["mailc.1", "mailc-route.1", "mailc-queue-flush.1", "mailc-table-query.1", "mailc-sendmail.1"] {
        assert!(pages.iter().any(|p| p.ends_with(want)), "{want} missing: {pages:?}");
    }
    assert!(have("man"), "man not found (Debian package man-db); run tests/run.sh");
    for p in &pages {
        let o = Command::new("man")
            .arg("-l")
            .arg(p)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .env("MAN_KEEP_FORMATTING", "")
            .output()
            .expect("man -l");
        let out = text(&o.stdout);
        assert!(o.status.success(), "man -l {}: {}", p.display(), text(&o.stderr));
        assert!(out.contains("NAME") && out.contains("SYNOPSIS"), "{}: {out}", p.display());
        let name = p.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        assert!(out.contains(name), "{}: {out}", p.display());
        assert!(!text(&o.stderr).contains("warning"), "{}: {}", p.display(), text(&o.stderr));
    }
    // Without DIR: the main page on standard output.
    let o = run(&["man"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(text(&o.stdout).starts_with(".ie") || text(&o.stdout).contains(".TH mailc"), "{}", text(&o.stdout));
}

/// `mailc route` for an alias, a virtual rewrite, a smarthost and a local Maildir.
#[test]
fn route_shows_rewriting_expansion_and_the_next_hop() {
    let t = TempDir::new("route");
    std::fs::write(
        t.path().join("aliases"),
        "staff bob@d.test, carol@far.test\nloop loop2@d.test\nloop2 loop@d.test\n",
    )
    .expect("aliases");
    std::fs::write(t.path().join("virtual"), "info@v.test alice@d.test\n").expect("virtual");
    let policy = t.path().join("p.mailpolicy");
    let text_policy = r#"list local = domains ["d.test"];
list virtual_domains = domains ["v.test"];
table aliases = map "aliases";
table virtual = map "virtual";

server {
  hostname "mx.test";
  maildir "mail";
  local_domains local;
}

route {
  if recipient.domain in virtual_domains {
    rewrite recipient virtual;
  }
  if recipient.domain in local {
    expand aliases;
    deliver maildir;
  }
  if recipient.domain :is "gone.test" {
    reject 550 5.1.2 "Domain gone";
  }
  deliver smtp "[smarthost.test]:587" :tls required;
}
"#;
    std::fs::write(&policy, text_policy).expect("policy");
    let route = |addr: &str| {
        let o = run(&["route", "--policy", policy.to_str().unwrap_or(""), addr]);
        (o.status.code(), text(&o.stdout), text(&o.stderr))
    };
    let line_of = |s: &str| text_policy.lines().position(|l| l.contains(s)).map(|i| i + 1).expect("line");
    let at = |s: &str| format!("{}:{}", policy.display(), line_of(s));
    let mail = t.path().join("mail");

    // A local user: Maildir under the server's maildir.
    let (code, out, err) = route("bob@d.test");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out,
        format!(
            "bob@d.test\n  transport: maildir (by {})\n  next hop: the Maildir {}/bob\n",
            at("deliver maildir"),
            mail.display()
        ),
        "{err}"
    );

    // A virtual rewrite, routed anew.
    let (code, out, err) = route("info@v.test");
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("info@v.test\n  rewritten: info@v.test -> alice@d.test\n"), "{out}");
    assert!(out.contains(&format!("  next hop: the Maildir {}/alice\n", mail.display())), "{out}");

    // An alias: expanded, each member routed (the far one by the smarthost).
    let (code, out, err) = route("staff@d.test");
    assert_eq!(code, Some(0), "{err}");
    let want = format!(
        "staff@d.test\n  expanded into 2: bob@d.test, carol@far.test\n  bob@d.test\n    transport: maildir (by {})\n    next hop: the Maildir {}/bob\n  carol@far.test\n    transport: smtp [smarthost.test]:587 tls required (by {})\n    next hop: [smarthost.test]:587\n",
        at("deliver maildir"),
        mail.display(),
        at("deliver smtp")
    );
    assert_eq!(out, want, "{err}");

    // A smarthost route.
    let (code, out, _) = route("x@example.org");
    assert_eq!(code, Some(0));
    assert!(
        out.contains("transport: smtp [smarthost.test]:587 tls required")
            && out.contains("next hop: [smarthost.test]:587"),
        "{out}"
    );

    // A bounce and an alias loop: exit 1, saying so.
    let (code, out, _) = route("z@gone.test");
    assert_eq!(code, Some(1));
    assert!(out.contains(&format!("bounces (by {}): 550 5.1.2 Domain gone", at("reject 550"))), "{out}");
    let (code, out, _) = route("loop@d.test");
    assert_eq!(code, Some(1));
    assert!(out.contains("loop: loop@d.test expands to itself"), "{out}");
}
