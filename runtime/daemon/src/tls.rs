//! Server-side TLS: certificates from the listener's files, or a self-signed pair made at
//! first start (kept under the spool's `tls/` folder so restarts reuse it).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut data.as_slice()).collect();
    let certs = certs.map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate", path.display()));
    }
    Ok(certs)
}

pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| format!("{}: {e}", path.display()))?
        .ok_or_else(|| format!("{}: no PEM private key", path.display()))
}

/// Make (once) and return the paths of a self-signed certificate for `hostname`.
pub fn self_signed(dir: &Path, hostname: &str) -> Result<(std::path::PathBuf, std::path::PathBuf), String> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let names = vec![hostname.to_string(), "localhost".to_string()];
    let ck = rcgen::generate_simple_self_signed(names).map_err(|e| format!("making a self-signed certificate: {e}"))?;
    std::fs::write(&cert, ck.cert.pem()).map_err(|e| format!("{}: {e}", cert.display()))?;
    write_private(&key, ck.key_pair.serialize_pem().as_bytes())?;
    Ok((cert, key))
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(data).map_err(|e| format!("{}: {e}", path.display()))
}

/// `client_ca`: verify client certificates against it (`require` = mandatory).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    require_client: bool,
) -> Result<Arc<ServerConfig>, String> {
    let certs = read_certs(cert)?;
    let key = read_key(key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs(ca)? {
                roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
            }
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let v = if require_client { v } else { v.allow_unauthenticated() };
            builder.with_client_cert_verifier(v.build().map_err(|e| e.to_string())?)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| format!("{}: {e}", cert.display()))?;
    Ok(Arc::new(config))
}

/// A client's configuration trusting only the certificates of `ca` (CAs, or a peer's own
/// self-signed certificate), names checked as the web PKI checks them.
pub fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(ca)? {
        roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Version and cipher names as logged and as `tls.version` / `tls.cipher` show them.
pub fn describe(conn: &rustls::ServerConnection) -> (String, String) {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(v) => format!("{v:?}"),
        None => String::new(),
    };
    let cipher = conn.negotiated_cipher_suite().map(|c| format!("{:?}", c.suite())).unwrap_or_default();
    (version, cipher)
}

#[cfg(test)]
mod tests {
    //! The backup channel's two ends (`backup_tls`, spec section 5.5): a client trusting
    //! only a peer's own self-signed certificate (pinned) completes a handshake with that
    //! peer, for a name the certificate is for, and with no other.
    use super::*;
    use mailpolicy_test_support::TempDir;

    async fn handshake(trusted: &Path, served: (&Path, &Path), name: &str) -> Result<(), String> {
        let server = tokio_rustls::TlsAcceptor::from(server_config(served.0, served.1, None, false)?);
        let client = tokio_rustls::TlsConnector::from(client_config(trusted)?);
        let (c, s) = tokio::io::duplex(64 * 1024);
        let name = rustls::pki_types::ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
        let (cr, sr) = tokio::join!(client.connect(name, c), server.accept(s));
        cr.map_err(|e| e.to_string())?;
        sr.map_err(|e| e.to_string())?;
        Ok(())
    }

    #[tokio::test]
    async fn a_pinned_self_signed_certificate_is_the_only_one_trusted() {
        let (a, b) = (TempDir::new("tls-pin-a"), TempDir::new("tls-pin-b"));
        let (ca, ka) = self_signed(a.path(), "mx-a.test").expect("pair a");
        let (cb, kb) = self_signed(b.path(), "mx-b.test").expect("pair b");
        handshake(&cb, (&cb, &kb), "mx-b.test").await.expect("the pinned peer");
        let wrong_name = handshake(&cb, (&cb, &kb), "mx-c.test").await;
        assert!(wrong_name.is_err(), "{wrong_name:?}");
        let other_peer = handshake(&cb, (&ca, &ka), "mx-a.test").await;
        assert!(other_peer.is_err(), "{other_peer:?}");
    }
}
