//! PostgreSQL (Debian package postgresql) in a temp dir on a loopback port of its own.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{is_root, TempDir};

/// A PostgreSQL cluster with the superuser `mail` (trust authentication) listening on
/// 127.0.0.1:`port`; `url` reaches its `postgres` database. Stopped (immediately) on drop.
pub struct Postgres {
    pub port: u16,
    pub url: String,
    pg_ctl: PathBuf,
    dir: TempDir,
}

impl Postgres {
    /// Creates the cluster and starts the server; returns once it accepts connections.
    pub fn start() -> Postgres {
        Postgres::start_with(None)
    }

    /// As [`Postgres::start`], with TLS on (`ssl = on`, the certificate and key given, PEM)
    /// and connections over TCP accepted only in TLS: a connection in clear is refused by
    /// `pg_hba.conf` (`hostnossl ... reject`).
    pub fn start_tls(cert: &Path, key: &Path) -> Postgres {
        Postgres::start_with(Some((cert, key)))
    }

    fn start_with(tls: Option<(&Path, &Path)>) -> Postgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).find(|p| p.join("initdb").exists()))
            .expect("PostgreSQL is not installed (Debian package postgresql): run tests/run.sh, which installs it");
        let port = crate::free_port();
        let dir = TempDir::new("pg");
        if is_root() {
            let (uid, gid) = postgres_ids();
            std::os::unix::fs::chown(&dir.0, Some(uid), Some(gid)).expect("chown the cluster's dir");
        }
        let pg = Postgres {
            port,
            url: format!("postgresql://mail@127.0.0.1:{port}/postgres"),
            pg_ctl: bin.join("pg_ctl"),
            dir,
        };
        let data = pg.data();
        let init = as_postgres(Command::new(bin.join("initdb")).args([
            "-D",
            &data.display().to_string(),
            "-A",
            "trust",
            "-U",
            "mail",
        ]))
        .output()
        .expect("run initdb");
        assert!(init.status.success(), "initdb: {}", String::from_utf8_lossy(&init.stderr));
        let mut opts = format!("-p {port} -k {} -c listen_addresses=127.0.0.1", pg.dir.0.display());
        if let Some((cert, key)) = tls {
            // The server reads them as its own user, the key readable by it alone.
            let (c, k, hba) = (pg.dir.join("server.crt"), pg.dir.join("server.key"), pg.dir.join("pg_hba.conf"));
            std::fs::copy(cert, &c).expect("copy the certificate");
            std::fs::copy(key, &k).expect("copy the key");
            std::fs::write(
                &hba,
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
            )
            .expect("write pg_hba.conf");
            for f in [&c, &k, &hba] {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
                if is_root() {
                    let (uid, gid) = postgres_ids();
                    std::os::unix::fs::chown(f, Some(uid), Some(gid)).expect("chown");
                }
            }
            opts.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={} -c hba_file={}",
                c.display(),
                k.display(),
                hba.display()
            ));
        }
        let start = as_postgres(Command::new(&pg.pg_ctl).args([
            "-D",
            &data.display().to_string(),
            "-o",
            &opts,
            "-l",
            &pg.dir.join("log").display().to_string(),
            "-w",
            "start",
        ]))
        .output()
        .expect("run pg_ctl");
        assert!(
            start.status.success(),
            "pg_ctl: {}{}",
            String::from_utf8_lossy(&start.stderr),
            std::fs::read_to_string(pg.dir.join("log")).unwrap_or_default()
        );
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The cluster's directory (its `log` is the server's log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data();
        let _ = as_postgres(Command::new(&self.pg_ctl).args([
            "-D",
            &data.display().to_string(),
            "-m",
            "immediate",
            "stop",
        ]))
        .output();
    }
}

/// PostgreSQL refuses to run as root: run its tools as the `postgres` user when we are root.
fn as_postgres(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    if is_root() {
        let (uid, gid) = postgres_ids();
        cmd.uid(uid).gid(gid);
    }
    cmd
}

fn postgres_ids() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let line =
        passwd.lines().find(|l| l.starts_with("postgres:")).expect("a postgres user (Debian package postgresql)");
    let f: Vec<&str> = line.split(':').collect();
    (f[2].parse().expect("uid"), f[3].parse().expect("gid"))
}
