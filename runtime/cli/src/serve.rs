//! `mailc serve [--policy FILE] [--spool DIR] [--user NAME]`: run the daemon.
//!
//! Started as root it binds its listeners, gives the spool to the policy's `user` (or
//! `--user`), drops to that account for good (`daemon/privileges.rs`), and only then
//! accepts; as root without a user it refuses to start. Under systemd (`Type=notify`) it
//! says READY=1 once it accepts mail, RELOADING=1 around a reload and STOPPING=1
//! (`daemon/notify.rs`). The control socket (`daemon/control.rs`) takes `mailc queue` and
//! `mailc reload` requests.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;

use mailpolicy_daemon::privileges::Plan;
use mailpolicy_daemon::{self as daemon, ServeOptions};

pub fn main(args: Vec<OsString>) -> u8 {
    let mut opts = ServeOptions { policy: None, spool: None, std_dir: crate::check::std_dir() };
    let mut user: Option<String> = None;
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
            Ok(Some(lexopt::Arg::Long("user"))) => match parser.value().map(|v| v.into_string()) {
                Ok(Ok(v)) => user = Some(v),
                Ok(Err(_)) => return usage("--user must be UTF-8"),
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
    let daemon::Loaded { prog, dir: policy_dir, proven, .. } = match daemon::load_policy(&opts) {
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
    // Who the daemon runs as, decided before anything is opened: as root, a `user` to drop
    // to is required (`--user root` runs as root on purpose).
    let user = user.or_else(|| prog.server.user.clone());
    let plan = match daemon::privileges::plan(user.as_deref(), prog.server.group.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("mailc serve: {e}");
            return 2;
        }
    };
    // Connected now, while the socket may still need root to reach.
    let notifier = match daemon::notify::Notifier::from_env() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("mailc serve: {e}; not notifying the service manager");
            daemon::notify::Notifier::from_env_unset()
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mailc serve: {e}");
            return 2;
        }
    };
    match rt.block_on(run(prog, policy_dir, proven, opts, plan, notifier)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mailc serve: {e}");
            2
        }
    }
}

async fn run(
    prog: mailpolicy_lang::Program,
    policy_dir: PathBuf,
    proven: daemon::proven::Proven,
    opts: ServeOptions,
    plan: Plan,
    notifier: daemon::notify::Notifier,
) -> Result<(), String> {
    let spool_dir = daemon::spool_dir(&prog, &policy_dir, opts.spool.as_deref());
    let defaulted = opts.spool.is_none() && prog.server.spool.is_none();
    let (spool, recovered) = mailpolicy_daemon::spool::Spool::open(&spool_dir).map_err(|e| {
        if defaulted {
            // SAFETY: geteuid has no preconditions.
            let uid = unsafe { libc::geteuid() };
            format!(
                "the default spool {} cannot be used by uid {uid}: {e}; give the policy a `server {{ spool \"DIR\"; }}` \
                 or run `mailc serve --spool DIR`, or start the daemon as root with `server {{ user \"mailpolicy\"; }}` \
                 (the package creates the directory)",
                spool_dir.display()
            )
        } else {
            format!("spool {}: {e}", spool_dir.display())
        }
    })?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let store = Arc::new(spool.clone());
    let dropped = std::sync::Mutex::new(None);
    let running =
        daemon::start_with(prog, policy_dir.clone(), spool_dir.clone(), store, tx, Some(proven), || match &plan {
            // Listeners are bound: the spool becomes the account's, then privileges go for good.
            Plan::Drop(a) => {
                daemon::privileges::own_spool(&spool_dir, a)?;
                daemon::privileges::drop_to(a).map_err(|e| format!("cannot drop privileges to {}: {e}", a.user))?;
                if let Ok(mut d) = dropped.lock() {
                    *d = Some(a.clone());
                }
                Ok(())
            }
            Plan::Stay | Plan::StayRoot => Ok(()),
        })
        .await?;
    match (&plan, dropped.lock().ok().and_then(|d| d.clone())) {
        (_, Some(a)) => running.shared.log.event(
            "privileges",
            &[("user", &a.user), ("uid", &a.uid.to_string()), ("group", &a.group), ("gid", &a.gid.to_string())],
        ),
        (Plan::StayRoot, _) => running.shared.log.event("privileges", &[("warning", "running as root (user root)")]),
        _ => {}
    }
    let (ctl_tx, mut ctl_rx) = tokio::sync::mpsc::unbounded_channel();
    let control = daemon::control::listen(&spool_dir, running.shared.shutdown.clone(), ctl_tx, running.shared.log)?;
    running.shared.log.event(
        "started",
        &[
            ("spool", &spool_dir.display().to_string()),
            ("recovered", &recovered.messages.len().to_string()),
            ("corrupt", &recovered.corrupt.len().to_string()),
        ],
    );
    running.shared.log.event("control", &[("socket", &control.display().to_string())]);
    let showq = daemon::control::listen_showq(spool.clone(), running.shared.shutdown.clone(), running.shared.log)?;
    running.shared.log.event("showq", &[("socket", &showq.display().to_string())]);
    for c in &recovered.corrupt {
        running.shared.log.event("corrupt", &[("file", &c.name), ("error", &c.reason)]);
    }
    for (name, addr) in &running.addresses {
        println!("mailc serve: listener {name} on {addr}");
    }
    // Local submissions (`mailc sendmail`) left in the maildrop, while we ran or not.
    let local = Arc::new(daemon::local_listener(&running.shared.program(), &running.shared.hostname));
    running.shared.set_listener(local.clone());
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
    let _ = notifier.ready(&format!("accepting mail; spool {}", spool_dir.display()));
    // SIGHUP and `mailc reload`: recompile (the open-relay proof included); a policy with
    // errors is refused and the running one stays.
    let reload = || {
        let _ = notifier.reloading();
        let r = match running.reload(&opts) {
            Err(e) => {
                eprintln!("mailc serve: reload refused, the running policy stays: {e}");
                Err(e)
            }
            Ok(()) => {
                qmgr.reload(running.shared.program());
                Ok(())
            }
        };
        let _ = notifier.ready("accepting mail");
        r
    };
    loop {
        let stop = tokio::select! {
            _ = term.recv() => true,
            _ = int.recv() => true,
            _ = hup.recv() => {
                let _ = reload();
                false
            }
            Some((op, answer)) = ctl_rx.recv() => {
                let a = match op {
                    daemon::control::Op::Reload => match reload() {
                        Ok(()) => daemon::control::Answer::ok("policy reloaded"),
                        Err(e) => daemon::control::Answer::fail(1, format!("reload refused, the running policy stays: {e}")),
                    },
                    op => qmgr.admin(op).await,
                };
                let _ = answer.send(a);
                false
            }
        };
        if stop {
            break;
        }
    }
    let _ = notifier.stopping();
    running.stop().await;
    qmgr.stop().await;
    Ok(())
}

fn usage(msg: &str) -> u8 {
    eprintln!("mailc serve: {msg}\nusage: mailc serve [--policy FILE] [--spool DIR] [--user NAME]");
    2
}
