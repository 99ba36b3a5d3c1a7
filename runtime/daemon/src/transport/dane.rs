//! DANE for SMTP (RFC 7672): DNSSEC-validated TLSA records checked against the next hop's
//! certificate.
//!
//! * DNSSEC is the local validating resolver's, as Postfix's `smtp_dns_support_level =
//!   dnssec`: [`SecureDns`] asks the daemon's name server (the policy's `dns_server`, else the
//!   first of `/etc/resolv.conf`) with the AD bit set (RFC 6840 section 5.7) and trusts the
//!   AD bit of the answer. A validating resolver answers a bogus RRset with SERVFAIL, which
//!   is a temporary failure here; an answer without AD is insecure. hickory's resolver does
//!   not show the header of an answer, so these few lookups (the MX and address records of a
//!   DANE destination, its TLSA records) are made with hickory-proto's message codec over
//!   UDP, asked again over TCP when truncated, and not cached (the resolver caches).
//! * [`host_tlsa`] decides for one MX host: usable TLSA records (usage DANE-TA(2) or
//!   DANE-EE(3), selector 0 or 1, matching 0, 1 or 2) make authenticated TLS mandatory;
//!   a secure TLSA RRset with none usable makes TLS mandatory but unauthenticated (RFC 7672
//!   section 2.2); insecure or absent records leave the host to the next policy (MTA-STS or
//!   opportunistic TLS); a failed TLSA lookup (bogus included) skips the host.
//! * [`DaneVerifier`] is the rustls verifier: DANE-EE matches the end-entity certificate
//!   and checks no name and no validity dates (RFC 7672 section 3.1.1); DANE-TA matches a
//!   certificate of the presented chain, which then anchors a WebPKI verification of the
//!   chain for one of the reference names (the MX host name, the next-hop domain; section
//!   3.2.2).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

use super::mx::DnsError;

/// An answer and whether the resolver vouched for it (the AD bit).
#[derive(Clone, Debug)]
pub struct SecureAnswer {
    /// The resolver validated the answer with DNSSEC.
    pub secure: bool,
    /// The answer section's records of the type asked.
    pub records: Vec<Record>,
}

/// DNS queries whose answers say whether they were DNSSEC-validated.
#[derive(Clone, Debug)]
pub struct SecureDns {
    servers: Vec<SocketAddr>,
    timeout: Duration,
}

impl SecureDns {
    /// Asks `server` when given (the policy's `dns_server`), else the name servers of
    /// `/etc/resolv.conf`, each query bounded by `limit`.
    pub fn new(server: Option<SocketAddr>, limit: Duration) -> SecureDns {
        let (config, _) = super::mx::hickory_config(server, limit);
        let mut servers: Vec<SocketAddr> = Vec::new();
        for ns in config.name_servers() {
            if !servers.contains(&ns.socket_addr) {
                servers.push(ns.socket_addr);
            }
        }
        SecureDns { servers, timeout: limit }
    }

    /// `name`'s records of type `rtype`: NXDOMAIN is [`DnsError::NotFound`], an empty
    /// answer [`DnsError::NoData`], SERVFAIL (a bogus answer at a validating resolver) and
    /// time-outs [`DnsError::Temporary`].
    pub async fn query(&self, name: &str, rtype: RecordType) -> Result<SecureAnswer, DnsError> {
        let fq = if name.ends_with('.') { name.to_string() } else { format!("{name}.") };
        let qname = Name::from_ascii(&fq).map_err(|e| DnsError::Temporary(format!("bad name {name}: {e}")))?;
        let mut last = DnsError::Temporary("no name server".into());
        for server in &self.servers {
            match self.ask(*server, &qname, rtype).await {
                Ok(m) => return answer(m, rtype),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn ask(&self, server: SocketAddr, qname: &Name, rtype: RecordType) -> Result<Message, DnsError> {
        let mut q = Message::new(rand::random(), MessageType::Query, OpCode::Query);
        q.add_query(Query::query(qname.clone(), rtype));
        q.set_recursion_desired(true);
        // RFC 6840 5.7: a query with AD set asks for the AD bit of the answer.
        q.set_authentic_data(true);
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        q.set_edns(edns);
        let bytes = q.to_vec().map_err(|e| DnsError::Temporary(e.to_string()))?;
        let tmp = |e: std::io::Error| DnsError::Temporary(format!("{server}: {e}"));
        let udp = async {
            let bind: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
                .parse()
                .map_err(|_| DnsError::Temporary("bind address".into()))?;
            let s = tokio::net::UdpSocket::bind(bind).await.map_err(tmp)?;
            s.connect(server).await.map_err(tmp)?;
            s.send(&bytes).await.map_err(tmp)?;
            let mut buf = vec![0u8; 4096];
            loop {
                let n = s.recv(&mut buf).await.map_err(tmp)?;
                match Message::from_vec(buf.get(..n).unwrap_or_default()) {
                    Ok(m) if m.id() == q.id() && m.message_type() == MessageType::Response => return Ok(m),
                    // another answer on the port, or garbage: wait for ours
                    _ => continue,
                }
            }
        };
        let m = match timeout(self.timeout, udp).await {
            Ok(r) => r?,
            Err(_) => return Err(DnsError::Temporary(format!("{server}: timed out"))),
        };
        if !m.truncated() {
            return Ok(m);
        }
        let tcp = async {
            let mut s = tokio::net::TcpStream::connect(server).await.map_err(tmp)?;
            let len = u16::try_from(bytes.len()).map_err(|_| DnsError::Temporary("query too long".into()))?;
            s.write_all(&len.to_be_bytes()).await.map_err(tmp)?;
            s.write_all(&bytes).await.map_err(tmp)?;
            let mut l = [0u8; 2];
            s.read_exact(&mut l).await.map_err(tmp)?;
            let mut buf = vec![0u8; u16::from_be_bytes(l) as usize];
            s.read_exact(&mut buf).await.map_err(tmp)?;
            let m = Message::from_vec(&buf).map_err(|e| DnsError::Temporary(format!("{server}: {e}")))?;
            if m.id() != q.id() {
                return Err(DnsError::Temporary(format!("{server}: answer to another query")));
            }
            Ok(m)
        };
        match timeout(self.timeout, tcp).await {
            Ok(r) => r,
            Err(_) => Err(DnsError::Temporary(format!("{server}: timed out over TCP"))),
        }
    }
}

fn answer(m: Message, rtype: RecordType) -> Result<SecureAnswer, DnsError> {
    match m.response_code() {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => return Err(DnsError::NotFound),
        ResponseCode::ServFail => {
            return Err(DnsError::Temporary("SERVFAIL (a DNSSEC-bogus answer or a failed lookup)".into()))
        }
        c => return Err(DnsError::Temporary(format!("answer {c}"))),
    }
    let secure = m.authentic_data();
    let records: Vec<Record> = m.answers().iter().filter(|r| r.record_type() == rtype).cloned().collect();
    if records.is_empty() {
        return Err(DnsError::NoData);
    }
    Ok(SecureAnswer { secure, records })
}

/// One TLSA record (RFC 6698).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Tlsa {
    /// Certificate usage: 2 DANE-TA, 3 DANE-EE (0 and 1 are unusable for SMTP).
    pub usage: u8,
    /// 0 the whole certificate, 1 its SubjectPublicKeyInfo.
    pub selector: u8,
    /// 0 exact, 1 SHA-256, 2 SHA-512.
    pub matching: u8,
    /// The association data.
    pub data: Vec<u8>,
}

impl Tlsa {
    /// RFC 7672 section 3.1: only DANE-TA and DANE-EE, with the selectors and matching
    /// types RFC 6698 defines.
    pub fn usable(&self) -> bool {
        matches!(self.usage, 2 | 3) && matches!(self.selector, 0 | 1) && matches!(self.matching, 0..=2)
    }

    /// Whether `cert` is the certificate (or holds the key) this record names.
    pub fn matches(&self, cert: &CertificateDer<'_>) -> bool {
        let selected: Vec<u8> = match self.selector {
            0 => cert.as_ref().to_vec(),
            1 => match webpki::anchor_from_trusted_cert(cert) {
                Ok(ta) => webpki::spki_for_anchor(&ta).as_ref().to_vec(),
                Err(_) => return false,
            },
            _ => return false,
        };
        match self.matching {
            0 => selected == self.data,
            1 => sha2::Sha256::digest(&selected).as_slice() == self.data.as_slice(),
            2 => sha2::Sha512::digest(&selected).as_slice() == self.data.as_slice(),
            _ => false,
        }
    }

    /// `3 1 1 ab12...` as the zone file writes it.
    pub fn text(&self) -> String {
        let hex: String = self.data.iter().map(|b| format!("{b:02x}")).collect();
        format!("{} {} {} {hex}", self.usage, self.selector, self.matching)
    }
}

fn tlsa_of(r: &Record) -> Option<Tlsa> {
    match r.data() {
        RData::TLSA(t) => Some(Tlsa {
            usage: u8::from(t.cert_usage()),
            selector: u8::from(t.selector()),
            matching: u8::from(t.matching()),
            data: t.cert_data().to_vec(),
        }),
        _ => None,
    }
}

/// What DANE says about one next-hop host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostDane {
    /// Secure, usable TLSA records: TLS is mandatory and authenticated by them.
    Records(Vec<Tlsa>),
    /// A secure TLSA RRset none of whose records is usable: TLS is mandatory, not authenticated.
    Unusable(Vec<Tlsa>),
    /// No DANE for this host (insecure address or TLSA records, or none published).
    NotApplicable,
    /// The TLSA lookup failed (a bogus answer, SERVFAIL, a time-out): the host is not used.
    Failed(String),
}

/// RFC 7672 section 2.2: the TLSA records of `_PORT._tcp.HOST`, looked up only when the
/// host's address records are secure.
pub async fn host_tlsa(dns: &SecureDns, host: &str, port: u16) -> HostDane {
    let addr = match dns.query(host, RecordType::A).await {
        Err(DnsError::NoData) => dns.query(host, RecordType::AAAA).await,
        r => r,
    };
    match addr {
        Ok(a) if a.secure => {}
        Ok(_) | Err(DnsError::NotFound) | Err(DnsError::NoData) => return HostDane::NotApplicable,
        Err(DnsError::Temporary(e)) => return HostDane::Failed(format!("address lookup of {host}: {e}")),
    }
    let name = format!("_{port}._tcp.{}", host.trim_end_matches('.'));
    match dns.query(&name, RecordType::TLSA).await {
        Ok(a) if a.secure => {
            let all: Vec<Tlsa> = a.records.iter().filter_map(tlsa_of).collect();
            let usable: Vec<Tlsa> = all.iter().filter(|t| t.usable()).cloned().collect();
            if usable.is_empty() {
                HostDane::Unusable(all)
            } else {
                HostDane::Records(usable)
            }
        }
        Ok(_) | Err(DnsError::NotFound) | Err(DnsError::NoData) => HostDane::NotApplicable,
        Err(DnsError::Temporary(e)) => HostDane::Failed(format!("TLSA lookup of {name}: {e}")),
    }
}

/// Whether `domain`'s MX records are DNSSEC-validated: DANE applies to MX hosts only when
/// they are (RFC 7672 section 2.2.1). `Err` when the lookup failed (bogus included).
pub async fn mx_secure(dns: &SecureDns, domain: &str) -> Result<bool, String> {
    match dns.query(domain, RecordType::MX).await {
        Ok(a) => Ok(a.secure),
        // no MX: the domain is its own implicit MX; its address records decide (host_tlsa)
        Err(DnsError::NoData) => Ok(true),
        Err(DnsError::NotFound) => Ok(false),
        Err(DnsError::Temporary(e)) => Err(format!("MX lookup of {domain}: {e}")),
    }
}

/// The handshake-signature half of a rustls `ServerCertVerifier`, the same for every
/// verifier here (the unverified `may`, MTA-STS `testing`, DANE): the signatures are
/// checked with the crypto provider held in field `$p`, whatever the certificate check was.
macro_rules! handshake_signatures {
    ($p:tt) => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.$p.signature_verification_algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.$p.signature_verification_algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.$p.signature_verification_algorithms.supported_schemes()
        }
    };
}
pub(crate) use handshake_signatures;

/// The rustls verifier of a DANE-authenticated session.
#[derive(Debug)]
pub struct DaneVerifier {
    records: Vec<Tlsa>,
    /// Reference identifiers for DANE-TA: the MX host name, then the next-hop domain.
    names: Vec<String>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl DaneVerifier {
    /// A verifier for `records` (usable ones) and the names a DANE-TA chain must be for.
    pub fn new(records: Vec<Tlsa>, names: Vec<String>, provider: Arc<rustls::crypto::CryptoProvider>) -> Self {
        DaneVerifier { records, names, provider }
    }

    fn ta_verified(
        &self,
        anchor: &CertificateDer<'_>,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(anchor.clone().into_owned()).map_err(|e| e.to_string())?;
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| e.to_string())?;
        let mut last = String::from("no reference name");
        for n in &self.names {
            let Ok(sn) = ServerName::try_from(n.trim_end_matches('.').to_string()) else { continue };
            match v.verify_server_cert(end_entity, intermediates, &sn, &[], now) {
                Ok(_) => return Ok(()),
                Err(e) => last = format!("{n}: {e}"),
            }
        }
        Err(last)
    }
}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // DANE-EE: the key or certificate itself; no name, no dates (RFC 7672 3.1.1).
        if self.records.iter().any(|r| r.usage == 3 && r.matches(end_entity)) {
            return Ok(ServerCertVerified::assertion());
        }
        // DANE-TA: a certificate the server sent anchors the chain (RFC 7672 3.1.2).
        let mut why = String::new();
        for r in self.records.iter().filter(|r| r.usage == 2) {
            for c in intermediates.iter().chain(std::iter::once(end_entity)) {
                if r.matches(c) {
                    match self.ta_verified(c, end_entity, intermediates, now) {
                        Ok(()) => return Ok(ServerCertVerified::assertion()),
                        Err(e) => why = format!(": the DANE-TA chain does not verify ({e})"),
                    }
                }
            }
        }
        Err(rustls::Error::General(format!("no TLSA record matches the certificate chain{why}")))
    }

    handshake_signatures!(provider);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert() -> CertificateDer<'static> {
        let ck = rcgen::generate_simple_self_signed(vec!["mx.example".to_string()]).expect("cert");
        ck.cert.der().clone()
    }

    #[test]
    fn tlsa_records_match_by_certificate_and_key_with_each_matching_type() {
        let c = cert();
        let spki = webpki::spki_for_anchor(&webpki::anchor_from_trusted_cert(&c).expect("ta")).as_ref().to_vec();
        let rec = |selector, matching, data: Vec<u8>| Tlsa { usage: 3, selector, matching, data };
        assert!(rec(0, 0, c.as_ref().to_vec()).matches(&c));
        assert!(rec(0, 1, sha2::Sha256::digest(c.as_ref()).to_vec()).matches(&c));
        assert!(rec(0, 2, sha2::Sha512::digest(c.as_ref()).to_vec()).matches(&c));
        assert!(rec(1, 0, spki.clone()).matches(&c));
        assert!(rec(1, 1, sha2::Sha256::digest(&spki).to_vec()).matches(&c));
        assert!(rec(1, 2, sha2::Sha512::digest(&spki).to_vec()).matches(&c));
        assert!(!rec(1, 1, vec![0; 32]).matches(&c));
        assert!(!rec(1, 1, sha2::Sha256::digest(&spki).to_vec()).matches(&cert()), "another key");
        assert!(!rec(2, 1, vec![]).matches(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])), "garbage");
        assert!(!Tlsa { usage: 1, selector: 1, matching: 1, data: vec![] }.usable());
        assert!(!Tlsa { usage: 3, selector: 1, matching: 3, data: vec![] }.usable());
        assert!(Tlsa { usage: 2, selector: 0, matching: 2, data: vec![] }.usable());
    }
}
