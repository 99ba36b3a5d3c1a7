//! PostgreSQL over TLS with rustls: the `url`'s `sslmode` and `sslrootcert` read as libpq
//! reads them, and a [`tokio_postgres::tls::MakeTlsConnect`] over tokio-rustls.
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | - |
//! | `allow`, `prefer` (default) | when the server offers it | not verified |
//! | `require` | always, or no connection | not verified; with `sslrootcert`, as `verify-ca` (libpq) |
//! | `verify-ca` | always | chained to `sslrootcert`, else to the system's trust store |
//! | `verify-full` | always | that, and issued for the host name (`host`; `hostaddr` only says where to connect) |
//!
//! tokio-postgres knows `disable`, `prefer` and `require` only: the other modes and
//! `sslrootcert` are taken out of the `url` by the checker (`mailpolicy_lang::resources::pg_url`,
//! which also refuses an unknown `sslmode`) and the rest is parsed by tokio-postgres, in
//! either form (`postgresql://...?sslmode=...` or `host=... sslmode=...`).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use mailpolicy_lang::resources::{PgUrl, SslMode};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, Config};

/// An error with its causes (tokio-postgres says "db error" and keeps the server's words,
/// or rustls's reason for refusing a certificate, in the source).
/// A driver error with what the server said (`db error` alone tells an operator nothing:
/// "FATAL: no pg_hba.conf entry ...", "ERROR: relation \"users\" does not exist").
pub fn chain(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Opens a connection for `url` (with `password` when the table has one) and drives it in a
/// task of its own; a relative `sslrootcert` is read from `dir`.
pub async fn connect(dsn: &PgUrl, password: Option<&str>, dir: Option<&Path>) -> Result<Client, String> {
    let mut config: Config = dsn.rest.parse().map_err(|e| format!("url: {e}"))?;
    if let Some(pw) = password {
        config.password(pw);
    }
    config.ssl_mode(match dsn.mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        _ => tokio_postgres::config::SslMode::Require,
    });
    if dsn.mode == SslMode::Disable {
        let (client, connection) =
            config.connect(tokio_postgres::NoTls).await.map_err(|e| format!("connect: {}", chain(&e)))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        return Ok(client);
    }
    let roots = match &dsn.rootcert {
        Some(f) => {
            let p = PathBuf::from(f);
            let p = match dir {
                Some(d) if p.is_relative() => d.join(p),
                _ => p,
            };
            Some(crate::transport::driver::roots_from_pem(&p).map_err(|e| format!("sslrootcert: {e}"))?)
        }
        None => None,
    };
    let verify = match (dsn.mode, roots) {
        (SslMode::VerifyFull, r) => Verify::Full(r.unwrap_or_else(crate::transport::driver::system_roots)),
        (SslMode::VerifyCa, r) => Verify::Chain(r.unwrap_or_else(crate::transport::driver::system_roots)),
        // libpq: `require` with a root certificate file verifies as `verify-ca`.
        (SslMode::Require, Some(r)) => Verify::Chain(r),
        _ => Verify::Nothing,
    };
    let tls = RustlsConnect { config: Arc::new(client_config(verify).map_err(|e| format!("tls: {e}"))?) };
    let (client, connection) = config.connect(tls).await.map_err(|e| format!("connect: {}", chain(&e)))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

enum Verify {
    Nothing,
    /// The chain, not the name (`verify-ca`).
    Chain(Arc<rustls::RootCertStore>),
    Full(Arc<rustls::RootCertStore>),
}

fn client_config(verify: Verify) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder =
        rustls::ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    Ok(match verify {
        Verify::Full(roots) => builder.with_root_certificates(roots),
        Verify::Chain(roots) => {
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
            builder.dangerous().with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
        }
        Verify::Nothing => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(crate::transport::driver::NoVerify::new(provider))),
    }
    .with_no_client_auth())
}

/// `verify-ca`: the web PKI's verdict on the chain, whatever name the certificate is for.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(NotValidForName | NotValidForNameContext { .. })) => {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// tokio-postgres's TLS hook over tokio-rustls.
#[derive(Clone)]
struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
}

struct RustlsConnector {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl<S> MakeTlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnector;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnector, Self::Error> {
        let name = ServerName::try_from(domain.to_string())?;
        Ok(RustlsConnector { config: self.config.clone(), name })
    }
}

impl<S> TlsConnect<S> for RustlsConnector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let c = tokio_rustls::TlsConnector::from(self.config);
        Box::pin(async move { c.connect(self.name, stream).await.map(|s| RustlsStream(Box::new(s))) })
    }
}

/// A TLS session to the database.
pub struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    /// No `tls-server-end-point` binding: SCRAM's `channel_binding=prefer` (the default)
    /// goes on without it; `require` is refused by the connection.
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}
