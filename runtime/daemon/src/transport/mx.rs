//! Next-hop resolution (R33): MX by preference, random order among equal
//! preferences, A/AAAA fallback, `[host]` and `[ip]` without MX lookup,
//! `host:port`, null MX (RFC 7505), and "mail loops back to myself".
//!
//! DNS goes through the [`Resolver`] trait so tests and `mailc test` can
//! answer from fixtures ([`StaticResolver`]); the daemon uses
//! [`HickoryResolver`], on the system configuration or on a given name
//! server address (e.g. a test unbound on `127.0.0.1:PORT`).
//!
//! Errors are replies for the DSN: `556 5.1.10` null MX, `550 5.4.4` the
//! domain does not exist, `554 5.4.6` loops back to myself, `451 4.4.3`
//! temporary DNS failure, `451 4.4.4` no MX host could be resolved.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;

use rand::seq::SliceRandom;

use crate::smtp::Reply;

/// Why a lookup gave no answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsError {
    /// NXDOMAIN: the name does not exist.
    NotFound,
    /// The name exists but has no record of the type asked.
    NoData,
    /// SERVFAIL, timeout, network error.
    Temporary(String),
}

/// One MX record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MxRecord {
    /// Preference (lower is tried first).
    pub preference: u16,
    /// Exchange host name; `.` (or empty) is a null MX.
    pub exchange: String,
}

/// A boxed future returned by [`Resolver`] methods.
pub type DnsFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, DnsError>> + Send + 'a>>;

/// The DNS queries the transports need.
pub trait Resolver: Send + Sync {
    /// MX records of `domain`.
    fn mx<'a>(&'a self, domain: &'a str) -> DnsFuture<'a, Vec<MxRecord>>;
    /// A and AAAA addresses of `host`.
    fn ips<'a>(&'a self, host: &'a str) -> DnsFuture<'a, Vec<IpAddr>>;
    /// TXT records of `name`, each one string (MTA-STS, TLS-RPT); none by default.
    fn txt<'a>(&'a self, _name: &'a str) -> DnsFuture<'a, Vec<String>> {
        Box::pin(async { Err(DnsError::NoData) })
    }
}

/// [`Resolver`] over hickory-resolver.
pub struct HickoryResolver {
    inner: hickory_resolver::TokioResolver,
}

/// The configuration every DNS client of the daemon uses (MX, DNSBL and other policy
/// lookups, SPF/DKIM/DMARC): the one name server `server` when given, else the system's
/// (`/etc/resolv.conf`); each server over UDP and TCP, so an answer that comes back
/// truncated over UDP is asked again over TCP; `timeout` per query and one retry.
pub fn hickory_config(
    server: Option<SocketAddr>,
    timeout: std::time::Duration,
) -> (hickory_resolver::config::ResolverConfig, hickory_resolver::config::ResolverOpts) {
    use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
    let (config, mut opts) = match server {
        Some(addr) => {
            let group = NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true);
            (ResolverConfig::from_parts(None, vec![], group), ResolverOpts::default())
        }
        None => hickory_resolver::system_conf::read_system_conf().unwrap_or_else(|_| {
            let group = NameServerConfigGroup::from_ips_clear(&[IpAddr::from([127, 0, 0, 1])], 53, true);
            (ResolverConfig::from_parts(None, vec![], group), ResolverOpts::default())
        }),
    };
    opts.timeout = timeout;
    opts.attempts = 1;
    opts.ndots = 0;
    (config, opts)
}

/// The daemon's one resolver as the policy sets it up (`dns_server`, `dns_timeout`), with
/// its cache: built once per policy load and shared by every DNS client.
pub fn policy_resolver(prog: &mailpolicy_lang::ir::Program) -> Result<hickory_resolver::TokioResolver, String> {
    let server: Option<SocketAddr> = match &prog.server.dns_server {
        Some(a) => Some(a.parse().map_err(|_| format!("dns_server \"{a}\" is not IP:port"))?),
        None => None,
    };
    let timeout = prog.server.dns_timeout;
    Ok(hickory_resolver(server, timeout, 4096))
}

/// A hickory resolver with [`hickory_config`].
pub fn hickory_resolver(
    server: Option<SocketAddr>,
    timeout: std::time::Duration,
    cache_size: usize,
) -> hickory_resolver::TokioResolver {
    let (config, mut opts) = hickory_config(server, timeout);
    opts.cache_size = cache_size;
    hickory_resolver::TokioResolver::builder_with_config(
        config,
        hickory_resolver::name_server::TokioConnectionProvider::default(),
    )
    .with_options(opts)
    .build()
}

impl HickoryResolver {
    /// Uses `/etc/resolv.conf`.
    pub fn system() -> std::io::Result<HickoryResolver> {
        Ok(HickoryResolver { inner: hickory_resolver(None, std::time::Duration::from_secs(5), 1024) })
    }

    /// Asks one name server (UDP, then TCP on truncation), e.g. a test
    /// unbound on `127.0.0.1:PORT`. No search domains, no cache.
    pub fn with_nameserver(addr: SocketAddr) -> HickoryResolver {
        HickoryResolver { inner: hickory_resolver(Some(addr), std::time::Duration::from_secs(3), 0) }
    }

    /// A resolver with the policy's name server and `dns_timeout`.
    pub fn with(server: Option<SocketAddr>, timeout: std::time::Duration) -> HickoryResolver {
        HickoryResolver { inner: hickory_resolver(server, timeout, 1024) }
    }

    /// Next hops through an existing resolver (and its cache): the daemon has one, shared
    /// by policy lookups, call-ahead, sender authentication and the queue manager.
    pub fn from_resolver(inner: hickory_resolver::TokioResolver) -> HickoryResolver {
        HickoryResolver { inner }
    }
}

fn map_err(e: hickory_resolver::proto::ProtoError) -> DnsError {
    use hickory_resolver::proto::op::ResponseCode;
    use hickory_resolver::proto::{NoRecords, ProtoErrorKind};
    match e.kind() {
        ProtoErrorKind::NoRecordsFound(NoRecords { response_code, .. }) => {
            if *response_code == ResponseCode::NXDomain {
                DnsError::NotFound
            } else {
                DnsError::NoData
            }
        }
        _ => DnsError::Temporary(e.to_string()),
    }
}

fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

impl Resolver for HickoryResolver {
    fn mx<'a>(&'a self, domain: &'a str) -> DnsFuture<'a, Vec<MxRecord>> {
        Box::pin(async move {
            let l = self.inner.mx_lookup(fqdn(domain)).await.map_err(map_err)?;
            Ok(l.iter().map(|mx| MxRecord { preference: mx.preference(), exchange: mx.exchange().to_utf8() }).collect())
        })
    }

    fn ips<'a>(&'a self, host: &'a str) -> DnsFuture<'a, Vec<IpAddr>> {
        Box::pin(async move {
            let l = self.inner.lookup_ip(fqdn(host)).await.map_err(map_err)?;
            Ok(l.iter().collect())
        })
    }

    fn txt<'a>(&'a self, name: &'a str) -> DnsFuture<'a, Vec<String>> {
        Box::pin(async move {
            let l = self.inner.txt_lookup(fqdn(name)).await.map_err(map_err)?;
            Ok(l.iter()
                .map(|t| t.txt_data().iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect::<String>())
                .collect())
        })
    }
}

/// A [`Resolver`] answering from tables: for tests and fixtures. Names are
/// compared case-insensitively, trailing dot ignored. A name in neither
/// table is NXDOMAIN; a name with addresses but no MX entry has no MX (NODATA).
#[derive(Clone, Debug, Default)]
pub struct StaticResolver {
    mx: HashMap<String, Result<Vec<MxRecord>, DnsError>>,
    hosts: HashMap<String, Result<Vec<IpAddr>, DnsError>>,
    txt: HashMap<String, Vec<String>>,
}

impl StaticResolver {
    /// An empty resolver (every name NXDOMAIN).
    pub fn new() -> StaticResolver {
        StaticResolver::default()
    }

    /// Adds an MX record.
    pub fn add_mx(&mut self, domain: &str, preference: u16, exchange: &str) -> &mut Self {
        let e = self.mx.entry(norm(domain)).or_insert_with(|| Ok(Vec::new()));
        if let Ok(v) = e {
            v.push(MxRecord { preference, exchange: exchange.to_string() });
        }
        self
    }

    /// Adds an address.
    pub fn add_ip(&mut self, host: &str, ip: IpAddr) -> &mut Self {
        let e = self.hosts.entry(norm(host)).or_insert_with(|| Ok(Vec::new()));
        if let Ok(v) = e {
            v.push(ip);
        }
        self
    }

    /// Adds a TXT record (its strings joined).
    pub fn add_txt(&mut self, name: &str, text: &str) -> &mut Self {
        self.txt.entry(norm(name)).or_default().push(text.to_string());
        self
    }

    /// Makes MX lookups of `domain` fail with `err`.
    pub fn fail_mx(&mut self, domain: &str, err: DnsError) -> &mut Self {
        self.mx.insert(norm(domain), Err(err));
        self
    }

    /// Makes address lookups of `host` fail with `err`.
    pub fn fail_ips(&mut self, host: &str, err: DnsError) -> &mut Self {
        self.hosts.insert(norm(host), Err(err));
        self
    }

    fn exists(&self, n: &str) -> bool {
        self.mx.contains_key(n) || self.hosts.contains_key(n) || self.txt.contains_key(n)
    }
}

impl Resolver for StaticResolver {
    fn mx<'a>(&'a self, domain: &'a str) -> DnsFuture<'a, Vec<MxRecord>> {
        let n = norm(domain);
        let r = match self.mx.get(&n) {
            Some(r) => r.clone(),
            None if self.exists(&n) => Err(DnsError::NoData),
            None => Err(DnsError::NotFound),
        };
        Box::pin(async move { r })
    }

    fn ips<'a>(&'a self, host: &'a str) -> DnsFuture<'a, Vec<IpAddr>> {
        let n = norm(host);
        let r = match self.hosts.get(&n) {
            Some(r) => r.clone(),
            None if self.exists(&n) => Err(DnsError::NoData),
            None => Err(DnsError::NotFound),
        };
        Box::pin(async move { r })
    }

    fn txt<'a>(&'a self, name: &'a str) -> DnsFuture<'a, Vec<String>> {
        let n = norm(name);
        let r = match self.txt.get(&n) {
            Some(r) => Ok(r.clone()),
            None if self.exists(&n) => Err(DnsError::NoData),
            None => Err(DnsError::NotFound),
        };
        Box::pin(async move { r })
    }
}

/// Lower case, no trailing dot.
fn norm(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Where to send: a domain (MX lookup) or a host (`[host]`, no MX lookup),
/// and a port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Destination {
    /// Domain, host name or IP address (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Look up MX records (false for `[host]` and IP literals).
    pub mx: bool,
}

impl Destination {
    /// `example.com` (MX, port 25), `example.com:2525` (MX, that port),
    /// `[mail.example.com]`, `[192.0.2.1]:587`, `[IPv6:2001:db8::1]`,
    /// `[2001:db8::1]:25`. `None` when malformed.
    pub fn parse(s: &str) -> Option<Destination> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix('[') {
            let (inner, after) = rest.split_once(']')?;
            let port = match after {
                "" => 25,
                p => p.strip_prefix(':')?.parse().ok()?,
            };
            let inner = inner.strip_prefix("IPv6:").or_else(|| inner.strip_prefix("ipv6:")).unwrap_or(inner);
            if inner.is_empty() {
                return None;
            }
            return Some(Destination { host: inner.to_string(), port, mx: false });
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Some(Destination { host: ip.to_string(), port: 25, mx: false });
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, p.parse().ok()?),
            Some(_) => return None,
            None => (s, 25),
        };
        if host.is_empty() {
            return None;
        }
        let mx = host.parse::<IpAddr>().is_err();
        Some(Destination { host: host.to_string(), port, mx })
    }

    /// MX delivery to `domain` on port 25.
    pub fn domain(domain: &str) -> Destination {
        Destination { host: domain.to_string(), port: 25, mx: true }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.mx {
            write!(f, "{}:{}", self.host, self.port)
        } else {
            write!(f, "[{}]:{}", self.host, self.port)
        }
    }
}

/// Who we are, for loop detection.
#[derive(Clone, Debug, Default)]
pub struct LocalIdentity {
    /// Our host names (compared case-insensitively).
    pub hostnames: Vec<String>,
    /// Our addresses.
    pub addrs: Vec<IpAddr>,
}

impl LocalIdentity {
    fn is_me_name(&self, name: &str) -> bool {
        let n = norm(name);
        self.hostnames.iter().any(|h| norm(h) == n)
    }

    fn is_me_addr(&self, ips: &[IpAddr]) -> bool {
        ips.iter().any(|ip| self.addrs.contains(ip))
    }
}

/// One address to try.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hop {
    /// Host name (the MX exchange, the `[host]`, or the IP as text): used
    /// for TLS verification and as the DSN's Remote-MTA.
    pub name: String,
    /// Address and port.
    pub addr: SocketAddr,
    /// MX preference, when found through MX.
    pub preference: Option<u16>,
}

fn dns_reply(what: &str, e: &DnsError) -> Reply {
    match e {
        DnsError::NotFound => Reply::new(
            550,
            (5, 4, 4),
            format!("Host or domain name not found. Name service error for name={what}: Host not found"),
        ),
        DnsError::NoData => Reply::new(
            550,
            (5, 4, 4),
            format!("Host or domain name not found. Name service error for name={what}: No address associated with hostname"),
        ),
        DnsError::Temporary(t) => Reply::new(
            451,
            (4, 4, 3),
            format!("Name service error for name={what}: {t}"),
        ),
    }
}

fn loop_reply(host: &str) -> Reply {
    Reply::new(554, (5, 4, 6), format!("mail for {host} loops back to myself"))
}

/// Sorts MX records by preference, shuffling equal preferences.
pub fn order_mx(mut records: Vec<MxRecord>) -> Vec<MxRecord> {
    let mut rng = rand::thread_rng();
    records.shuffle(&mut rng);
    // stable sort keeps the shuffled order within a preference
    records.sort_by_key(|r| r.preference);
    records
}

/// Resolves `dest` into the addresses to try, best first.
pub async fn resolve(resolver: &dyn Resolver, dest: &Destination, me: &LocalIdentity) -> Result<Vec<Hop>, Reply> {
    let hop = |name: &str, ip: IpAddr, preference| Hop {
        name: name.to_string(),
        addr: SocketAddr::new(ip, dest.port),
        preference,
    };
    if let Ok(ip) = dest.host.parse::<IpAddr>() {
        return Ok(vec![hop(&dest.host, ip, None)]);
    }
    if !dest.mx {
        let ips = resolver.ips(&dest.host).await.map_err(|e| dns_reply(&format!("{} type=A", dest.host), &e))?;
        return Ok(ips.into_iter().map(|ip| hop(&dest.host, ip, None)).collect());
    }
    let records = match resolver.mx(&dest.host).await {
        Ok(r) if !r.is_empty() => r,
        Ok(_) | Err(DnsError::NoData) => {
            // RFC 5321 5.1: no MX, the domain itself is the implicit MX
            let ips = resolver.ips(&dest.host).await.map_err(|e| dns_reply(&format!("{} type=A", dest.host), &e))?;
            if me.is_me_name(&dest.host) || me.is_me_addr(&ips) {
                return Err(loop_reply(&dest.host));
            }
            return Ok(ips.into_iter().map(|ip| hop(&dest.host, ip, None)).collect());
        }
        Err(e) => return Err(dns_reply(&format!("{} type=MX", dest.host), &e)),
    };
    if records.iter().any(|r| norm(&r.exchange).is_empty()) {
        return Err(Reply::new(556, (5, 1, 10), format!("Domain {} does not accept mail (null MX)", dest.host)));
    }
    let records = order_mx(records);
    let mut resolved: Vec<(MxRecord, Result<Vec<IpAddr>, DnsError>)> = Vec::new();
    let mut cutoff: Option<u16> = None;
    for r in records {
        if cutoff.is_some_and(|c| r.preference >= c) {
            break;
        }
        if me.is_me_name(&r.exchange) {
            cutoff = Some(r.preference);
            continue;
        }
        let ips = resolver.ips(&r.exchange).await;
        if let Ok(ips) = &ips {
            if me.is_me_addr(ips) {
                cutoff = Some(r.preference);
                continue;
            }
        }
        resolved.push((r, ips));
    }
    // Postfix: when we are an MX host, only better MX hosts are tried
    if let Some(c) = cutoff {
        resolved.retain(|(r, _)| r.preference < c);
        if resolved.is_empty() {
            return Err(loop_reply(&dest.host));
        }
    }
    let mut hops = Vec::new();
    let mut last_err = None;
    for (r, ips) in resolved {
        match ips {
            Ok(ips) => {
                let name = r.exchange.trim_end_matches('.').to_string();
                hops.extend(ips.into_iter().map(|ip| hop(&name, ip, Some(r.preference))));
            }
            Err(e) => last_err = Some((r.exchange, e)),
        }
    }
    if hops.is_empty() {
        return Err(match last_err {
            Some((h, DnsError::Temporary(t))) => dns_reply(&format!("{h} type=A"), &DnsError::Temporary(t)),
            Some((h, _)) => {
                Reply::new(451, (4, 4, 4), format!("no MX host of {} could be resolved (last: {h})", dest.host))
            }
            None => Reply::new(451, (4, 4, 4), format!("no MX host for {}", dest.host)),
        });
    }
    Ok(hops)
}
