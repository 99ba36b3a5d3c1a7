//! The daemon's side of the before-queue filter (`proxy_filter`, spec/language.md
//! section 5.2.1): for each message a listener with a filter accepted, one connection to
//! the filter (TCP or a unix socket), driven by the engine's sans-IO
//! [`mailpolicy_engine::before_queue::FilterSession`], the connect and every read and
//! write under `proxy_filter_timeout`. What the outcome means for the client is `Conn`'s
//! ([`mailpolicy_engine::conn::Conn::proxied`]); this file only moves bytes and logs.

use std::time::Duration;

use mailpolicy_engine::before_queue::{FilterCall, FilterOutcome, FilterSession};

use crate::milter::{connect, Sock};
use crate::Shared;

/// Hands `call`'s message to the filter and returns how that went. `whole` is the message
/// read back from its spill file when part of it is on disk (`call.message.tail > 0`).
pub(crate) async fn filter(
    shared: &Shared,
    helo_name: &str,
    timeout: Duration,
    session: &str,
    call: &FilterCall,
    whole: Option<Vec<u8>>,
) -> FilterOutcome {
    let data = match whole {
        Some(w) => Some(w),
        None if call.message.tail == 0 => Some(call.message.data.clone()),
        None => None,
    };
    let outcome = match data {
        Some(data) => talk(helo_name, timeout, call, data).await,
        None => FilterOutcome::Failed("the part of the message spilled to disk could not be read".into()),
    };
    let (status, detail) = match &outcome {
        FilterOutcome::Replied(r) => (if r.is_positive() { "accepted" } else { "refused" }, r.to_string()),
        FilterOutcome::Failed(why) => ("failed", why.clone()),
    };
    let rcpts: Vec<&str> = call.message.recipients.iter().map(|r| r.address.as_str()).collect();
    shared.log.event(
        "proxy-filter",
        &[
            ("session", session),
            ("filter", &call.address),
            ("from", &call.message.sender),
            ("to", &rcpts.join(",")),
            ("status", status),
            ("reply", &detail),
        ],
    );
    outcome
}

async fn talk(helo_name: &str, timeout: Duration, call: &FilterCall, data: Vec<u8>) -> FilterOutcome {
    let mut sock = match tokio::time::timeout(timeout, connect(&call.address)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return FilterOutcome::Failed(e),
        Err(_) => return FilterOutcome::Failed(format!("connect {}: timed out", call.address)),
    };
    let mut s = FilterSession::new(helo_name, call, data);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while let Some(b) = s.poll_transmit() {
            if !matches!(tokio::time::timeout(timeout, sock.write_all(&b)).await, Ok(Ok(()))) {
                s.handle_eof();
            }
        }
        if let Some(o) = s.outcome() {
            let o = o.clone();
            // The QUIT goes out; its reply is not waited for.
            if let Some(b) = s.poll_transmit() {
                let _ = tokio::time::timeout(Duration::from_secs(1), sock.write_all(&b)).await;
            }
            close(sock).await;
            return o;
        }
        match tokio::time::timeout(timeout, sock.read(&mut buf)).await {
            Err(_) => s.handle_timeout(),
            Ok(Ok(0)) | Ok(Err(_)) => s.handle_eof(),
            Ok(Ok(n)) => s.handle_input(buf.get(..n).unwrap_or_default()),
        }
    }
}

async fn close(sock: Sock) {
    use tokio::io::AsyncWriteExt;
    let _ = match sock {
        Sock::Tcp(mut t) => tokio::time::timeout(Duration::from_secs(1), t.shutdown()).await,
        Sock::Unix(mut u) => tokio::time::timeout(Duration::from_secs(1), u.shutdown()).await,
    };
}
