//! OpenLDAP's slapd (Debian package slapd) on a loopback port of its own.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{listening, need, wait_for, Peer, TempDir};

const SLAPD: &str = "/usr/sbin/slapd";

/// A directory under `suffix` (root `cn=admin,SUFFIX`, password `secret`) with the core,
/// cosine, inetorgperson and misc schemas (`inetLocalMailRecipient`), loaded from an LDIF,
/// on ldap://127.0.0.1:`port`/. Stopped on drop.
pub struct Slapd {
    pub port: u16,
    _peer: Peer,
    _dir: TempDir,
}

impl Slapd {
    /// Loads `ldif` with slapadd and starts slapd; returns once it listens.
    pub fn start(suffix: &str, ldif: &str) -> Slapd {
        need(SLAPD, "slapd");
        let dir = TempDir::new("slapd");
        std::fs::create_dir_all(dir.join("db")).expect("mkdir db");
        let port = crate::free_port();
        let conf = format!(
            "include /etc/ldap/schema/core.schema\ninclude /etc/ldap/schema/cosine.schema\ninclude /etc/ldap/schema/inetorgperson.schema\ninclude /etc/ldap/schema/misc.schema\n\
             pidfile {d}/slapd.pid\nmoduleload back_mdb\ndatabase mdb\nsuffix \"{suffix}\"\nrootdn \"cn=admin,{suffix}\"\nrootpw secret\ndirectory {d}/db\n",
            d = dir.0.display()
        );
        let modpath = ["/usr/lib/ldap", "/usr/lib/x86_64-linux-gnu/ldap"]
            .into_iter()
            .find(|p| Path::new(p).join("back_mdb.so").exists() || Path::new(p).join("back_mdb.la").exists());
        let conf = match modpath {
            Some(p) => format!("modulepath {p}\n{conf}"),
            None => conf.replace("moduleload back_mdb\n", ""),
        };
        std::fs::write(dir.join("slapd.conf"), conf).expect("write slapd.conf");
        std::fs::write(dir.join("data.ldif"), ldif).expect("write data.ldif");
        let add = Command::new("/usr/sbin/slapadd")
            .args([
                "-f",
                &dir.join("slapd.conf").display().to_string(),
                "-l",
                &dir.join("data.ldif").display().to_string(),
            ])
            .output()
            .expect("run slapadd");
        assert!(add.status.success(), "slapadd: {}", String::from_utf8_lossy(&add.stderr));
        let child = Command::new(SLAPD)
            .args([
                "-d",
                "0",
                "-f",
                &dir.join("slapd.conf").display().to_string(),
                "-h",
                &format!("ldap://127.0.0.1:{port}/"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start slapd");
        let peer = Peer(child);
        wait_for(Duration::from_secs(15), "slapd to listen", || listening(port), String::new);
        Slapd { port, _peer: peer, _dir: dir }
    }
}
