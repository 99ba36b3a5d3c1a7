//! unbound: a real DNS server on a loopback port of its own, for the look-up and corpus tests.

use super::*;

/// unbound (Debian package) serving `local-data` lines on a loopback port of its own.
pub(super) struct Unbound {
    pub(super) guard: Guard,
    pub(super) port: u16,
}

pub(super) fn unbound(dir: &Path, records: &[&str]) -> Unbound {
    const UNBOUND: &str = "/usr/sbin/unbound";
    need(UNBOUND, "unbound");
    let port = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp").local_addr().expect("addr").port();
    std::fs::create_dir_all(dir).expect("dir");
    let mut conf = format!(
        "server:\n  interface: 127.0.0.1@{port}\n  port: {port}\n  do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"\"\n  do-ip6: no\n  access-control: 127.0.0.0/8 allow\n  local-zone: \"test.\" static\n  local-zone: \"127.in-addr.arpa.\" static\n",
        d = dir.display()
    );
    for r in records {
        conf.push_str(&format!("  local-data: '{r}'\n"));
    }
    conf.push_str("remote-control:\n  control-enable: no\n");
    std::fs::write(dir.join("unbound.conf"), conf).expect("write unbound.conf");
    let child = Command::new(UNBOUND)
        .arg("-d")
        .arg("-c")
        .arg(dir.join("unbound.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start unbound");
    let u = Unbound { guard: Guard(Some(child)), port };
    // Wait until it answers a query (a UDP probe of our own would need a DNS encoder; the
    // daemon's first look-up retries through hickory's own time-out instead, so give the
    // server a moment to bind).
    std::thread::sleep(Duration::from_millis(300));
    u
}

/// [`unbound`] answering only from `records`, with `zones` static.
pub(super) fn unbound_zones(dir: &Path, records: &[&str], zones: &[&str]) -> Unbound {
    const UNBOUND: &str = "/usr/sbin/unbound";
    need(UNBOUND, "unbound");
    let port = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp").local_addr().expect("addr").port();
    std::fs::create_dir_all(dir).expect("dir");
    let mut conf = format!(
        "server:\n  interface: 127.0.0.1@{port}\n  port: {port}\n  do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"\"\n  do-ip6: no\n  access-control: 127.0.0.0/8 allow\n",
        d = dir.display()
    );
    for z in zones {
        conf.push_str(&format!("  local-zone: \"{z}\" static\n"));
    }
    for r in records {
        conf.push_str(&format!("  local-data: '{r}'\n"));
    }
    conf.push_str("remote-control:\n  control-enable: no\n");
    std::fs::write(dir.join("unbound.conf"), conf).expect("write unbound.conf");
    let child = Command::new(UNBOUND)
        .arg("-d")
        .arg("-c")
        .arg(dir.join("unbound.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start unbound");
    std::thread::sleep(Duration::from_millis(300));
    Unbound { guard: Guard(Some(child)), port }
}
