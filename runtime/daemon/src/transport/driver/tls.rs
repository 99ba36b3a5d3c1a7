//! TLS for the driver: the rustls verifiers of `may` (any certificate, signatures checked)
//! and of `sts testing` (verify, report, go on), the trust roots, the client configuration
//! of a hop's [`TlsDecision`] and the handshake under its time-out.

use super::*;

/// Accepts any certificate but still checks the handshake signatures, so
/// the session is encrypted to whoever holds the presented key (`may`).
#[derive(Debug)]
pub(crate) struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl NoVerify {
    pub(crate) fn new(provider: Arc<rustls::crypto::CryptoProvider>) -> NoVerify {
        NoVerify(provider)
    }
}

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    crate::transport::dane::handshake_signatures!(0);
}

/// MTA-STS `testing` (RFC 8461 section 5): the certificate is verified as under `enforce`,
/// but a failure is only noted (for the log and TLS-RPT) and the session goes on.
#[derive(Debug)]
struct ReportOnly {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    finding: Arc<Mutex<Option<String>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for ReportOnly {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if let Err(e) = self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            if let Ok(mut f) = self.finding.lock() {
                *f = Some(e.to_string());
            }
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    crate::transport::dane::handshake_signatures!(provider);
}

/// The system's trust store, as operators expect it (R10, R43): the CA certificates of
/// the OS (on Debian `/etc/ssl/certs`, with local CAs that `update-ca-certificates`
/// added), or those of `SSL_CERT_FILE` / `SSL_CERT_DIR` when set, as OpenSSL does. When the
/// system has none, the Mozilla roots built in. Read once.
pub fn system_roots() -> Arc<rustls::RootCertStore> {
    static ROOTS: std::sync::OnceLock<Arc<rustls::RootCertStore>> = std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut store = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                store = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
            }
            Arc::new(store)
        })
        .clone()
}

/// Trust roots from a PEM file of CA certificates (`:ca` on a transport, the server's
/// `tls_ca`): only these, as Postfix's `smtp_tls_CAfile` does.
pub fn roots_from_pem(path: &std::path::Path) -> Result<Arc<rustls::RootCertStore>, String> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut store = rustls::RootCertStore::empty();
    let mut reader = std::io::BufReader::new(&data[..]);
    for cert in rustls_pemfile::certs(&mut reader) {
        let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
        store.add(cert).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if store.is_empty() {
        return Err(format!("{}: no CA certificate in the file", path.display()));
    }
    Ok(Arc::new(store))
}

fn tls_config(
    decision: &TlsDecision,
    roots: Option<&Arc<rustls::RootCertStore>>,
    client_cert: Option<&ClientCert>,
    finding: &Arc<Mutex<Option<String>>>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder =
        rustls::ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let roots = || match roots {
        Some(r) => (**r).clone(),
        None => (*system_roots()).clone(),
    };
    let builder = match decision {
        TlsDecision::Fixed(TlsPolicy::Required) | TlsDecision::Sts { enforce: true } => {
            builder.with_root_certificates(roots())
        }
        TlsDecision::Fixed(TlsPolicy::May | TlsPolicy::None) | TlsDecision::DaneUnauthenticated => {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
        }
        TlsDecision::Dane { records, names } => builder.dangerous().with_custom_certificate_verifier(Arc::new(
            crate::transport::dane::DaneVerifier::new(records.clone(), names.clone(), provider),
        )),
        TlsDecision::Sts { enforce: false } => {
            let inner =
                rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots()), provider.clone())
                    .build()
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
            let v = ReportOnly { inner, finding: finding.clone(), provider };
            builder.dangerous().with_custom_certificate_verifier(Arc::new(v))
        }
    };
    match client_cert {
        Some(c) => builder.with_client_auth_cert(c.chain.clone(), c.key.clone_key()),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// Runs a client TLS handshake on `stream` for `name` (the certificate's name).
#[allow(clippy::too_many_arguments)]
pub(super) async fn handshake(
    stream: Box<dyn IoStream>,
    name: &str,
    label: &str,
    decision: &TlsDecision,
    roots: Option<&Arc<rustls::RootCertStore>>,
    client_cert: Option<&ClientCert>,
    finding: &Arc<Mutex<Option<String>>>,
    limit: Duration,
) -> Result<Box<dyn IoStream>, (bool, Reply)> {
    let cfg = tls_config(decision, roots, client_cert, finding)
        .map_err(|e| (false, Reply::new(451, (4, 7, 5), format!("TLS setup failed: {e}"))))?;
    let sn = rustls::pki_types::ServerName::try_from(name.to_string())
        .map_err(|e| (false, Reply::new(451, (4, 7, 5), format!("bad TLS server name: {e}"))))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    match timeout(limit, connector.connect(sn, stream)).await {
        Ok(Ok(s)) => Ok(Box::new(s)),
        Ok(Err(e)) => Err((true, Reply::new(451, (4, 7, 5), format!("TLS handshake with {label} failed: {e}")))),
        Err(_) => Err((true, Reply::new(451, (4, 7, 5), format!("TLS handshake with {label} timed out")))),
    }
}
