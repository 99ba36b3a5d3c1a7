//! AUTH as a connection sees it: the throttles on failed logins and what a SASL exchange's
//! end means. The host runs the SASL mechanism (the daemon with rsasl, `mailc test`
//! against `credentials:`) and says how it ended ([`SaslResult`]); the counts are the
//! host's own rate store ([`Need::FailedLogins`]: per host, not a cluster's shared store,
//! like the record of where a login authenticated from, [`Need::LoginKnown`]). What is
//! counted, the limits, and the reply are decided here, once for both hosts.
//!
//! - Ten failed logins from one address within ten minutes: AUTH from it is refused with
//!   `454 4.7.0` before the SASL exchange runs (the refusal is not counted again).
//! - Ten failed logins for one account within ten minutes, from any addresses (a guessing
//!   attack spread over many): the login is refused with `454 4.7.0`, whatever the
//!   password, except from an address it authenticated from in the last 30 days.
//! - Every failed exchange is an `auth_failures` event ([`Note::Count`]) under the
//!   session's keys and `auth.login=LOGIN`, before the auth stage runs for it.

use mailpolicy_lang::ir::Counter;

use super::{Conn, HostWait, Need, Note};
use crate::smtp::{AuthOutcome, Reply, Time};

pub const AUTH_FAILURE_LIMIT: u64 = 10;
pub const AUTH_FAILURE_WINDOW: u64 = 600_000;
pub const LOGIN_FAILURE_LIMIT: u64 = 10;
pub const LOGIN_KNOWN_WINDOW: u64 = 30 * 86_400_000;

/// How the host's SASL exchange ended (answer to [`Need::AuthStep`] when it is not a
/// challenge: [`Conn::sasl_done`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SaslResult {
    /// The credentials are right for `user`.
    Success { user: String },
    /// Wrong credentials, a malformed exchange, or no SASL service; `login` is the
    /// identity the client tried, when the exchange got that far.
    Failure { login: Option<String> },
}

/// Where an AUTH exchange is in the throttle checks.
#[derive(Clone, Debug)]
pub(super) enum Gate {
    /// Counting the client address's recent failures before the SASL step.
    Address { mechanism: String, data: Option<Vec<u8>> },
    /// Counting the tried login's recent failures.
    Login { mechanism: String, result: SaslResult, login: String },
    /// Asking whether the login authenticated from this address lately.
    Known { mechanism: String, result: SaslResult, login: String },
}

fn throttled_reply() -> Reply {
    Reply::new(454, (4, 7, 0), "Too many failed authentications, try again later")
}

impl Conn {
    fn address_key(&self) -> String {
        format!("client.ip={}", self.facts.client_ip)
    }

    /// An SASL step of the client's: first the address throttle (a count the host answers).
    pub(super) fn auth_step(&mut self, mechanism: String, data: Option<Vec<u8>>) -> Option<Need> {
        if !self.has_remote {
            return Some(Need::AuthStep { mechanism, data });
        }
        let key = self.address_key();
        self.pending = HostWait::Auth(Gate::Address { mechanism, data });
        Some(Need::FailedLogins { key, window_ms: AUTH_FAILURE_WINDOW })
    }

    /// Answer [`Need::FailedLogins`]: the `auth_failures` events under its key in the window.
    pub fn failed_logins(&mut self, count: u64, now: Time) {
        if matches!(self.pending, HostWait::Auth(Gate::Address { .. } | Gate::Login { .. })) {
            self.gate_answered(count, false, now);
        }
    }

    /// Answer [`Need::LoginKnown`]: `login` authenticated from the client's address within
    /// the window.
    pub fn login_known(&mut self, known: bool, now: Time) {
        if matches!(self.pending, HostWait::Auth(Gate::Known { .. })) {
            self.gate_answered(0, known, now);
        }
    }

    fn gate_answered(&mut self, count: u64, known: bool, now: Time) {
        let HostWait::Auth(gate) = std::mem::replace(&mut self.pending, HostWait::None) else { return };
        match gate {
            Gate::Address { mechanism, data } => {
                if count >= AUTH_FAILURE_LIMIT {
                    self.notes.push_back(Need::Note(Note::Login {
                        mechanism,
                        login: None,
                        ok: false,
                        throttled: "address",
                    }));
                    let _ = self.session.auth_done(AuthOutcome::Failure { reply: Some(throttled_reply()) }, now);
                } else {
                    self.notes.push_back(Need::AuthStep { mechanism, data });
                }
            }
            Gate::Login { mechanism, result, login } => {
                if count >= LOGIN_FAILURE_LIMIT {
                    let ip = self.facts.client_ip;
                    self.pending = HostWait::Auth(Gate::Known { mechanism, result, login: login.clone() });
                    self.notes.push_back(Need::LoginKnown { login, ip, window_ms: LOGIN_KNOWN_WINDOW });
                } else {
                    self.sasl_finish(mechanism, result, Some(login), false, now);
                }
            }
            Gate::Known { mechanism, result, login } => self.sasl_finish(mechanism, result, Some(login), !known, now),
        }
    }

    /// The host's SASL exchange ended (the other answer to [`Need::AuthStep`]).
    pub fn sasl_done(&mut self, mechanism: &str, result: SaslResult, now: Time) {
        let login = match &result {
            SaslResult::Success { user } => Some(user.clone()),
            SaslResult::Failure { login } => login.clone(),
        }
        .map(|l| l.to_ascii_lowercase())
        .filter(|l| !l.is_empty());
        let mechanism = mechanism.to_string();
        match login {
            Some(login) if self.has_remote => {
                let key = format!("auth.login={login}");
                self.pending = HostWait::Auth(Gate::Login { mechanism, result, login });
                self.notes.push_back(Need::FailedLogins { key, window_ms: AUTH_FAILURE_WINDOW });
            }
            login => self.sasl_finish(mechanism, result, login, false, now),
        }
    }

    fn sasl_finish(&mut self, mechanism: String, result: SaslResult, login: Option<String>, blocked: bool, now: Time) {
        match result {
            SaslResult::Success { user } if !blocked => {
                self.notes.push_back(Need::Note(Note::Login {
                    mechanism,
                    login: Some(user.clone()),
                    ok: true,
                    throttled: "",
                }));
                let _ = self.session.auth_done(AuthOutcome::Success { user }, now);
            }
            _ => {
                // Counted before the auth stage runs for the failure, so its `rate` sees it.
                let mut keys = crate::eval::event_keys(&self.facts);
                if let Some(l) = &login {
                    keys.push(format!("auth.login={l}"));
                }
                self.notes.push_back(Need::Note(Note::Count { counter: Counter::AuthFailures, keys }));
                let throttled = if blocked { "login" } else { "" };
                self.notes.push_back(Need::Note(Note::Login { mechanism, login, ok: false, throttled }));
                let reply = blocked.then(throttled_reply);
                let _ = self.session.auth_done(AuthOutcome::Failure { reply }, now);
            }
        }
    }
}
