//! unbound (Debian package unbound) serving fixed records on a loopback port of its own.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{need, Peer, TempDir};

const UNBOUND: &str = "/usr/sbin/unbound";

/// A DNS server answering only from the records it was given, on 127.0.0.1:`port` (UDP and
/// TCP); stopped on drop.
pub struct Unbound {
    pub port: u16,
    peer: Option<Peer>,
    /// Its configuration and log; removed on drop.
    _dir: TempDir,
}

impl Unbound {
    /// Starts unbound with `zones` static (every other name in them is NXDOMAIN at once, no
    /// recursion), `records` as its `local-data` (resource records, e.g.
    /// `good.test. TXT "v=spf1 ip4:127.0.0.1 -all"`), and `options` as more `server:` lines
    /// (`max-udp-size: 512`). Returns once it answers a query.
    pub fn start(zones: &[&str], records: &[&str], options: &[&str]) -> Unbound {
        Unbound::start_with(zones, records, options, &[], &[])
    }

    /// [`Unbound::start`], validating: `auth_zones` are served from their zone files as if
    /// fetched from upstream (`for-upstream: yes`, `for-downstream: no`), so unbound's
    /// validator checks them against `trust_anchors` (`DNSKEY` or `DS` records, e.g.
    /// [`SignedZone::trust_anchor`]) and sets the AD bit on what validates, answers SERVFAIL
    /// to what is bogus, and leaves what no anchor covers insecure. A zone in `zones` that
    /// holds an auth zone must have that zone `transparent` (`options`:
    /// `local-zone: "sub.test." transparent`); [`Unbound::start_with`] adds that itself.
    pub fn start_with(
        zones: &[&str],
        records: &[&str],
        options: &[&str],
        auth_zones: &[(&str, &Path)],
        trust_anchors: &[&str],
    ) -> Unbound {
        need(UNBOUND, "unbound");
        let dir = TempDir::new("unbound");
        // unbound binds the port for UDP and TCP: a port free for UDP a moment ago may be
        // taken for TCP by a parallel test, and unbound then exits. Try another port.
        let mut last_log = String::new();
        for _ in 0..5 {
            let port = UdpSocket::bind("127.0.0.1:0").expect("bind udp").local_addr().expect("local addr").port();
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
                continue;
            }
            let mut conf = format!(
                "server:\n  interface: 127.0.0.1@{port}\n  port: {port}\n  do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"{d}/unbound.log\"\n  do-ip6: no\n  access-control: 127.0.0.0/8 allow\n",
                d = dir.0.display()
            );
            for o in options {
                conf.push_str(&format!("  {o}\n"));
            }
            for z in zones {
                conf.push_str(&format!("  local-zone: \"{z}\" static\n"));
            }
            for (z, _) in auth_zones {
                conf.push_str(&format!("  local-zone: \"{z}\" transparent\n"));
            }
            for a in trust_anchors {
                conf.push_str(&format!("  trust-anchor: \"{a}\"\n"));
            }
            for r in records {
                conf.push_str(&format!("  local-data: '{r}'\n"));
            }
            for (z, file) in auth_zones {
                conf.push_str(&format!(
                    "auth-zone:\n  name: \"{z}\"\n  zonefile: \"{}\"\n  for-upstream: yes\n  for-downstream: no\n  fallback-enabled: no\n",
                    file.display()
                ));
            }
            conf.push_str("remote-control:\n  control-enable: no\n");
            std::fs::write(dir.join("unbound.conf"), conf).expect("write unbound.conf");
            let mut child = Command::new(UNBOUND)
                .arg("-d")
                .arg("-c")
                .arg(dir.join("unbound.conf"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start unbound");
            let start = std::time::Instant::now();
            while start.elapsed() < Duration::from_secs(15) {
                if answers(port) {
                    return Unbound { port, peer: Some(Peer(child)), _dir: dir };
                }
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log = std::fs::read_to_string(dir.join("unbound.log")).unwrap_or_default();
        }
        panic!("unbound did not answer on any of five ports\n{last_log}");
    }

    /// `127.0.0.1:PORT`, as a policy's `dns_server` takes it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the server now (a test of what happens when DNS goes away).
    pub fn stop(&mut self) {
        self.peer = None;
    }
}

/// Whether a DNS server on 127.0.0.1:`port` answers a query (any answer: `localhost.` is
/// one of unbound's built-in local zones, so it never recurses).
fn answers(port: u16) -> bool {
    let Ok(s) = UdpSocket::bind("127.0.0.1:0") else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    // id 0x6d70, RD, one question: localhost. A IN
    let mut q = vec![0x6d, 0x70, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    q.extend_from_slice(b"\x09localhost\x00\x00\x01\x00\x01");
    if s.send_to(&q, ("127.0.0.1", port)).is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    matches!(s.recv(&mut buf), Ok(n) if n >= 12 && buf[0] == 0x6d && buf[1] == 0x70 && buf[2] & 0x80 != 0)
}

const LDNS_KEYGEN: &str = "/usr/bin/ldns-keygen";
const LDNS_SIGNZONE: &str = "/usr/bin/ldns-signzone";

/// A zone signed in the test with ldns (Debian package ldnsutils): a fresh ECDSA P-256 key,
/// NSEC, signatures valid from now for four weeks.
pub struct SignedZone {
    /// The signed zone file.
    pub file: PathBuf,
    /// The key as a trust anchor (`NAME. IN DNSKEY 257 3 13 ...`).
    pub trust_anchor: String,
}

impl SignedZone {
    /// Writes `text` (a zone file with `$ORIGIN origin`) under `dir` and signs it.
    pub fn sign(dir: &Path, origin: &str, text: &str) -> SignedZone {
        need(LDNS_SIGNZONE, "ldnsutils");
        std::fs::create_dir_all(dir).expect("zone dir");
        let zone = dir.join(format!("{origin}zone"));
        std::fs::write(&zone, text).expect("write zone");
        let out = Command::new(LDNS_KEYGEN)
            .args(["-a", "ECDSAP256SHA256", "-k", origin])
            .current_dir(dir)
            .output()
            .expect("ldns-keygen");
        assert!(out.status.success(), "ldns-keygen: {}", String::from_utf8_lossy(&out.stderr));
        let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let out = Command::new(LDNS_SIGNZONE).arg(&zone).arg(&key).current_dir(dir).output().expect("ldns-signzone");
        assert!(out.status.success(), "ldns-signzone: {}", String::from_utf8_lossy(&out.stderr));
        let dnskey = std::fs::read_to_string(dir.join(format!("{key}.key"))).expect("the key file");
        let trust_anchor = dnskey.split(';').next().unwrap_or_default().trim().to_string();
        SignedZone { file: dir.join(format!("{origin}zone.signed")), trust_anchor }
    }

    /// Changes the data of a signed record after signing (`from` to `to` in the signed file),
    /// so that its RRset no longer validates: a bogus answer.
    pub fn tamper(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(&self.file).expect("signed zone");
        assert!(text.contains(from), "{from} is not in the signed zone");
        std::fs::write(&self.file, text.replace(from, to)).expect("write signed zone");
    }
}
