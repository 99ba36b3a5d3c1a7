//! The mailing lists' web endpoint (R11, spec/language.md 4.9): a `listener NAME {
//! protocol http; }` serving, under the path of each list's `web` URL,
//!
//! | Request | Does |
//! |---|---|
//! | `POST /unsubscribe?list=L&t=TOKEN` | RFC 8058 one-click (body `List-Unsubscribe=One-Click`) or the page's button: removes the token's subscriber; 200, or 403 for a token that does not verify |
//! | `GET /unsubscribe?list=L&t=TOKEN` | a page with that button (a GET never changes anything: link scanners follow links) |
//! | `GET /subscribe?list=L` | a form asking for an address |
//! | `POST /subscribe` (`list`, `address`) | sends the confirmation mail (double opt-in); 200 whatever the address, so nobody learns who is subscribed; 429 when asked again for the same address within 10 minutes |
//! | `GET /confirm?list=L&t=TOKEN` | a page with a confirm button |
//! | `POST /confirm?list=L&t=TOKEN` | adds the token's address; 403 for a bad token, 410 for an expired one |
//!
//! Plain HTTP (behind a TLS-terminating proxy) or HTTPS with `tls required` (the listener's
//! `cert`/`key`, else a self-signed pair). HTTP/1.1 requests are read with httparse: head
//! at most 16 KiB, body at most 16 KiB, 10 seconds per request, one request per connection,
//! 64 connections at once. The HTTP handling is this module alone ([`answer`] maps a parsed
//! request to a response); the admin listener mounts it with `server { admin_lists true; }`
//! ([`Mount::Admin`]: `GET /metrics` stays the metrics, every other request is the lists').

use std::sync::Arc;
use std::time::Duration;

use mailpolicy_stdlib::listtoken::{self, Check};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::lists::{self, Manager};

const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 16 * 1024;
const REQUEST_TIME: Duration = Duration::from_secs(10);
const MAX_CONNECTIONS: usize = 64;
/// How long before a confirmation for the same list and address is sent again.
const RESEND_MS: u64 = 10 * 60 * 1000;

/// A parsed request.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// The path without the query.
    pub path: String,
    /// Query and (for POST) form parameters, the query's first.
    pub params: Vec<(String, String)>,
}

impl Request {
    fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

fn page(status: u16, title: &str, body_html: &str) -> Response {
    Response {
        status,
        content_type: "text/html; charset=utf-8",
        body: format!(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><meta name=\"robots\" content=\"noindex\"><title>{t}</title></head>\n<body><h1>{t}</h1>\n{body_html}\n</body></html>\n",
            t = esc(title)
        ),
    }
}

fn form_button(action: &str, hidden: &[(&str, &str)], label: &str) -> String {
    let inputs: String = hidden
        .iter()
        .map(|(k, v)| format!("<input type=\"hidden\" name=\"{}\" value=\"{}\">", esc(k), esc(v)))
        .collect();
    format!(
        "<form method=\"post\" action=\"{}\">{inputs}<button type=\"submit\">{}</button></form>",
        esc(action),
        esc(label)
    )
}

/// State the endpoint keeps: when a confirmation was last sent for (list, address).
#[derive(Default)]
pub struct Web {
    sent: std::sync::Mutex<std::collections::HashMap<(String, String), u64>>,
}

impl Web {
    /// True when a confirmation for this list and address may be sent now (and notes it).
    fn may_send(&self, list: &str, address: &str, now: u64) -> bool {
        let mut m = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() > 100_000 {
            m.retain(|_, t| now.saturating_sub(*t) < RESEND_MS);
        }
        let key = (list.to_ascii_lowercase(), address.to_ascii_lowercase());
        if m.get(&key).is_some_and(|t| now.saturating_sub(*t) < RESEND_MS) {
            return false;
        }
        m.insert(key, now);
        true
    }
}

/// The path under a list's `web` URL: `/lists/unsubscribe` for `https://x/lists` is
/// `/unsubscribe`; a request without that prefix (a proxy that strips it) is taken as it is.
fn endpoint(path: &str, web: &str) -> String {
    let prefix = web.split_once("://").map(|(_, r)| r).and_then(|r| r.find('/').map(|i| &r[i..])).unwrap_or("");
    let prefix = prefix.trim_end_matches('/');
    match path.strip_prefix(prefix) {
        Some(rest) if !prefix.is_empty() && (rest.is_empty() || rest.starts_with('/')) => rest.to_string(),
        _ => path.to_string(),
    }
}

/// Answer one request (the HTTP handling without the socket).
pub async fn answer(web: &Web, mgr: &Manager, req: &Request) -> Response {
    let prog = mgr.shared.program();
    let lookups = mgr.shared.lookups();
    let list_name = req.param("list").unwrap_or("");
    let Some(list) = lists::by_name(&prog, &lookups, list_name) else {
        return page(404, "No such list", "<p>There is no mailing list by that name here.</p>");
    };
    let action = endpoint(&req.path, &list.web);
    let desc = esc(&list.description);
    let now = crate::now_ms();
    match (req.method.as_str(), action.trim_end_matches('/')) {
        (m @ ("GET" | "POST"), "/unsubscribe") => {
            let token = req.param("t").unwrap_or("");
            let address = match listtoken::verify_unsubscribe(&list.name, token, &list.keys) {
                Check::Valid(a) => a,
                other => {
                    mgr.shared.log.event(
                        "list-web-refused",
                        &[("list", &list.name), ("action", "unsubscribe"), ("why", &format!("{other:?}"))],
                    );
                    return page(403, "Invalid link", "<p>This unsubscribe link is not valid.</p>");
                }
            };
            if m == "GET" {
                let target = format!("{}?list={}&t={}", req.path, list.name, token);
                return page(
                    200,
                    &format!("Unsubscribe from {}", list.description),
                    &format!(
                        "<p>Stop sending {desc} to {}?</p>{}",
                        esc(&address),
                        form_button(&target, &[("List-Unsubscribe", "One-Click")], "Unsubscribe")
                    ),
                );
            }
            match mgr.unsubscribe(&list, &address, "web").await {
                Ok(_) => page(200, "Unsubscribed", &format!("<p>{} will get no more mail from {desc}.</p>", esc(&address))),
                Err(e) => {
                    mgr.shared.log.event("list-web-failed", &[("list", &list.name), ("error", &e)]);
                    page(503, "Try again later", "<p>The list cannot be changed right now. Please try again later.</p>")
                }
            }
        }
        ("GET", "/subscribe") => page(
            200,
            &format!("Subscribe to {}", list.description),
            &format!(
                "<form method=\"post\" action=\"{}\"><input type=\"hidden\" name=\"list\" value=\"{}\"><label>Your address <input type=\"email\" name=\"address\" required></label> <button type=\"submit\">Subscribe</button></form><p>We will send you a mail to confirm.</p>",
                esc(&req.path),
                esc(&list.name)
            ),
        ),
        ("POST", "/subscribe") => {
            let address = req.param("address").unwrap_or("").trim().to_ascii_lowercase();
            let valid = address.contains('@')
                && address.len() <= 254
                && crate::smtp::parse_forward_path(&format!("<{address}>"), true).is_ok()
                && lists::service(&prog, &lookups, &address).is_none()
                && address != list.address;
            if !valid {
                return page(400, "Not an address", "<p>Please give a mail address such as name@example.org.</p>");
            }
            if !web.may_send(&list.name, &address, now) {
                return page(
                    429,
                    "Confirmation already sent",
                    "<p>A confirmation was sent to this address a few minutes ago; please look for it.</p>",
                );
            }
            match mgr.ask_confirmation(&list, &address) {
                Ok(_) => page(
                    200,
                    "Check your mailbox",
                    &format!("<p>We sent a confirmation to {}. Open its link to subscribe to {desc}.</p>", esc(&address)),
                ),
                Err(e) => {
                    mgr.shared.log.event("list-web-failed", &[("list", &list.name), ("error", &e)]);
                    page(503, "Try again later", "<p>The confirmation could not be sent. Please try again later.</p>")
                }
            }
        }
        (m @ ("GET" | "POST"), "/confirm") => {
            let token = req.param("t").unwrap_or("");
            let address = match listtoken::verify_confirm(&list.name, token, &list.keys, now / 1000) {
                Check::Valid(a) => a,
                Check::Expired => {
                    return page(410, "Link expired", "<p>This confirmation link has expired. Please subscribe again.</p>")
                }
                other => {
                    mgr.shared.log.event(
                        "list-web-refused",
                        &[("list", &list.name), ("action", "confirm"), ("why", &format!("{other:?}"))],
                    );
                    return page(403, "Invalid link", "<p>This confirmation link is not valid.</p>");
                }
            };
            if m == "GET" {
                let target = format!("{}?list={}&t={}", req.path, list.name, token);
                return page(
                    200,
                    &format!("Confirm your subscription to {}", list.description),
                    &format!("<p>Subscribe {} to {desc}?</p>{}", esc(&address), form_button(&target, &[], "Confirm")),
                );
            }
            match mgr.subscribe(&list, &address).await {
                Ok(_) => page(200, "Subscribed", &format!("<p>{} is subscribed to {desc}.</p>", esc(&address))),
                Err(e) => {
                    mgr.shared.log.event("list-web-failed", &[("list", &list.name), ("error", &e)]);
                    page(503, "Try again later", "<p>The list cannot be changed right now. Please try again later.</p>")
                }
            }
        }
        (_, "/unsubscribe" | "/subscribe" | "/confirm") => page(405, "Method not allowed", "<p>GET or POST.</p>"),
        _ => page(404, "Not found", "<p>Nothing here.</p>"),
    }
}

fn parse_pairs(s: &[u8], out: &mut Vec<(String, String)>) {
    for (k, v) in form_urlencoded::parse(s) {
        if out.len() >= 32 {
            break;
        }
        out.push((k.into_owned(), v.into_owned()));
    }
}

/// Read and parse one request from `io`: Err(status) for what cannot be answered.
async fn read_request<S: AsyncRead + Unpin>(io: &mut S) -> Result<Request, u16> {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    loop {
        let n = io.read(&mut chunk).await.map_err(|_| 400u16)?;
        if n == 0 {
            return Err(400);
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
        let mut headers = [httparse::EMPTY_HEADER; 48];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let method = req.method.unwrap_or("").to_string();
                let target = req.path.unwrap_or("/").to_string();
                let len = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                let form = req.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("content-type")
                        && std::str::from_utf8(h.value).is_ok_and(|v| {
                            v.trim().to_ascii_lowercase().starts_with("application/x-www-form-urlencoded")
                        })
                });
                if len > MAX_BODY {
                    return Err(413);
                }
                let mut body = buf.get(head_len..).unwrap_or(&[]).to_vec();
                while body.len() < len {
                    let n = io.read(&mut chunk).await.map_err(|_| 400u16)?;
                    if n == 0 {
                        return Err(400);
                    }
                    body.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
                }
                body.truncate(len);
                let (path, query) = match target.split_once('?') {
                    Some((p, q)) => (p.to_string(), q.to_string()),
                    None => (target.clone(), String::new()),
                };
                let mut params = Vec::new();
                parse_pairs(query.as_bytes(), &mut params);
                if method == "POST" && (form || !body.is_empty()) {
                    parse_pairs(&body, &mut params);
                }
                return Ok(Request { method, path, params });
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => return Err(413),
            Err(_) => return Err(400),
        }
    }
}

async fn write_response<S: AsyncWrite + Unpin>(io: &mut S, r: &Response, head_only: bool) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    io.write_all(head.as_bytes()).await?;
    if !head_only {
        io.write_all(r.body.as_bytes()).await?;
    }
    io.flush().await?;
    io.shutdown().await
}

/// What an HTTP listener serves besides the lists' endpoint.
#[derive(Clone)]
pub enum Mount {
    /// Nothing: a `protocol http` listener.
    Lists,
    /// The admin listener with `admin_lists` (spec/language.md 5.1): `GET /metrics` (the
    /// spool's queue gauges read from this spool) and `GET /` as `metrics.rs` answers them.
    Admin(Option<Arc<crate::spool::Spool>>),
}

/// The admin listener's own answers, when `req` is one of them.
async fn admin_answer(mount: &Mount, req: &Request) -> Option<Response> {
    let Mount::Admin(spool) = mount else { return None };
    if req.method != "GET" {
        return None;
    }
    match req.path.as_str() {
        "/metrics" => {
            let s = spool.clone();
            let text = tokio::task::spawn_blocking(move || crate::metrics::get().render(s.as_deref()))
                .await
                .unwrap_or_default();
            Some(Response {
                status: 200,
                content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body: text,
            })
        }
        "/" => Some(Response {
            status: 200,
            content_type: "text/plain; charset=utf-8",
            body: "mailpolicy admin: GET /metrics; the mailing lists' subscribe, confirm and unsubscribe\n".into(),
        }),
        _ => None,
    }
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin>(mut io: S, web: Arc<Web>, mgr: Manager, mount: Mount) {
    let done = tokio::time::timeout(REQUEST_TIME, async {
        let (resp, head) = match read_request(&mut io).await {
            Ok(req) => {
                let head = req.method == "HEAD";
                let req = if head { Request { method: "GET".into(), ..req } } else { req };
                match admin_answer(&mount, &req).await {
                    Some(r) => (r, head),
                    None => (answer(&web, &mgr, &req).await, head),
                }
            }
            Err(status) => (page(status, reason(status), ""), false),
        };
        let _ = write_response(&mut io, &resp, head).await;
    })
    .await;
    let _ = done;
}

/// Serve the endpoint on `sock` until shutdown; `tls` for HTTPS; `mount` what else.
pub async fn serve(
    mgr: Manager,
    name: String,
    sock: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mount: Mount,
) {
    let web = Arc::new(Web::default());
    let gate = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut stop = mgr.shared.shutdown.clone();
    loop {
        let (tcp, remote) = tokio::select! {
            r = sock.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let Ok(permit) = gate.clone().try_acquire_owned() else {
            mgr.shared.log.event(
                "refused",
                &[("listener", &name), ("client", &remote.ip().to_string()), ("reason", "too many connections")],
            );
            continue;
        };
        let (web, mgr, tls, mount) = (web.clone(), mgr.clone(), tls.clone(), mount.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                Some(acc) => {
                    if let Ok(Ok(s)) = tokio::time::timeout(REQUEST_TIME, acc.accept(tcp)).await {
                        connection(s, web, mgr, mount).await;
                    }
                }
                None => connection(tcp, web, mgr, mount).await,
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_found_under_the_web_urls_path() {
        assert_eq!(endpoint("/lists/unsubscribe", "https://x.example/lists"), "/unsubscribe");
        assert_eq!(endpoint("/lists/unsubscribe", "https://x.example/lists/"), "/unsubscribe");
        assert_eq!(endpoint("/unsubscribe", "https://x.example/lists"), "/unsubscribe");
        assert_eq!(endpoint("/listsx/unsubscribe", "https://x.example/lists"), "/listsx/unsubscribe");
        assert_eq!(endpoint("/unsubscribe", "https://x.example"), "/unsubscribe");
    }

    #[tokio::test]
    async fn requests_are_parsed_with_their_query_and_form() {
        let raw = b"POST /unsubscribe?list=news&t=1.abc.def HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 26\r\n\r\nList-Unsubscribe=One-Click";
        let mut io: &[u8] = raw;
        let r = read_request(&mut io).await.expect("parsed");
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/unsubscribe");
        assert_eq!(r.param("list"), Some("news"));
        assert_eq!(r.param("t"), Some("1.abc.def"));
        assert_eq!(r.param("List-Unsubscribe"), Some("One-Click"));
        let mut io: &[u8] = b"GARBAGE\r\n\r\n";
        assert_eq!(read_request(&mut io).await.err(), Some(400));
        let big = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        let mut io: &[u8] = big.as_bytes();
        assert_eq!(read_request(&mut io).await.err(), Some(413));
    }
}
