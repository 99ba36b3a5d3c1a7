//! SMTP AUTH mechanisms (R42) with rsasl: PLAIN, LOGIN and SCRAM-SHA-256 against a
//! credentials table of hashed secrets. One hash format serves all three: the SCRAM
//! verifier `SCRAM-SHA-256$ITERATIONS:SALT$STOREDKEY:SERVERKEY` (base64 parts, the format
//! PostgreSQL uses), made by `mailc hash-password`. PLAIN and LOGIN passwords are checked
//! by deriving the stored key from the password and comparing; no plaintext is stored.

use std::io::Cursor;
use std::sync::Arc;

use base64::Engine;
use rsasl::callback::{Context, Request, SessionCallback, SessionData};
use rsasl::mechanisms::scram;
use rsasl::mechanisms::scram::properties::ScramStoredPassword;
use rsasl::mechname::Mechname;
use rsasl::prelude::{SASLConfig, SASLServer, Session, SessionError, State};
use rsasl::property::{AuthId, AuthzId, Password};
use rsasl::validate::{Validate, Validation, ValidationError};
use sha2::{Digest, Sha256};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A parsed SCRAM-SHA-256 verifier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

impl Verifier {
    pub fn parse(s: &str) -> Option<Verifier> {
        let rest = s.trim().strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iter, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Verifier {
            iterations: iter.parse().ok().filter(|i| *i >= 1)?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?,
            server_key: B64.decode(server).ok()?,
        })
    }

    /// Hash a password with a random salt.
    pub fn hash(password: &str, iterations: u32) -> String {
        let salt: [u8; 16] = rand::random();
        let (stored, server) = keys(password.as_bytes(), iterations, &salt);
        format!("SCRAM-SHA-256${iterations}:{}${}:{}", B64.encode(salt), B64.encode(stored), B64.encode(server))
    }

    /// Constant-time check of a plaintext password (PLAIN, LOGIN).
    pub fn check(&self, password: &[u8]) -> bool {
        let (stored, _) = keys(password, self.iterations, &self.salt);
        stored.len() == self.stored_key.len()
            && stored.iter().zip(&self.stored_key).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

fn keys(password: &[u8], iterations: u32, salt: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut salted = Default::default();
    scram::tools::hash_password::<Sha256>(password, iterations, salt, &mut salted);
    let (client_key, server_key) = scram::tools::derive_keys::<Sha256>(salted.as_slice());
    (Sha256::digest(client_key).to_vec(), server_key.to_vec())
}

/// Looks a login up in the credentials table (synchronously: the table is in memory).
pub trait CredentialStore: Send + Sync {
    fn verifier(&self, login: &str) -> Option<Verifier>;
}

struct Callback {
    store: Arc<dyn CredentialStore>,
    /// The login the client tried last (for per-login throttling).
    tried: Arc<std::sync::Mutex<Option<String>>>,
}

impl Callback {
    fn saw(&self, login: Option<&str>) {
        if let (Some(l), Ok(mut t)) = (login, self.tried.lock()) {
            *t = Some(l.to_string());
        }
    }
}

struct AuthResult;
impl Validation for AuthResult {
    type Value = Option<String>;
}

impl SessionCallback for Callback {
    fn callback(&self, _s: &SessionData, context: &Context, request: &mut Request) -> Result<(), SessionError> {
        self.saw(context.get_ref::<AuthId>());
        if let Some(user) = context.get_ref::<AuthId>() {
            if let Some(v) = self.store.verifier(user) {
                request.satisfy::<ScramStoredPassword>(&ScramStoredPassword::new(
                    v.iterations,
                    &v.salt,
                    &v.stored_key,
                    &v.server_key,
                ))?;
            }
        }
        Ok(())
    }

    fn validate(
        &self,
        session: &SessionData,
        context: &Context,
        validate: &mut Validate<'_>,
    ) -> Result<(), ValidationError> {
        let mech = session.mechanism().mechanism.as_str();
        self.saw(context.get_ref::<AuthId>());
        let authid = context.get_ref::<AuthId>().map(str::to_string);
        let authzid = context.get_ref::<AuthzId>().map(str::to_string);
        // Acting for another identity is not allowed.
        if authzid.as_ref().is_some_and(|z| !z.is_empty() && Some(z) != authid.as_ref()) {
            validate.with::<AuthResult, _>(|| Ok(None))?;
            return Ok(());
        }
        let result = match (mech, authid) {
            (m, Some(user)) if m.starts_with("SCRAM-") => self.store.verifier(&user).map(|_| user),
            (_, Some(user)) => {
                let pw = context.get_ref::<Password>().unwrap_or(&[]);
                self.store.verifier(&user).filter(|v| v.check(pw)).map(|_| user)
            }
            _ => None,
        };
        validate.with::<AuthResult, _>(|| Ok(result))?;
        Ok(())
    }
}

/// The SASL side of one connection.
pub struct SaslServer {
    config: Arc<SASLConfig>,
    session: Option<Session<AuthResult>>,
    /// SCRAM's server-final message went out as a challenge; the client's (empty) answer
    /// completes the exchange for this user (RFC 4954 section 4).
    pending_success: Option<String>,
    tried: Arc<std::sync::Mutex<Option<String>>>,
}

/// What to tell the engine after a step.
pub enum Step {
    Continue(Vec<u8>),
    Success(String),
    Failure,
}

impl SaslServer {
    pub fn new(store: Arc<dyn CredentialStore>) -> Result<SaslServer, String> {
        let tried: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        let config = SASLConfig::builder()
            .with_defaults()
            .with_callback(Callback { store, tried: tried.clone() })
            .map_err(|e| e.to_string())?;
        Ok(SaslServer { config, session: None, pending_success: None, tried })
    }

    pub fn reset(&mut self) {
        self.session = None;
        self.pending_success = None;
        if let Ok(mut t) = self.tried.lock() {
            *t = None;
        }
    }

    /// The login the client named in the exchange so far (PLAIN, LOGIN, SCRAM), if any.
    pub fn tried_login(&self) -> Option<String> {
        self.tried.lock().ok().and_then(|t| t.clone())
    }

    /// One step. `data` None means the client sent no initial response.
    pub fn step(&mut self, mechanism: &str, data: Option<&[u8]>) -> Step {
        if let Some(user) = self.pending_success.take() {
            return if data.is_none_or(|d| d.is_empty()) { Step::Success(user) } else { Step::Failure };
        }
        if self.session.is_none() {
            let Ok(mech) = Mechname::parse(mechanism.as_bytes()) else { return Step::Failure };
            let server = SASLServer::<AuthResult>::new(self.config.clone());
            match server.start_suggested(mech) {
                Ok(s) => self.session = Some(s),
                Err(_) => return Step::Failure,
            }
            // Client-first mechanisms without an initial response: send an empty challenge.
            if data.is_none() && self.session.as_ref().is_some_and(|s| !s.are_we_first()) {
                return Step::Continue(Vec::new());
            }
        }
        let Some(session) = self.session.as_mut() else { return Step::Failure };
        let mut out = Cursor::new(Vec::new());
        match session.step(data, &mut out) {
            Ok(State::Running) => Step::Continue(out.into_inner()),
            Ok(State::Finished(_)) => {
                let user = session.validation().flatten();
                self.session = None;
                let last = out.into_inner();
                match user {
                    Some(u) if !last.is_empty() => {
                        self.pending_success = Some(u);
                        Step::Continue(last)
                    }
                    Some(u) => Step::Success(u),
                    None => Step::Failure,
                }
            }
            Err(_) => {
                self.session = None;
                Step::Failure
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Map(HashMap<String, Verifier>);
    impl CredentialStore for Map {
        fn verifier(&self, login: &str) -> Option<Verifier> {
            self.0.get(login).cloned()
        }
    }

    fn store() -> Arc<dyn CredentialStore> {
        let v = Verifier::parse(&Verifier::hash("s3cret", 4096)).unwrap();
        Arc::new(Map(HashMap::from([("alice".to_string(), v)])))
    }

    #[test]
    fn plain() {
        let mut s = SaslServer::new(store()).unwrap();
        assert!(matches!(s.step("PLAIN", Some(b"\0alice\0s3cret")), Step::Success(u) if u == "alice"));
        assert!(matches!(s.step("PLAIN", Some(b"\0alice\0wrong")), Step::Failure));
        assert!(matches!(s.step("PLAIN", Some(b"bob\0alice\0s3cret")), Step::Failure));
        assert!(matches!(s.step("PLAIN", None), Step::Continue(c) if c.is_empty()));
        assert!(matches!(s.step("PLAIN", Some(b"\0alice\0s3cret")), Step::Success(_)));
    }

    #[test]
    fn login() {
        let mut s = SaslServer::new(store()).unwrap();
        let Step::Continue(_) = s.step("LOGIN", None) else { panic!("LOGIN should ask for the user") };
        let Step::Continue(_) = s.step("LOGIN", Some(b"alice")) else { panic!("LOGIN should ask for the password") };
        assert!(matches!(s.step("LOGIN", Some(b"s3cret")), Step::Success(u) if u == "alice"));
    }

    #[test]
    fn scram_with_rsasl_client() {
        use rsasl::prelude::SASLClient;
        let mut server = SaslServer::new(store()).unwrap();
        let client_cfg = SASLConfig::with_credentials(None, "alice".into(), "s3cret".into()).unwrap();
        let client = SASLClient::new(client_cfg);
        let mut c = client.start_suggested(&[Mechname::parse(b"SCRAM-SHA-256").unwrap()]).unwrap();
        let mut out = Cursor::new(Vec::new());
        c.step(None, &mut out).unwrap();
        let mut to_server = out.into_inner();
        let mut user = None;
        for _ in 0..4 {
            match server.step("SCRAM-SHA-256", Some(&to_server)) {
                Step::Continue(ch) => {
                    let mut o = Cursor::new(Vec::new());
                    c.step(Some(&ch), &mut o).unwrap();
                    to_server = o.into_inner();
                }
                Step::Success(u) => {
                    user = Some(u);
                    break;
                }
                Step::Failure => break,
            }
        }
        assert_eq!(user.as_deref(), Some("alice"));
    }

    /// The example credentials are real verifiers (issue 11): the passwords the file's
    /// comment gives are accepted, others are not.
    #[test]
    fn example_credentials_verify() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/data/passwd");
        let text = std::fs::read_to_string(path).expect("examples/data/passwd");
        let table = mailpolicy_stdlib::tables::FileTable::parse("map", &text).expect("a map file");
        for (login, password) in [("alice@example.com", "s3cret"), ("bob@example.com", "bob-s3cret")] {
            let v = table.lookup(login).and_then(|v| Verifier::parse(&v)).expect("a verifier for each login");
            assert!(v.check(password.as_bytes()), "{login}");
            assert!(!v.check(b"wrong"), "{login}");
        }
    }

    #[test]
    fn verifier_format() {
        let h = Verifier::hash("pw", 4096);
        let v = Verifier::parse(&h).unwrap();
        assert!(v.check(b"pw"));
        assert!(!v.check(b"pW"));
        assert!(Verifier::parse("plain:pw").is_none());
    }
}
