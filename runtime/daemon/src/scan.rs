//! Content scanners (R9, R24): SpamAssassin's spamd (the SPAMC/1.5 protocol) and
//! rspamd's HTTP API (`POST /checkv2`). Both return a score the policy reads with
//! `score NAME`. Every scan has a time-out; a scanner that is down or slow is an error
//! answer (4xx, or score 0 with `on_error continue`). Messages larger than `max_size` are
//! not scanned and score 0, as spamc does.

use mailpolicy_lang::ir::Resource;
use mailpolicy_lang::resources::Options;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::eval::{Answer, Facts};

/// Largest reply read from a scanner.
const MAX_REPLY: usize = 1 << 20;

/// Scan `message` with the declared scanner.
pub async fn scan(scanner: &Resource, message: &[u8], facts: &Facts) -> Answer {
    let Options::Scanner(opts) = &scanner.options else {
        return Answer::Error(format!("{} is a {}, not a content scanner", scanner.name, scanner.kind));
    };
    if message.len() as u64 > opts.max_size {
        return Answer::Score(0.0);
    }
    let source = scanner.source.clone().unwrap_or_default();
    let fut = async {
        match scanner.kind.as_str() {
            "spamd" => spamd(&source, message).await,
            "rspamd" => rspamd(&source, message, facts).await,
            other => Err(format!("unknown scanner kind {other}")),
        }
    };
    match tokio::time::timeout(opts.timeout, fut).await {
        Ok(Ok(score)) => Answer::Score(score),
        Ok(Err(e)) => Answer::Error(format!("scanner {}: {e}", scanner.name)),
        Err(_) => Answer::Timeout,
    }
}

async fn read_all(s: &mut TcpStream) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
        if out.len() > MAX_REPLY {
            return Err("reply too large".into());
        }
    }
}

/// SPAMC/1.5 `CHECK`: the reply's `Spam: True ; 15.2 / 5.0` header carries the score.
pub async fn spamd(addr: &str, message: &[u8]) -> Result<f64, String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
    let head = format!("CHECK SPAMC/1.5\r\nContent-length: {}\r\n\r\n", message.len());
    s.write_all(head.as_bytes()).await.map_err(|e| e.to_string())?;
    s.write_all(message).await.map_err(|e| e.to_string())?;
    s.shutdown().await.map_err(|e| e.to_string())?;
    let reply = read_all(&mut s).await?;
    parse_spamd(&String::from_utf8_lossy(&reply))
}

pub fn parse_spamd(reply: &str) -> Result<f64, String> {
    let mut lines = reply.lines();
    let status = lines.next().unwrap_or("");
    let mut parts = status.split_whitespace();
    if !parts.next().unwrap_or("").starts_with("SPAMD/") {
        return Err(format!("not a spamd reply: {status:?}"));
    }
    if parts.next() != Some("0") {
        return Err(format!("spamd error: {status}"));
    }
    for l in lines {
        if let Some(v) = l.strip_prefix("Spam:") {
            let score = v.split(';').nth(1).and_then(|x| x.split('/').next()).map(str::trim);
            return score.and_then(|x| x.parse().ok()).ok_or_else(|| format!("bad Spam header: {l:?}"));
        }
        if l.is_empty() {
            break;
        }
    }
    Err("spamd reply without a Spam header".into())
}

/// rspamd `POST /checkv2` with the envelope in headers; the JSON reply's `score`.
pub async fn rspamd(url: &str, message: &[u8], f: &Facts) -> Result<f64, String> {
    let rest = url.strip_prefix("http://").ok_or("rspamd needs an http:// URL")?;
    let (hostport, path) = match rest.split_once('/') {
        Some((h, p)) => (h, format!("/{p}")),
        None => (rest, "/checkv2".to_string()),
    };
    let path = if path == "/" { "/checkv2".to_string() } else { path };
    let mut s = TcpStream::connect(hostport).await.map_err(|e| format!("connect {hostport}: {e}"))?;
    let clean = |v: &str| v.chars().filter(|c| !c.is_control()).collect::<String>();
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\nContent-Length: {}\r\nIP: {}\r\n",
        message.len(),
        f.client_ip
    );
    if let Some((h, _)) = &f.helo {
        head.push_str(&format!("Helo: {}\r\n", clean(h)));
    }
    if let Some(from) = &f.sender {
        head.push_str(&format!("From: {}\r\n", clean(from)));
    }
    for r in &f.recipients {
        head.push_str(&format!("Rcpt: {}\r\n", clean(r)));
    }
    if let Some((u, _)) = &f.auth {
        head.push_str(&format!("User: {}\r\n", clean(u)));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.map_err(|e| e.to_string())?;
    s.write_all(message).await.map_err(|e| e.to_string())?;
    let reply = read_all(&mut s).await?;
    parse_rspamd(&reply)
}

pub fn parse_rspamd(reply: &[u8]) -> Result<f64, String> {
    let text = String::from_utf8_lossy(reply);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP body")?;
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("rspamd answered {status:?}"));
    }
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
    let v: serde_json::Value = serde_json::from_str(body.trim()).map_err(|e| format!("rspamd JSON: {e}"))?;
    v.get("score").and_then(|s| s.as_f64()).ok_or_else(|| "rspamd reply without a score".into())
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || after.len() < n {
            break;
        }
        // `n` comes from the scanner: never slice a str where it says without checking.
        let (Some(chunk), Some(tail)) = (after.get(..n), after.get(n..)) else { break };
        out.push_str(chunk);
        rest = tail.strip_prefix("\r\n").unwrap_or(tail);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spamd_replies() {
        assert_eq!(
            parse_spamd("SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\nSpam: True ; 1000.0 / 5.0\r\n\r\n"),
            Ok(1000.0)
        );
        assert_eq!(parse_spamd("SPAMD/1.1 0 EX_OK\r\nSpam: False ; -0.1 / 5.0\r\n\r\n"), Ok(-0.1));
        assert!(parse_spamd("SPAMD/1.1 76 Bad header line\r\n\r\n").is_err());
        assert!(parse_spamd("HTTP/1.1 200 OK\r\n\r\n").is_err());
    }

    #[test]
    fn rspamd_replies() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"score\": 7.5, \"required_score\": 15, \"action\": \"add header\"}";
        assert_eq!(parse_rspamd(r), Ok(7.5));
        let c = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nd\r\n{\"score\": 2.0\r\n1\r\n}\r\n0\r\n\r\n";
        assert_eq!(parse_rspamd(c), Ok(2.0));
        assert!(parse_rspamd(b"HTTP/1.1 500 Oops\r\n\r\n{}").is_err());
    }

    /// A real round trip over TCP with a server speaking the spamd protocol.
    #[tokio::test]
    async fn spamd_over_tcp() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = Vec::new();
            s.read_to_end(&mut req).await.unwrap();
            let text = String::from_utf8_lossy(&req).to_string();
            let score = if text.contains("XJS*C4JDBQADN1") { "1000.0" } else { "0.5" };
            let reply = format!("SPAMD/1.1 0 EX_OK\r\nSpam: True ; {score} / 5.0\r\n\r\n");
            s.write_all(reply.as_bytes()).await.unwrap();
        });
        let gtube = b"Subject: x\r\n\r\nXJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\r\n";
        assert_eq!(spamd(&addr, gtube).await, Ok(1000.0));
    }
}
