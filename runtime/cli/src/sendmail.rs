//! `mailc sendmail` (also run as `sendmail`), `mailc mailq` (also `mailq`) and `newaliases`:
//! local submission as cron, PHP's `mail()`, git send-email and mutt expect it from
//! `/usr/sbin/sendmail` (spec/cli.md).
//!
//! The message goes to the spool's maildrop (`spool/maildrop.rs`), whether or not the daemon
//! runs; the daemon's pickup takes it through the policy as a session of the `local`
//! listener, authenticated as the submitting user. Exit codes are sysexits.h's.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::PathBuf;

use mailpolicy_daemon::spool::maildrop::{self, Submission};
use mailpolicy_daemon::{self as daemon, ServeOptions};

pub const EX_OK: u8 = 0;
pub const EX_USAGE: u8 = 64;
pub const EX_DATAERR: u8 = 65;
pub const EX_NOUSER: u8 = 67;
pub const EX_SOFTWARE: u8 = 70;
pub const EX_CANTCREAT: u8 = 73;
pub const EX_TEMPFAIL: u8 = 75;
pub const EX_CONFIG: u8 = 78;

const USAGE: &str = "\
Usage: mailc sendmail [options] [RECIPIENT...]     (also installed as sendmail)
  -t          take recipients from the To:, Cc: and Bcc: fields too (Bcc: is removed)
  -i, -oi     a line with a single dot does not end the message
  -f ADDR     envelope sender (-f '<>' for the null sender); default USER@HOSTNAME
  -r ADDR     the same as -f
  -F NAME     the sender's full name for a From: field the message lacks
  -C FILE     the policy (default: $MAILPOLICY_POLICY, /etc/mailpolicy/main.mailpolicy,
              else the embedded default); the spool is the policy's (or $MAILPOLICY_SPOOL)
  -bm         read a message from standard input and submit it (the default)
  -bs         an SMTP session on standard input and output
  -bp         list the queue (as mailq)
  -bi         newaliases (aliases are tables in the policy: nothing to rebuild)
  -q          make deferred mail due now (as mailc queue flush)
  Accepted and ignored: -oX (other -o options), -OX, -v, -N DSN, -R RET, -V ENVID,
  -B TYPE, -L LABEL, -X FILE, -h N, -G, -U, -n.
Exit codes (sysexits.h): 0 submitted, 64 usage, 65 bad message, 67 bad address,
73 cannot write the maildrop, 75 temporary failure, 78 policy error.";

/// The policy and spool that local submission and `mailq` use, as `mailc serve` finds them.
pub fn policy_path(explicit: Option<PathBuf>) -> Option<PathBuf> {
    explicit.or_else(|| std::env::var_os("MAILPOLICY_POLICY").map(PathBuf::from)).or_else(|| {
        let etc = PathBuf::from("/etc/mailpolicy/main.mailpolicy");
        etc.is_file().then_some(etc)
    })
}

/// The spool of the policy (as `mailc serve` finds both), or $MAILPOLICY_SPOOL.
pub fn spool_of(policy: Option<PathBuf>) -> Result<PathBuf, String> {
    site(policy).map(|(spool, _, _)| spool)
}

/// `(spool directory, hostname, max message size)` of the policy.
fn site(policy: Option<PathBuf>) -> Result<(PathBuf, String, u64), String> {
    let opts = ServeOptions { policy: policy_path(policy), spool: None, std_dir: crate::check::std_dir() };
    let (prog, dir) = daemon::compile_policy(&opts).map_err(|c| {
        let first = c.diagnostics.iter().find(|d| d.is_error()).map(|d| d.render_short(&c.sources));
        format!("the policy has errors: {}", first.unwrap_or_default())
    })?;
    let over = std::env::var_os("MAILPOLICY_SPOOL").map(PathBuf::from);
    let spool = daemon::spool_dir(&prog, &dir, over.as_deref());
    let hostname = mailpolicy_engine::config::hostname(&prog, None, &daemon::machine_hostname());
    let max = mailpolicy_engine::config::engine_config(&prog, None, &hostname, false).max_message_size;
    Ok((spool, hostname, max))
}

/// `sendmail -bs`: an SMTP session on standard input and output (as mutt or a script may
/// use it). Each accepted message goes to the maildrop like any other local submission, so
/// the policy decides at pickup, as Postfix's `sendmail -bs` hands mail to its queue.
fn smtp_on_stdio(policy: Option<PathBuf>) -> u8 {
    use mailpolicy_engine::smtp::{Config, Decision, Event, ForwardPath, PeerInfo, Reply, ReversePath, Session, Time};
    let (spool, hostname, max) = match site(policy) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("sendmail: {e}");
            return EX_CONFIG;
        }
    };
    let now = || {
        Time(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64)
    };
    let config = Config { hostname, max_message_size: max, tls_available: false, ..Config::default() };
    let mut s = Session::new(config, PeerInfo::default(), now());
    // Standard input is read on its own thread, so the engine's timers (reply pacing,
    // time-outs) run while no input comes.
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(buf.get(..n).unwrap_or_default().to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut stdout = std::io::stdout().lock();
    let mut spill = Vec::new();
    loop {
        while let Some(b) = s.poll_transmit() {
            if stdout.write_all(&b).and_then(|_| stdout.flush()).is_err() {
                return EX_OK;
            }
        }
        while let Some((_, bytes)) = s.take_spill() {
            spill.extend_from_slice(&bytes);
        }
        let mut progressed = false;
        while let Some(ev) = s.poll_event() {
            progressed = true;
            let d = match ev {
                Event::Message { envelope, mut data, .. } => {
                    data.append(&mut spill);
                    let sender = match &envelope.from {
                        ReversePath::Null => String::new(),
                        ReversePath::Mailbox(m) => m.to_string(),
                    };
                    let recipients = envelope
                        .recipients
                        .iter()
                        .map(|r| match &r.path {
                            ForwardPath::Postmaster => "postmaster".to_string(),
                            ForwardPath::Mailbox(m) => m.to_string(),
                        })
                        .collect();
                    let sub = Submission { sender: Some(sender), recipients, message: data, user: None };
                    match maildrop::write(&spool.join(maildrop::DIR), &sub) {
                        Ok(p) => Decision::queued(
                            p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                        ),
                        Err(e) => {
                            eprintln!("sendmail: cannot write to the maildrop: {e}");
                            Decision::reject(Reply::new(451, (4, 3, 0), "Cannot write to the maildrop"))
                        }
                    }
                }
                Event::Closed => {
                    while let Some(b) = s.poll_transmit() {
                        let _ = stdout.write_all(&b);
                    }
                    let _ = stdout.flush();
                    return EX_OK;
                }
                e if e.needs_answer() => Decision::accept(),
                _ => continue,
            };
            let _ = s.decide(d, now());
        }
        if progressed {
            continue;
        }
        if s.is_closed() {
            return EX_OK;
        }
        let wait = match s.poll_timeout() {
            Some(t) if t <= now() => {
                s.handle_timeout(now());
                continue;
            }
            Some(t) => std::time::Duration::from_millis(t.0.saturating_sub(now().0).max(1)),
            None => std::time::Duration::from_secs(3600),
        };
        match rx.recv_timeout(wait) {
            Ok(bytes) => s.handle_input(&bytes, now()),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                s.handle_eof(now());
                while let Some(b) = s.poll_transmit() {
                    let _ = stdout.write_all(&b);
                }
                let _ = stdout.flush();
                return EX_OK;
            }
        }
    }
}

/// `mailc mailq` / `mailq`: the queue, as `mailc queue list`.
pub fn mailq(args: Vec<OsString>) -> u8 {
    let mut rest: Vec<OsString> = vec!["list".into()];
    let has_spool = args.iter().any(|a| a == "--spool");
    rest.extend(args);
    if !has_spool {
        match site(None) {
            Ok((spool, _, _)) => rest.extend(["--spool".into(), spool.into_os_string()]),
            Err(e) => {
                eprintln!("mailq: {e}");
                return 2;
            }
        }
    }
    crate::queue::main(rest)
}

/// `newaliases`: aliases live in the policy's tables, read when they change.
pub fn newaliases() -> u8 {
    println!("newaliases: mailpolicy reads alias tables (`expand TABLE;`) when their files change; nothing to rebuild");
    EX_OK
}

#[derive(Debug, Default)]
struct Opts {
    extract: bool,
    dots_end: bool,
    sender: Option<String>,
    full_name: Option<String>,
    policy: Option<PathBuf>,
    mode: char,
    recipients: Vec<String>,
}

fn parse(args: Vec<OsString>) -> Result<Opts, String> {
    use lexopt::Arg::*;
    let mut o = Opts { dots_end: true, mode: 'm', ..Opts::default() };
    let mut p = lexopt::Parser::from_args(args);
    let text = |v: Result<OsString, lexopt::Error>| -> Result<String, String> {
        v.map_err(|e| e.to_string())?.into_string().map_err(|_| "an option value is not UTF-8".to_string())
    };
    loop {
        match p.next().map_err(|e| e.to_string())? {
            None => break,
            Some(Short('t')) => o.extract = true,
            Some(Short('i')) => o.dots_end = false,
            Some(Short('o')) => {
                if text(p.value())? == "i" {
                    o.dots_end = false;
                }
            }
            Some(Short('f' | 'r')) => {
                let v = text(p.value())?;
                let v = v.trim();
                o.sender = Some(if v == "<>" { String::new() } else { v.trim_matches(['<', '>']).to_string() });
            }
            Some(Short('F')) => o.full_name = Some(text(p.value())?),
            Some(Short('C')) => o.policy = Some(PathBuf::from(text(p.value())?)),
            Some(Short('b')) => {
                let v = text(p.value())?;
                o.mode = match v.as_str() {
                    "m" => 'm',
                    "p" => 'p',
                    "i" => 'i',
                    "s" => 's',
                    "d" => return Err("-bd: run the daemon with `mailc serve`".into()),
                    other => return Err(format!("-b{other} is not supported")),
                };
            }
            Some(Short('q')) => {
                // `-q` alone; `-qR...` / `-qS...` forms take their argument attached.
                let _ = p.optional_value();
                o.mode = 'q';
            }
            Some(Short('O' | 'N' | 'R' | 'V' | 'B' | 'L' | 'X' | 'h')) => {
                let _ = p.value();
            }
            Some(Short('v' | 'G' | 'U' | 'n' | 'm' | 'e')) => {}
            Some(Value(v)) => o.recipients.push(v.into_string().map_err(|_| "a recipient is not UTF-8".to_string())?),
            Some(other) => return Err(format!("unknown option {}", other.unexpected())),
        }
    }
    Ok(o)
}

/// Where the header section ends and whether the body needs an empty line before it: the
/// first empty line, or the first line that is not a header field (`echo text | sendmail
/// user` has no header at all), as Postfix's cleanup reads a submission.
fn header_split(m: &[u8]) -> (usize, bool) {
    let mut at = 0;
    for line in m.split_inclusive(|b| *b == b'\n') {
        let content = line.strip_suffix(b"\n").unwrap_or(line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        if content.is_empty() {
            return (at, false);
        }
        let continuation = matches!(content.first(), Some(b' ' | b'\t')) && at > 0;
        let field = content
            .iter()
            .position(|b| *b == b':')
            .is_some_and(|i| i > 0 && content.get(..i).is_some_and(|n| n.iter().all(|b| (33..=126).contains(b))));
        if !continuation && !field {
            return (at, true);
        }
        at += line.len();
    }
    (m.len(), false)
}

/// Field names of the header section, lower case.
fn has_field(head: &[u8], name: &str) -> bool {
    mailpolicy_engine::headers::fields(head)
        .into_iter()
        .any(|r| head.get(r).is_some_and(|f| mailpolicy_engine::headers::field_name(f) == name.as_bytes()))
}

/// Recipients in To:, Cc: and Bcc: (RFC 5322 address lists, groups included).
fn header_recipients(head: &[u8]) -> Vec<String> {
    let mut text = head.to_vec();
    text.extend_from_slice(b"\r\n\r\n");
    let parsed = std::panic::catch_unwind(|| {
        let mut out = Vec::new();
        if let Some(m) = mail_parser::MessageParser::default().parse_headers(&text[..]) {
            for a in [m.to(), m.cc(), m.bcc()].into_iter().flatten() {
                for addr in a.iter() {
                    if let Some(x) = addr.address() {
                        out.push(x.to_string());
                    }
                }
            }
        }
        out
    });
    parsed.unwrap_or_default()
}

/// The header section without its Bcc: fields (and their continuation lines).
fn without_bcc(head: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len());
    let mut skipping = false;
    for line in head.split_inclusive(|b| *b == b'\n') {
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        if !continuation {
            skipping = line.len() >= 4 && line.get(..4).is_some_and(|p| p.eq_ignore_ascii_case(b"bcc:"));
        }
        if !skipping {
            out.extend_from_slice(line);
        }
    }
    out
}

/// A bare user name is a local one: `root` is `root@HOSTNAME`, as sendmail does.
fn qualify(a: &str, hostname: &str) -> String {
    let a = a.trim().trim_matches(['<', '>']);
    if a.contains('@') || a.is_empty() {
        a.to_string()
    } else {
        format!("{a}@{hostname}")
    }
}

pub fn main(args: Vec<OsString>) -> u8 {
    let o = match parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("sendmail: {e}\n\n{USAGE}");
            return EX_USAGE;
        }
    };
    match o.mode {
        's' => return smtp_on_stdio(o.policy.clone()),
        'p' => return mailq(Vec::new()),
        'i' => return newaliases(),
        'q' => {
            return match site(o.policy.clone()) {
                Ok((spool, _, _)) => crate::queue::main(vec!["flush".into(), "--spool".into(), spool.into_os_string()]),
                Err(e) => {
                    eprintln!("sendmail: {e}");
                    EX_CONFIG
                }
            }
        }
        _ => {}
    }
    if o.recipients.is_empty() && !o.extract {
        eprintln!("sendmail: no recipients given (name them, or use -t)\n\n{USAGE}");
        return EX_USAGE;
    }
    let (spool, hostname, max) = match site(o.policy.clone()) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("sendmail: {e}");
            return EX_CONFIG;
        }
    };
    // The message: standard input up to EOF, or a line with a single dot unless -i.
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().lock().take(max.saturating_add(1)).read_to_end(&mut input) {
        eprintln!("sendmail: reading the message: {e}");
        return EX_TEMPFAIL;
    }
    if input.len() as u64 > max {
        eprintln!("sendmail: the message is larger than the server's limit of {max} bytes");
        return EX_DATAERR;
    }
    if o.dots_end {
        let mut at = 0;
        for line in input.split_inclusive(|b| *b == b'\n') {
            let l = line.strip_suffix(b"\n").unwrap_or(line);
            let l = l.strip_suffix(b"\r").unwrap_or(l);
            if l == b"." {
                break;
            }
            at += line.len();
        }
        input.truncate(at);
    }
    let (split, blank) = header_split(&input);
    let (head, body) = input.split_at(split.min(input.len()));
    let mut recipients: Vec<String> = o.recipients.iter().map(|r| qualify(r, &hostname)).collect();
    if o.extract {
        recipients.extend(header_recipients(head).iter().map(|r| qualify(r, &hostname)));
    }
    let mut seen = std::collections::HashSet::new();
    recipients.retain(|r| seen.insert(r.to_ascii_lowercase()));
    if recipients.is_empty() {
        eprintln!("sendmail: no recipient addresses found in the message header");
        return EX_DATAERR;
    }
    for r in &recipients {
        if mailpolicy_engine::smtp::parse_forward_path(&format!("<{r}>"), true).is_err() {
            eprintln!("sendmail: bad recipient address <{r}>");
            return EX_NOUSER;
        }
    }
    let (user, gecos) = maildrop::user_of(unsafe { libc::getuid() });
    let sender = o.sender.clone().map(|s| qualify(&s, &hostname));
    if let Some(s) = sender.as_deref().filter(|s| !s.is_empty()) {
        if mailpolicy_engine::smtp::parse_reverse_path(&format!("<{s}>"), true).is_err() {
            eprintln!("sendmail: bad sender address <{s}>");
            return EX_NOUSER;
        }
    }
    // The fields a message from a program often lacks, as Postfix's cleanup adds them.
    let mut msg = Vec::with_capacity(input.len() + 256);
    let eol = mailpolicy_engine::headers::line_ending(&input);
    let from = sender.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| format!("{user}@{hostname}"));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let head_out = if o.extract { without_bcc(head) } else { head.to_vec() };
    if !has_field(head, "from") {
        let name = o.full_name.clone().or(gecos).filter(|n| !n.is_empty());
        let field = match name {
            Some(n) => {
                let n: String = n.chars().filter(|c| !c.is_control() && *c != '"' && *c != '\\').collect();
                format!("From: \"{n}\" <{from}>")
            }
            None => format!("From: {from}"),
        };
        msg.extend_from_slice(field.as_bytes());
        msg.extend_from_slice(eol.as_bytes());
    }
    if !has_field(head, "date") {
        let d = mailpolicy_engine::date::rfc2822(now.as_millis() as u64);
        msg.extend_from_slice(format!("Date: {d}{eol}").as_bytes());
    }
    if !has_field(head, "message-id") {
        let id = format!("<{}.{:09}.{}@{hostname}>", now.as_secs(), now.subsec_nanos(), std::process::id());
        msg.extend_from_slice(format!("Message-ID: {id}{eol}").as_bytes());
    }
    msg.extend_from_slice(&head_out);
    if !msg.ends_with(b"\n") {
        msg.extend_from_slice(eol.as_bytes());
    }
    if blank {
        msg.extend_from_slice(eol.as_bytes());
    }
    msg.extend_from_slice(body);
    let sub = Submission { sender, recipients, message: msg, user: None };
    match maildrop::write(&spool.join(maildrop::DIR), &sub) {
        Ok(_) => EX_OK,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            eprintln!("sendmail: cannot write to the maildrop {}: {e}", spool.join(maildrop::DIR).display());
            EX_CANTCREAT
        }
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
            eprintln!("sendmail: {e}");
            EX_DATAERR
        }
        Err(e) => {
            eprintln!("sendmail: cannot write to the maildrop {}: {e}", spool.join(maildrop::DIR).display());
            let _ = std::io::stderr().flush();
            if e.raw_os_error() == Some(libc::ENOSPC) {
                EX_TEMPFAIL
            } else {
                EX_SOFTWARE
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_section_as_cleanup_reads_it() {
        assert_eq!(header_split(b"Subject: x\n\nbody\n"), (11, false));
        assert_eq!(header_split(b"Subject: x\r\n folded\r\n\r\nbody\r\n"), (21, false));
        // No header at all: the body starts at once, after an empty line we add.
        assert_eq!(header_split(b"hello world\n"), (0, true));
        assert_eq!(header_split(b"Subject: x\nnot a field\n"), (11, true));
        assert_eq!(header_split(b"Subject: x"), (10, false));
        assert_eq!(header_split(b" leading space\n"), (0, true));
    }

    #[test]
    fn recipients_from_the_header_and_bcc_removed() {
        let head = b"To: A <a@example.com>, b@example.com\nCc: team: c@example.com;\nBcc: d@example.com,\n e@example.com\nSubject: s\n";
        assert_eq!(
            header_recipients(head),
            ["a@example.com", "b@example.com", "c@example.com", "d@example.com", "e@example.com"]
        );
        assert_eq!(
            without_bcc(head),
            b"To: A <a@example.com>, b@example.com\nCc: team: c@example.com;\nSubject: s\n".to_vec()
        );
        assert!(header_recipients(b"Subject: none\n").is_empty());
    }

    #[test]
    fn options_as_cron_php_and_git_give_them() {
        let o =
            parse(["-t", "-oi", "-fapp@example.com", "-F", "App", "--", "x@example.com"].map(OsString::from).to_vec())
                .unwrap();
        assert!(o.extract && !o.dots_end);
        assert_eq!(o.sender.as_deref(), Some("app@example.com"));
        assert_eq!(o.full_name.as_deref(), Some("App"));
        assert_eq!(o.recipients, ["x@example.com"]);
        let o = parse(["-i", "-f", "<>", "-odi", "-oem", "-v", "a@b"].map(OsString::from).to_vec()).unwrap();
        assert_eq!(o.sender.as_deref(), Some(""));
        assert!(!o.dots_end);
        assert_eq!(parse(vec!["-bp".into()]).unwrap().mode, 'p');
        assert_eq!(parse(vec!["-bs".into()]).unwrap().mode, 's');
        assert!(parse(vec!["-bd".into()]).is_err());
        assert!(parse(vec!["-Z".into()]).is_err());
        assert_eq!(qualify("root", "mx.example"), "root@mx.example");
        assert_eq!(qualify("<a@b>", "mx.example"), "a@b");
    }
}
