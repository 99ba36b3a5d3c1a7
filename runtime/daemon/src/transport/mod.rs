//! Outbound transports and delivery status notifications.
//!
//! * [`client`]: the sans-IO SMTP/LMTP client engine (bytes in, bytes out,
//!   no socket, no clock), the outbound twin of [`crate::smtp`].
//! * [`driver`]: the tokio host of that engine. [`deliver`] sends one
//!   message to one [`Target`] and returns a [`DeliveryReport`] with one
//!   [`DeliveryOutcome`] per recipient; [`call_ahead`] asks a destination about a
//!   recipient (R27); [`ConnectionCache`] keeps sessions for reuse.
//! * [`mx`]: next-hop resolution (R33) through an injectable [`Resolver`]
//!   ([`HickoryResolver`] in the daemon, [`StaticResolver`] in tests).
//! * [`local`]: Maildir and mbox delivery (R35); LMTP is a [`Target`] of
//!   the driver.
//! * [`security`]: the TLS decision for each next hop under `:tls dane` and `:tls sts`,
//!   from [`dane`] (RFC 7672: TLSA records from the validating resolver, the rustls
//!   verifier) and [`sts`] (RFC 8461: the policy fetched over HTTPS, cached in the spool);
//!   [`tlsrpt`] records the sessions' results and makes the RFC 8460 reports.
//! * [`dsn`]: RFC 3464 reports ([`build_dsn`]) and the RFC 3461 rule for
//!   when one is owed ([`should_notify`]).
//!
//! The envelope type is the server engine's [`crate::smtp::Envelope`], so
//! DSN parameters received (NOTIFY, ORCPT, RET, ENVID) are passed on as they
//! came when the next hop offers DSN (R1).

pub use mailpolicy_engine::client;
pub mod dane;
pub mod driver;
pub mod dsn;
pub mod local;
pub mod mx;
pub mod security;
pub mod sts;
pub mod tlsrpt;

#[cfg(test)]
mod tests;

pub use client::{
    CallAheadResult, Client, ClientConfig, ClientEvent, Credentials, Phase, Protocol, ServerExtensions, SessionError,
    TlsPolicy, TransactionResult,
};
pub use driver::{
    call_ahead, deliver, ClientCert, Connection, ConnectionCache, DeliveryOptions, DeliveryOutcome, DeliveryReport,
    LmtpEndpoint, Target, Timeouts,
};
pub use dsn::{build_dsn, should_notify, Dsn, DsnAction, DsnRecipient, NoticeKind};
pub use mx::{resolve, Destination, DnsError, HickoryResolver, Hop, LocalIdentity, MxRecord, Resolver, StaticResolver};
