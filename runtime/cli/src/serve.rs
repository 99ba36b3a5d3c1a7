//! `mailc serve [--policy FILE] [--spool DIR]`: run the daemon.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;

use mailpolicy_daemon::{self as daemon, ServeOptions};

pub fn main(args: Vec<OsString>) -> u8 {
    let mut opts = ServeOptions { policy: None, spool: None, std_dir: crate::check::std_dir() };
    let mut parser = lexopt::Parser::from_args(args);
    loop {
        match parser.next() {
            Ok(Some(lexopt::Arg::Long("policy"))) => match parser.value() {
                Ok(v) => opts.policy = Some(PathBuf::from(v)),
                Err(e) => return usage(&e.to_string()),
            },
            Ok(Some(lexopt::Arg::Long("spool"))) => match parser.value() {
                Ok(v) => opts.spool = Some(PathBuf::from(v)),
                Err(e) => return usage(&e.to_string()),
            },
            Ok(Some(other)) => return usage(&format!("unexpected argument {}", other.unexpected())),
            Ok(None) => break,
            Err(e) => return usage(&e.to_string()),
        }
    }
    // The same policy `mailc sendmail` finds: --policy, $MAILPOLICY_POLICY,
    // /etc/mailpolicy/main.mailpolicy, else the embedded default.
    opts.policy = crate::sendmail::policy_path(opts.policy.take());
    let (prog, policy_dir, _c) = match daemon::load_policy(&opts) {
        Ok(x) => x,
        Err(c) => {
            // B6: a policy that fails `mailc check` never runs.
            for d in c.diagnostics.iter().filter(|d| d.is_error()) {
                eprintln!("{}", d.render_short(&c.sources));
            }
            eprintln!("mailc serve: the policy has errors; not starting");
            return 1;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mailc serve: {e}");
            return 2;
        }
    };
    match rt.block_on(run(prog, policy_dir, opts)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mailc serve: {e}");
            2
        }
    }
}

async fn run(prog: mailpolicy_lang::Program, policy_dir: PathBuf, opts: ServeOptions) -> Result<(), String> {
    let spool_dir = daemon::spool_dir(&prog, &policy_dir, opts.spool.as_deref());
    let (spool, recovered) =
        mailpolicy_daemon::spool::Spool::open(&spool_dir).map_err(|e| format!("spool {}: {e}", spool_dir.display()))?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let store = Arc::new(spool.clone());
    let running = daemon::start(prog, policy_dir.clone(), spool_dir.clone(), store, tx).await?;
    running.shared.log.event(
        "started",
        &[
            ("spool", &spool_dir.display().to_string()),
            ("recovered", &recovered.messages.len().to_string()),
            ("corrupt", &recovered.corrupt.len().to_string()),
        ],
    );
    for c in &recovered.corrupt {
        running.shared.log.event("corrupt", &[("file", &c.name), ("error", &c.reason)]);
    }
    for (name, addr) in &running.addresses {
        println!("mailc serve: listener {name} on {addr}");
    }
    // Local submissions (`mailc sendmail`) left in the maildrop, while we ran or not.
    let local = Arc::new(daemon::local_listener(&running.shared.program(), &running.shared.hostname));
    daemon::pickup::spawn(running.shared.clone(), local, spool.clone(), spool_dir.clone());
    let qmgr = daemon::qmgr::spawn(
        running.shared.clone(),
        spool,
        policy_dir,
        recovered.messages.iter().map(|m| m.id.as_str().to_string()).collect(),
        rx,
    );
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    loop {
        let stop = tokio::select! {
            _ = term.recv() => true,
            _ = int.recv() => true,
            _ = hup.recv() => {
                match running.reload(&opts) {
                    Err(e) => eprintln!("mailc serve: reload refused, the running policy stays: {e}"),
                    Ok(()) => qmgr.reload(running.shared.program()),
                }
                false
            }
        };
        if stop {
            break;
        }
    }
    running.stop().await;
    qmgr.stop().await;
    Ok(())
}

fn usage(msg: &str) -> u8 {
    eprintln!("mailc serve: {msg}\nusage: mailc serve [--policy FILE] [--spool DIR]");
    2
}
