//! Opening a ready session: a cached one probed with RSET, or the destination's hops tried
//! in order (a failed greeting or session moving on to the next address, `may` retried in
//! clear once), the fallback relay after MX delivery failed temporarily, each hop's TLS
//! result for TLS-RPT; and handing a session back to the cache.

use super::*;

fn client_config(opts: &DeliveryOptions, protocol: Protocol, tls: TlsPolicy) -> ClientConfig {
    ClientConfig {
        helo_name: opts.helo_name.clone(),
        protocol,
        tls: if protocol == Protocol::Lmtp { TlsPolicy::None } else { tls },
        auth: if protocol == Protocol::Lmtp { None } else { opts.auth.clone() },
        pipelining: opts.pipelining,
        chunking: opts.chunking,
        all_recipients: false,
    }
}

async fn connect_tcp(
    hop: &Hop,
    opts: &DeliveryOptions,
    protocol: Protocol,
    decision: &TlsDecision,
) -> Result<Connection, Reply> {
    let tls = decision.engine_policy();
    let label = format!("{}[{}]:{}", hop.name, hop.addr.ip(), hop.addr.port());
    let s = match timeout(opts.timeouts.connect, tokio::net::TcpStream::connect(hop.addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(conn_reply(format!("connect to {label}: {e}"))),
        Err(_) => return Err(conn_reply(format!("connect to {label}: timed out"))),
    };
    let _ = s.set_nodelay(true);
    let cfg = client_config(opts, protocol, tls);
    if opts.implicit_tls && protocol == Protocol::Smtp {
        // RFC 8314: TLS first, verified; a failed handshake is never retried in clear.
        let finding = Arc::new(Mutex::new(None));
        let stream = handshake(
            Box::new(s),
            &hop.name,
            &label,
            &TlsDecision::Fixed(TlsPolicy::Required),
            opts.tls_roots.as_ref(),
            opts.client_cert.as_ref(),
            &finding,
            opts.timeouts.starttls,
        )
        .await
        .map_err(|(_, r)| r)?;
        let mut c = Connection::new_tls(stream, &hop.name, &label, cfg);
        c.tls = TlsDecision::Fixed(TlsPolicy::Required);
        return Ok(c);
    }
    let mut c = Connection::new(Box::new(s), &hop.name, &label, cfg);
    c.tls = decision.clone();
    c.tls_roots = opts.tls_roots.clone();
    c.client_cert = opts.client_cert.clone();
    Ok(c)
}

async fn connect_unix(path: &std::path::Path, opts: &DeliveryOptions) -> Result<Connection, Reply> {
    let label = path.display().to_string();
    let s = match timeout(opts.timeouts.connect, tokio::net::UnixStream::connect(path)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(conn_reply(format!("connect to {label}: {e}"))),
        Err(_) => return Err(conn_reply(format!("connect to {label}: timed out"))),
    };
    Ok(Connection::new(Box::new(s), "localhost", &label, client_config(opts, Protocol::Lmtp, TlsPolicy::None)))
}

/// A 5xx greeting is a deferral (next MX, retry later), as in Postfix.
fn pre_session_reply(e: SessionError, label: &str) -> Reply {
    if e.phase == Phase::Greeting && e.reply.code >= 500 {
        Reply::new(450, (4, 4, 0), format!("host {label} refused to talk to me: {}", e.reply))
    } else {
        e.reply
    }
}

/// Opens a ready session: from the cache (probed with RSET) or by trying
/// the destination's addresses in order.
pub(super) async fn open(
    kind: &'static str,
    endpoint: &Endpoint,
    opts: &DeliveryOptions,
) -> Result<(Connection, SessionKey), Reply> {
    let key = SessionKey::new(kind, endpoint.key(), opts);
    if let Some(cache) = &opts.cache {
        while let Some(mut c) = cache.take(&key) {
            if c.client.reset().is_ok() && c.wait_ready(&opts.timeouts).await.is_ok() {
                return Ok((c, key));
            }
        }
    }
    let protocol = if kind == "lmtp" { Protocol::Lmtp } else { Protocol::Smtp };
    match endpoint {
        Endpoint::Unix(p) => {
            let mut c = connect_unix(p, opts).await?;
            match c.wait_ready(&opts.timeouts).await {
                Ok(()) => Ok((c, key)),
                Err(e) => {
                    let label = c.label.clone();
                    c.close(&opts.timeouts).await;
                    Err(pre_session_reply(e, &label))
                }
            }
        }
        Endpoint::Net(dest) => {
            let first = match mx::resolve(opts.resolver.as_ref(), dest, &opts.local).await {
                Ok(hops) => match planned(dest, &hops, opts).await {
                    Ok(plan) => try_hops(&plan, opts, protocol).await,
                    Err(r) => Err(r),
                },
                Err(r) => Err(r),
            };
            let c = match (first, &opts.fallback) {
                (Ok(c), _) => c,
                // R33: MX delivery failed temporarily; the fallback relay is tried next.
                (Err(r), Some(fb)) if dest.mx && r.code < 500 && protocol == Protocol::Smtp => {
                    let hops = mx::resolve(opts.resolver.as_ref(), fb, &opts.local).await.map_err(|e| {
                        Reply::new(451, (4, 4, 1), format!("{}; fallback relay {fb}: {}", r.line(), e.line()))
                    })?;
                    let plan = planned(fb, &hops, opts).await?;
                    try_hops(&plan, opts, protocol).await.map_err(|e| {
                        Reply::new(
                            e.code,
                            e.enhanced.unwrap_or((4, 4, 1)),
                            format!("{}; fallback relay: {}", r.line(), e.text),
                        )
                    })?
                }
                (Err(r), _) => return Err(r),
            };
            Ok((c, key))
        }
    }
}

/// The TLS decision of each hop ([`security::plan`]).
async fn planned(dest: &Destination, hops: &[Hop], opts: &DeliveryOptions) -> Result<Vec<Planned>, Reply> {
    security::plan(opts.standards, opts.tls, opts.security.as_deref(), opts.resolver.as_ref(), dest, hops).await
}

/// Records a session's TLS result for TLS-RPT under the hop's policy, if it has one.
fn report_result(opts: &DeliveryOptions, p: &Planned, result: Result<(), String>) {
    let (Some(sec), Some(policy)) = (&opts.security, &p.report) else { return };
    let Some(rec) = &sec.report else { return };
    match (result, &p.finding) {
        (Ok(()), _) => rec.record(policy, Ok(&p.hop)),
        (Err(e), Some((kind, why))) if *why == e => rec.record(policy, Err((kind, &p.hop, e))),
        (Err(e), _) => rec.record(policy, Err((crate::transport::tlsrpt::result_type(&e), &p.hop, e))),
    }
}

/// Tries `hops` in order (at most [`DeliveryOptions::max_hops`]) until one gives a ready
/// session; the last failure otherwise.
async fn try_hops(hops: &[Planned], opts: &DeliveryOptions, protocol: Protocol) -> Result<Connection, Reply> {
    let mut last = conn_reply("no address to try".to_string());
    for p in hops.iter().take(opts.max_hops.max(1)) {
        let hop = &p.hop;
        let mut tls = p.tls.clone();
        loop {
            let mut c = match connect_tcp(hop, opts, protocol, &tls).await {
                Ok(c) => c,
                Err(r) => {
                    last = r;
                    break;
                }
            };
            match c.wait_ready(&opts.timeouts).await {
                Ok(()) => {
                    let finding = c.tls_finding.lock().ok().and_then(|f| f.clone());
                    let finding = p.finding.as_ref().map(|(_, why)| why.clone()).or(finding);
                    match (finding, c.client.tls_active()) {
                        (Some(f), _) => report_result(opts, p, Err(f)),
                        (None, true) => report_result(opts, p, Ok(())),
                        (None, false) if matches!(p.tls, TlsDecision::Sts { .. }) => {
                            report_result(opts, p, Err("STARTTLS not offered".into()))
                        }
                        (None, false) => report_result(opts, p, Ok(())),
                    }
                    return Ok(c);
                }
                Err(e) => {
                    let label = c.label.clone();
                    let tls_failure = c.tls_failed || e.phase == Phase::StartTls || e.reply.enhanced == Some((4, 7, 4));
                    let retry_clear = c.tls_failed && tls.may_fall_back_to_clear() && !opts.implicit_tls;
                    c.close(&opts.timeouts).await;
                    if tls_failure && tls == p.tls {
                        report_result(opts, p, Err(e.reply.text.clone()));
                    }
                    last = pre_session_reply(e, &label);
                    if retry_clear {
                        tls = TlsDecision::Fixed(TlsPolicy::None);
                        continue;
                    }
                    break;
                }
            }
        }
    }
    Err(last)
}

pub(super) enum Endpoint {
    Net(Destination),
    Unix(PathBuf),
}

impl Endpoint {
    fn key(&self) -> String {
        match self {
            Endpoint::Net(d) => d.to_string(),
            Endpoint::Unix(p) => p.display().to_string(),
        }
    }
}

/// Returns a ready session to the cache, or closes it.
pub(super) async fn release(mut c: Connection, key: SessionKey, opts: &DeliveryOptions) {
    c.uses += 1;
    match &opts.cache {
        Some(cache) if c.client.is_ready() => {
            if let Some(c) = cache.put(key, c) {
                c.close(&opts.timeouts).await;
            }
        }
        _ => c.close(&opts.timeouts).await,
    }
}
