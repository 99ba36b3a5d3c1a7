//! MTA-STS (RFC 8461): a recipient domain's policy, from its `_mta-sts` TXT record and its
//! HTTPS policy file, cached in the spool.
//!
//! * [`Sts::policy`] follows RFC 8461 section 3 and 5.1: the TXT record `_mta-sts.DOMAIN`
//!   (exactly one `v=STSv1` record, its `id=`), then, when no unexpired policy with that id
//!   is cached, `https://mta-sts.DOMAIN/.well-known/mta-sts.txt` (the certificate verified
//!   for that name against the system's trust store or `mta_sts_ca`; no redirect followed;
//!   200 and `text/plain` only; at most 64 KiB; HTTP/1.0 so the body is never chunked). A
//!   fetched policy is stored as `SPOOL/sts/DOMAIN` and used until its `max_age` passes; a
//!   changed id fetches it again; a failed fetch or a vanished TXT record keeps using an
//!   unexpired cached policy.
//! * [`Policy::mx_matches`]: an MX host matches a pattern exactly or, for `*.example.com`,
//!   by one more leftmost label (section 4.1).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

use super::mx::{DnsError, Resolver};

/// A policy's mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Mode {
    /// Deliver only to matching MX hosts over verified TLS.
    Enforce,
    /// Deliver as without a policy; report what enforcing would have refused.
    Testing,
    /// No policy.
    None,
}

impl Mode {
    /// The word of the policy file.
    pub fn word(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }
}

/// A parsed policy and where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// The TXT record's `id=` it was fetched under.
    pub id: String,
    pub mode: Mode,
    /// The `mx:` patterns, lower case, without a trailing dot.
    pub mx: Vec<String>,
    /// Seconds the policy may be cached.
    pub max_age: u64,
    /// When it was fetched (Unix seconds).
    pub fetched: u64,
    /// The policy file as served (for TLS-RPT's `policy-string`).
    pub text: String,
}

impl Policy {
    /// Parses a policy file (RFC 8461 section 3.2): `key: value` lines; `version: STSv1`,
    /// `mode`, `max_age` and (unless mode none) at least one `mx` are required.
    pub fn parse(text: &str, id: &str, fetched: u64) -> Result<Policy, String> {
        let (mut version, mut mode, mut max_age, mut mx) = (None, None, None, Vec::new());
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let Some((k, v)) = line.split_once(':') else {
                return Err(format!("policy line without a colon: {line:?}"));
            };
            let v = v.trim();
            match k.trim() {
                "version" => version = Some(v.to_string()),
                "mode" => {
                    mode = Some(match v {
                        "enforce" => Mode::Enforce,
                        "testing" => Mode::Testing,
                        "none" => Mode::None,
                        _ => return Err(format!("unknown mode {v:?}")),
                    })
                }
                "max_age" => {
                    let n: u64 = v.parse().map_err(|_| format!("max_age {v:?} is not a number"))?;
                    max_age = Some(n.min(31_557_600));
                }
                "mx" => mx.push(v.trim_end_matches('.').to_ascii_lowercase()),
                _ => {}
            }
        }
        if version.as_deref() != Some("STSv1") {
            return Err("no `version: STSv1`".into());
        }
        let mode = mode.ok_or("no `mode`")?;
        let max_age = max_age.ok_or("no `max_age`")?;
        if mode != Mode::None && mx.is_empty() {
            return Err("no `mx` pattern".into());
        }
        Ok(Policy { id: id.to_string(), mode, mx, max_age, fetched, text: text.to_string() })
    }

    /// Whether MX host `host` is one the policy names.
    pub fn mx_matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx.iter().any(|p| match p.strip_prefix("*.") {
            Some(suffix) => host.split_once('.').is_some_and(|(first, rest)| !first.is_empty() && rest == suffix),
            None => *p == host,
        })
    }

    fn fresh(&self, now: u64) -> bool {
        now < self.fetched.saturating_add(self.max_age)
    }
}

/// Why no policy could be had (TLS-RPT's `sts-policy-fetch-error` and `sts-policy-invalid`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StsError {
    /// The policy file could not be fetched.
    Fetch(String),
    /// It was fetched but is not a valid policy.
    Invalid(String),
}

impl std::fmt::Display for StsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StsError::Fetch(e) => write!(f, "MTA-STS policy fetch failed: {e}"),
            StsError::Invalid(e) => write!(f, "MTA-STS policy invalid: {e}"),
        }
    }
}

/// The MTA-STS client: where policies are cached and how they are fetched.
#[derive(Clone)]
pub struct Sts {
    /// `SPOOL/sts`.
    pub dir: PathBuf,
    /// The policy hosts' port (`mta_sts_port`: 443 but in tests).
    pub port: u16,
    /// What a policy host's certificate must chain to.
    pub roots: Arc<rustls::RootCertStore>,
    /// Bound of the TXT lookup, of the connection and of the fetch, each.
    pub timeout: Duration,
}

impl std::fmt::Debug for Sts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sts").field("dir", &self.dir).field("port", &self.port).finish_non_exhaustive()
    }
}

/// A domain as a cache file name: lower-case letters, digits, `-` and `.` only, and no
/// leading dot; anything else is not cached.
fn cache_name(domain: &str) -> Option<String> {
    let d = domain.trim_end_matches('.').to_ascii_lowercase();
    let ok = !d.is_empty()
        && !d.starts_with('.')
        && d.len() <= 253
        && d.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    ok.then_some(d)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The id of the one `v=STSv1` TXT record (RFC 8461 3.1); None when there is none, several,
/// or one without a valid id.
pub fn txt_id(records: &[String]) -> Option<String> {
    let sts: Vec<&String> = records.iter().filter(|r| r.starts_with("v=STSv1")).collect();
    let [one] = sts.as_slice() else { return None };
    let mut id = None;
    for field in one.split(';').skip(1) {
        if let Some(v) = field.trim().strip_prefix("id=") {
            id = Some(v.trim().to_string());
        }
    }
    id.filter(|i| !i.is_empty() && i.len() <= 32 && i.bytes().all(|b| b.is_ascii_alphanumeric()))
}

impl Sts {
    fn read_cache(&self, domain: &str) -> Option<Policy> {
        let name = cache_name(domain)?;
        let data = std::fs::read(self.dir.join(name)).ok()?;
        serde_json::from_slice(&data).ok()
    }

    fn write_cache(&self, domain: &str, p: &Policy) {
        let Some(name) = cache_name(domain) else { return };
        let Ok(data) = serde_json::to_vec(p) else { return };
        let _ = std::fs::create_dir_all(&self.dir);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        if std::fs::write(&tmp, data).is_ok() {
            let _ = std::fs::rename(&tmp, self.dir.join(name));
        }
    }

    /// `domain`'s policy: `Ok(None)` when it publishes none (or one in mode none is not
    /// filtered here: the caller looks at the mode), `Err` when it publishes one that could
    /// not be had and none is cached.
    pub async fn policy(&self, resolver: &dyn Resolver, domain: &str) -> Result<Option<Policy>, StsError> {
        let now = now_secs();
        let cached = self.read_cache(domain).filter(|p| p.fresh(now));
        let txt = match timeout(self.timeout, resolver.txt(&format!("_mta-sts.{}", domain.trim_end_matches('.')))).await
        {
            Ok(Ok(r)) => txt_id(&r),
            Ok(Err(DnsError::NotFound | DnsError::NoData)) | Ok(Err(DnsError::Temporary(_))) | Err(_) => None,
        };
        let Some(id) = txt else {
            // RFC 8461 5.1: no valid TXT record, a cached policy is still used until it expires
            return Ok(cached);
        };
        if let Some(c) = &cached {
            if c.id == id {
                return Ok(cached);
            }
        }
        match self.fetch(resolver, domain).await {
            Ok(text) => match Policy::parse(&text, &id, now) {
                Ok(p) => {
                    self.write_cache(domain, &p);
                    Ok(Some(p))
                }
                Err(e) => cached.map(Some).ok_or(StsError::Invalid(e)),
            },
            Err(e) => cached.map(Some).ok_or(StsError::Fetch(e)),
        }
    }

    /// GET `https://mta-sts.DOMAIN/.well-known/mta-sts.txt`: the body of a 200 answer.
    async fn fetch(&self, resolver: &dyn Resolver, domain: &str) -> Result<String, String> {
        let host = format!("mta-sts.{}", domain.trim_end_matches('.'));
        let ips = match timeout(self.timeout, resolver.ips(&host)).await {
            Ok(Ok(ips)) => ips,
            Ok(Err(e)) => return Err(format!("{host}: {e:?}")),
            Err(_) => return Err(format!("{host}: address lookup timed out")),
        };
        let mut last = format!("{host}: no address");
        for ip in ips {
            match timeout(self.timeout, self.get(&host, SocketAddr::new(ip, self.port))).await {
                Ok(Ok(body)) => return Ok(body),
                Ok(Err(e)) => last = e,
                Err(_) => last = format!("{host}[{ip}]:{}: timed out", self.port),
            }
        }
        Err(last)
    }

    async fn get(&self, host: &str, addr: SocketAddr) -> Result<String, String> {
        const LIMIT: usize = 64 * 1024;
        let label = format!("{host}[{}]:{}", addr.ip(), addr.port());
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("{label}: {e}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates((*self.roots).clone())
            .with_no_client_auth();
        let sn = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| format!("{host}: {e}"))?;
        let mut s = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(sn, tcp)
            .await
            .map_err(|e| format!("{label}: TLS: {e}"))?;
        let req = format!(
            "GET /.well-known/mta-sts.txt HTTP/1.0\r\nHost: {host}\r\nUser-Agent: mailpolicy\r\nAccept: text/plain\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.map_err(|e| format!("{label}: {e}"))?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => {
                    buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
                    if buf.len() > LIMIT + 16 * 1024 {
                        return Err(format!("{label}: the policy is longer than 64 KiB"));
                    }
                }
                // A server that closes without close_notify still sent the whole body.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(format!("{label}: {e}")),
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let head = match resp.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Err(format!("{label}: incomplete HTTP answer")),
            Err(e) => return Err(format!("{label}: bad HTTP answer: {e}")),
        };
        // RFC 8461 3.3: redirects are not followed; only 200 is a policy
        if resp.code != Some(200) {
            return Err(format!("{label}: HTTP status {}", resp.code.unwrap_or(0)));
        }
        let header = |name: &str| {
            resp.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
        };
        if let Some(ct) = header("content-type") {
            if !ct.starts_with("text/plain") {
                return Err(format!("{label}: Content-Type {ct}, not text/plain"));
            }
        }
        let mut body = buf.get(head..).unwrap_or_default();
        if let Some(len) = header("content-length").and_then(|l| l.parse::<usize>().ok()) {
            body = body.get(..len).ok_or_else(|| format!("{label}: the answer is shorter than its Content-Length"))?;
        }
        if body.len() > LIMIT {
            return Err(format!("{label}: the policy is longer than 64 KiB"));
        }
        String::from_utf8(body.to_vec()).map_err(|_| format!("{label}: the policy is not UTF-8"))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn policies_parse_as_rfc_8461_writes_them() {
        let p = Policy::parse(
            "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 604800\r\n",
            "1",
            0,
        )
        .expect("policy");
        assert_eq!((p.mode, p.max_age, p.mx.len()), (Mode::Enforce, 604_800, 2));
        assert!(p.mx_matches("mail.example.com."));
        assert!(p.mx_matches("MX1.example.net"));
        assert!(!p.mx_matches("example.net"), "a wildcard needs one more label");
        assert!(!p.mx_matches("a.b.example.net"), "and only one");
        assert!(!p.mx_matches("mail.example.org"));
        assert!(Policy::parse("version: STSv1\nmode: none\nmax_age: 1\n", "1", 0).is_ok());
        assert!(Policy::parse("version: STSv1\nmode: enforce\nmax_age: 1\n", "1", 0).is_err(), "no mx");
        assert!(Policy::parse("mode: enforce\nmx: a\nmax_age: 1\n", "1", 0).is_err(), "no version");
        assert!(Policy::parse("version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n", "1", 0).is_err());
        assert!(Policy::parse("version: STSv1\nmode: testing\nmx: a\nmax_age: x\n", "1", 0).is_err());
        let long = Policy::parse("version: STSv1\nmode: testing\nmx: a\nmax_age: 99999999999\n", "1", 0);
        assert_eq!(long.map(|p| p.max_age), Ok(31_557_600), "max_age is capped at a year");
    }

    #[test]
    fn the_txt_record_gives_the_id_of_the_one_stsv1_record() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(txt_id(&s(&["v=STSv1; id=20160831085700Z;"])), Some("20160831085700Z".into()));
        assert_eq!(txt_id(&s(&["v=spf1 -all", "v=STSv1; id=abc"])), Some("abc".into()));
        assert_eq!(txt_id(&s(&["v=STSv1; id=a", "v=STSv1; id=b"])), None, "two records: none");
        assert_eq!(txt_id(&s(&["v=STSv1;"])), None);
        assert_eq!(txt_id(&s(&["v=STSv1; id=a/b"])), None);
        assert_eq!(cache_name("Example.COM."), Some("example.com".into()));
        assert_eq!(cache_name("../etc"), None);
        assert_eq!(cache_name("a/b"), None);
    }

    /// An HTTPS server's parts on a loopback port for `name`: the listener, the acceptor of
    /// a fresh self-signed certificate, and that certificate as the only root.
    pub(crate) async fn loopback_tls(
        name: &str,
    ) -> (tokio::net::TcpListener, u16, tokio_rustls::TlsAcceptor, Arc<rustls::RootCertStore>) {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).expect("cert");
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![ck.cert.der().clone()], key)
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ck.cert.der().clone()).expect("root");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        (listener, port, tokio_rustls::TlsAcceptor::from(Arc::new(cfg)), Arc::new(roots))
    }

    /// A policy host on loopback serving whatever `policy` holds, counting fetches.
    async fn policy_host(
        policy: Arc<std::sync::Mutex<String>>,
        fetches: Arc<std::sync::atomic::AtomicUsize>,
    ) -> (u16, Arc<rustls::RootCertStore>, tokio::task::JoinHandle<()>) {
        let (listener, port, acceptor, roots) = loopback_tls("mta-sts.example.test").await;
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(mut s) = acceptor.accept(tcp).await else { continue };
                let mut req = Vec::new();
                let mut b = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&b[..n]),
                    }
                }
                fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let body = policy.lock().expect("policy").clone();
                let answer = format!("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n{body}");
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.shutdown().await;
            }
        });
        (port, roots, task)
    }

    /// RFC 8461 5.1: a policy is fetched once per TXT id and cached on disk; a changed id
    /// fetches it again; when the host is down an unexpired cached policy is still used;
    /// a host whose certificate does not chain to the roots gives no policy.
    #[tokio::test]
    async fn policies_are_cached_per_txt_id_and_kept_when_the_host_fails() {
        use std::sync::atomic::Ordering;
        let dir = mailpolicy_test_support::TempDir::new("sts-cache");
        let policy = Arc::new(std::sync::Mutex::new(
            "version: STSv1\nmode: enforce\nmx: mx.example.test\nmax_age: 600\n".to_string(),
        ));
        let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (port, roots, task) = policy_host(policy.clone(), fetches.clone()).await;
        let sts = Sts { dir: dir.join("sts"), port, roots, timeout: Duration::from_secs(5) };
        let dns = |id: &str| {
            let mut r = super::super::mx::StaticResolver::new();
            r.add_ip("mta-sts.example.test", std::net::IpAddr::from([127, 0, 0, 1]));
            r.add_txt("_mta-sts.example.test", &format!("v=STSv1; id={id}"));
            r
        };
        let p = sts.policy(&dns("1"), "example.test").await.expect("policy").expect("some");
        assert_eq!((p.mode, p.id.as_str(), fetches.load(Ordering::SeqCst)), (Mode::Enforce, "1", 1));
        assert!(dir.join("sts/example.test").exists(), "cached in the spool");
        *policy.lock().expect("policy") = "version: STSv1\nmode: testing\nmx: mx.example.test\nmax_age: 600\n".into();
        let p = sts.policy(&dns("1"), "example.test").await.expect("policy").expect("some");
        assert_eq!((p.mode, fetches.load(Ordering::SeqCst)), (Mode::Enforce, 1), "same id: the cache answers");
        let p = sts.policy(&dns("2"), "example.test").await.expect("policy").expect("some");
        assert_eq!((p.mode, p.id.as_str(), fetches.load(Ordering::SeqCst)), (Mode::Testing, "2", 2), "new id: fetched");
        let none = super::super::mx::StaticResolver::new();
        let p = sts.policy(&none, "example.test").await.expect("policy").expect("some");
        assert_eq!(p.id, "2", "no TXT record: the unexpired cached policy is used");
        task.abort();
        let _ = task.await;
        let p = sts.policy(&dns("3"), "example.test").await.expect("policy").expect("some");
        assert_eq!(p.id, "2", "the host is down: the cached policy is kept");
        // no cache and no host
        let mut other = super::super::mx::StaticResolver::new();
        other.add_ip("mta-sts.other.test", std::net::IpAddr::from([127, 0, 0, 1]));
        other.add_txt("_mta-sts.other.test", "v=STSv1; id=1");
        assert!(matches!(sts.policy(&other, "other.test").await, Err(StsError::Fetch(_))));
        assert_eq!(sts.policy(&none, "other.test").await, Ok(None), "no TXT record, nothing cached: no policy");
        // a certificate the roots do not trust
        let (port2, _, task2) = policy_host(policy.clone(), fetches.clone()).await;
        let (_, other_roots, _t) = policy_host(policy, fetches).await;
        let sts2 = Sts { dir: dir.join("sts2"), port: port2, roots: other_roots, timeout: Duration::from_secs(5) };
        match sts2.policy(&dns("1"), "example.test").await {
            Err(StsError::Fetch(e)) => assert!(e.contains("TLS"), "{e}"),
            r => panic!("{r:?}"),
        }
        task2.abort();
    }
}
