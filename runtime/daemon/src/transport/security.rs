//! The TLS decision for each next hop of an SMTP delivery: `:tls dane` and `:tls sts`.
//!
//! [`plan`] turns the resolved hops of a destination into hops with a [`TlsDecision`], a
//! plain value (`Eq`, `Hash`) that decides the STARTTLS policy, the certificate check and
//! what the delivery log says, so a session cache can key on it.
//!
//! * `:tls dane` (RFC 7672): when the destination's MX records are DNSSEC-validated (or it
//!   is a `[host]`), each host with secure usable TLSA records gets
//!   [`TlsDecision::Dane`] (STARTTLS mandatory, the certificate matched against them), a
//!   host with a secure TLSA RRset of unusable records
//!   [`TlsDecision::DaneUnauthenticated`] (STARTTLS mandatory, not verified), a host
//!   whose TLSA lookup failed (bogus) is skipped (`4.7.5` if none is left). A host DANE does
//!   not cover falls to MTA-STS as under `:tls sts`: DANE takes precedence (RFC 8461 section 2).
//! * `:tls sts` (RFC 8461), for MX delivery (the policy domain is the destination domain):
//!   `enforce` keeps the MX hosts matching the policy's `mx` patterns, each with
//!   [`TlsDecision::Sts`] `enforce` (STARTTLS mandatory, WebPKI-verified for the MX host
//!   name), and defers with `4.7.5` when none match; `testing` delivers as `may` but checks
//!   the certificate and the MX name for the report; `none`, no policy, or a policy that
//!   could not be fetched: `may`.
//! * Every other route: [`TlsDecision::Fixed`] with the route's policy, as before.

use std::collections::HashMap;
use std::sync::Arc;

use super::client::TlsPolicy;
use super::dane::{self, HostDane, SecureDns, Tlsa};
use super::mx::{Destination, Hop, Resolver};
use super::sts::{Mode, Policy, Sts};
use super::tlsrpt::{Recorder, ReportPolicy};
use crate::smtp::Reply;

/// What the route asks for (`:tls dane`, `:tls sts`, or a fixed policy).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Standards {
    /// The route's [`TlsPolicy`] as it is.
    #[default]
    Fixed,
    /// DANE, then MTA-STS, then opportunistic TLS.
    Dane,
    /// MTA-STS, then opportunistic TLS.
    Sts,
}

/// What DANE and MTA-STS need: the DNSSEC-aware DNS client, the policy cache and fetcher,
/// and where session results are recorded for TLS-RPT.
#[derive(Clone, Debug)]
pub struct Security {
    pub dns: SecureDns,
    pub sts: Sts,
    pub report: Option<Arc<Recorder>>,
}

/// How one next hop's session is secured.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TlsDecision {
    /// The route's policy: `may` (unverified), `none`, `required` (WebPKI).
    Fixed(TlsPolicy),
    /// DANE: STARTTLS mandatory, the certificate matched against these TLSA records;
    /// `names` are the reference identifiers of a DANE-TA chain.
    Dane { records: Vec<Tlsa>, names: Vec<String> },
    /// DANE with no usable TLSA record: STARTTLS mandatory, the certificate not checked.
    DaneUnauthenticated,
    /// MTA-STS: `enforce` is STARTTLS mandatory and WebPKI-verified; `testing` is `may`,
    /// the certificate checked for the report only.
    Sts { enforce: bool },
}

impl TlsDecision {
    /// The client engine's STARTTLS policy.
    pub fn engine_policy(&self) -> TlsPolicy {
        match self {
            TlsDecision::Fixed(p) => *p,
            TlsDecision::Dane { .. } | TlsDecision::DaneUnauthenticated | TlsDecision::Sts { enforce: true } => {
                TlsPolicy::Required
            }
            TlsDecision::Sts { enforce: false } => TlsPolicy::May,
        }
    }

    /// What the delivery log's `tls_policy=` says.
    pub fn label(&self) -> &'static str {
        match self {
            TlsDecision::Fixed(TlsPolicy::May) => "may",
            TlsDecision::Fixed(TlsPolicy::None) => "none",
            TlsDecision::Fixed(TlsPolicy::Required) => "required",
            TlsDecision::Dane { .. } => "dane",
            TlsDecision::DaneUnauthenticated => "dane-unauthenticated",
            TlsDecision::Sts { enforce: true } => "sts enforce",
            TlsDecision::Sts { enforce: false } => "sts testing",
        }
    }

    /// A failed handshake may be retried in clear (only where TLS is opportunistic).
    pub fn may_fall_back_to_clear(&self) -> bool {
        self.engine_policy() == TlsPolicy::May
    }
}

/// One hop to try and how: the decision, and the TLS-RPT policy its result counts under.
#[derive(Clone, Debug)]
pub struct Planned {
    pub hop: Hop,
    pub tls: TlsDecision,
    pub report: Option<Arc<ReportPolicy>>,
    /// A failure found before connecting that the session's result is reported as
    /// (MTA-STS `testing`: an MX host the policy does not name): result type and reason.
    pub finding: Option<(&'static str, String)>,
}

fn fixed(hops: &[Hop], p: TlsPolicy) -> Vec<Planned> {
    hops.iter().map(|h| Planned { hop: h.clone(), tls: TlsDecision::Fixed(p), report: None, finding: None }).collect()
}

/// The hops of `dest` with their decisions, best first; `Err` when every hop is ruled out
/// (a failed TLSA lookup, an MX host an enforced MTA-STS policy does not name).
pub async fn plan(
    standards: Standards,
    fallback: TlsPolicy,
    security: Option<&Security>,
    resolver: &dyn Resolver,
    dest: &Destination,
    hops: &[Hop],
) -> Result<Vec<Planned>, Reply> {
    let Some(sec) = security.filter(|_| standards != Standards::Fixed) else {
        return Ok(fixed(hops, fallback));
    };
    let domain = dest.host.trim_end_matches('.').to_ascii_lowercase();
    let mut dane_hosts: HashMap<String, HostDane> = HashMap::new();
    if standards == Standards::Dane && dest.host.parse::<std::net::IpAddr>().is_err() {
        let mx_secure = if dest.mx {
            dane::mx_secure(&sec.dns, &dest.host).await.map_err(|e| Reply::new(451, (4, 7, 5), format!("DANE: {e}")))?
        } else {
            true
        };
        if mx_secure {
            for h in hops {
                if !dane_hosts.contains_key(&h.name) {
                    let d = dane::host_tlsa(&sec.dns, &h.name, h.addr.port()).await;
                    dane_hosts.insert(h.name.clone(), d);
                }
            }
        }
    }
    let covered = |h: &Hop| matches!(dane_hosts.get(&h.name), Some(HostDane::Records(_) | HostDane::Unusable(_)));
    // MTA-STS for the hosts DANE does not cover (MX delivery only: the policy domain is the
    // destination's domain).
    let sts = if dest.mx && hops.iter().any(|h| !covered(h)) {
        match sec.sts.policy(resolver, &domain).await {
            Ok(Some(p)) if p.mode != Mode::None => Some(Ok(p)),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        }
    } else {
        None
    };
    let sts_report = match &sts {
        Some(Ok(p)) => Some(Arc::new(ReportPolicy::sts(&domain, p))),
        _ => None,
    };
    let mut out = Vec::new();
    let mut refusals: Vec<String> = Vec::new();
    for h in hops {
        match dane_hosts.get(&h.name) {
            Some(HostDane::Records(records)) => {
                let mut names = vec![h.name.trim_end_matches('.').to_string()];
                if dest.mx && !names.contains(&domain) {
                    names.push(domain.clone());
                }
                let report = Arc::new(ReportPolicy::tlsa(&domain, &h.name, records));
                out.push(Planned {
                    hop: h.clone(),
                    tls: TlsDecision::Dane { records: records.clone(), names },
                    report: Some(report),
                    finding: None,
                });
                continue;
            }
            Some(HostDane::Unusable(records)) => {
                let report = Arc::new(ReportPolicy::tlsa(&domain, &h.name, records));
                out.push(Planned {
                    hop: h.clone(),
                    tls: TlsDecision::DaneUnauthenticated,
                    report: Some(report),
                    finding: None,
                });
                continue;
            }
            Some(HostDane::Failed(e)) => {
                // RFC 7672 2.1.1: a host whose TLSA records cannot be had is not used
                if let Some(r) = &sec.report {
                    let p = ReportPolicy::tlsa(&domain, &h.name, &[]);
                    r.record(&p, Err(("tlsa-invalid", h, e.clone())));
                }
                refusals.push(format!("{}: {e}", h.name));
                continue;
            }
            Some(HostDane::NotApplicable) | None => {}
        }
        match (&sts, &sts_report) {
            (Some(Ok(p)), Some(rp)) => {
                let matches = p.mx_matches(&h.name);
                if p.mode == Mode::Enforce && !matches {
                    if let Some(r) = &sec.report {
                        r.record(rp, Err(("validation-failure", h, format!("MX {} not in the policy", h.name))));
                    }
                    refusals.push(format!("MX host {} does not match the MTA-STS policy of {domain}", h.name));
                    continue;
                }
                out.push(Planned {
                    hop: h.clone(),
                    tls: TlsDecision::Sts { enforce: p.mode == Mode::Enforce },
                    report: Some(rp.clone()),
                    finding: (!matches).then(|| ("validation-failure", format!("MX {} not in the policy", h.name))),
                });
            }
            (Some(Err(e)), _) => {
                if let Some(r) = &sec.report {
                    let kind = match e {
                        super::sts::StsError::Fetch(_) => "sts-policy-fetch-error",
                        super::sts::StsError::Invalid(_) => "sts-policy-invalid",
                    };
                    r.record(&ReportPolicy::none(&domain), Err((kind, h, e.to_string())));
                }
                out.push(Planned { hop: h.clone(), tls: TlsDecision::Fixed(fallback), report: None, finding: None });
            }
            _ => {
                let report = sec.report.as_ref().map(|_| Arc::new(ReportPolicy::none(&domain)));
                out.push(Planned { hop: h.clone(), tls: TlsDecision::Fixed(fallback), report, finding: None });
            }
        }
    }
    if out.is_empty() {
        let text = if refusals.is_empty() { "no next hop".to_string() } else { refusals.join("; ") };
        return Err(Reply::new(451, (4, 7, 5), text));
    }
    Ok(out)
}

/// The policy text of a cached MTA-STS policy, one line per element (TLS-RPT's
/// `policy-string`).
pub fn policy_strings(p: &Policy) -> Vec<String> {
    p.text.lines().map(|l| l.trim_end_matches('\r').to_string()).filter(|l| !l.is_empty()).collect()
}
