//! The catalogue of built-ins: actions, tests, rate keys, default replies, usage lines.

use super::*;

/// Default reply of `reject` / `tempfail` without a code, by stage.
/// The reply of `reject` / `tempfail` without a code, by stage (spec/language.md section 10).
pub fn default_reply(reject: bool, stage: Stage) -> (u16, (u16, u16, u16), &'static str) {
    match (reject, stage) {
        (true, Stage::Connect) => (554, (5, 7, 1), "Access denied"),
        (true, Stage::Rcpt) => (550, (5, 7, 1), "Recipient rejected by policy"),
        (true, Stage::Mail) => (550, (5, 7, 1), "Sender rejected by policy"),
        (true, Stage::Data) => (550, (5, 7, 1), "Message rejected by policy"),
        (true, _) => (550, (5, 7, 1), "Rejected by policy"),
        (false, Stage::Connect) => (421, (4, 3, 2), "Service not available, try again later"),
        (false, _) => (451, (4, 7, 1), "Try again later"),
    }
}

/// Facts a `rate` or `concurrent` value may count by.
pub const RATE_KEYS: &[Fact] = &[
    Fact::ClientIp,
    Fact::ClientNetwork,
    Fact::ClientName,
    Fact::HeloName,
    Fact::AuthUser,
    Fact::Sender,
    Fact::SenderDomain,
    Fact::Recipient,
    Fact::RecipientDomain,
];

/// Built-in test names (for "did you mean").
pub const TESTS: &[(&str, &str)] = &[
    ("flag", "flag NAME"),
    ("header", "header \"NAME\""),
    ("lookup", "lookup TABLE KEY"),
    ("rate", "rate COUNTER by KEY per WINDOW"),
    ("concurrent", "concurrent by KEY"),
    ("score", "score SCANNER"),
    ("dnsbl", "dnsbl \"ZONE\" [:returns [...]]"),
    ("rhsbl", "rhsbl \"ZONE\" [DOMAIN] [:returns [...]]"),
    ("resolvable", "resolvable DOMAIN"),
    ("fqdn", "fqdn NAME"),
    ("batv", "batv valid"),
    ("callahead", "callahead"),
    ("greylist", "greylist [:delay D] [:expire D]"),
    ("login_mismatch", "login_mismatch TABLE"),
];

const SESS: Stages = Stages::SESSION;

/// Actions: name, stages where allowed, capability.
pub const ACTIONS: &[(&str, Stages, Option<&str>)] = &[
    ("accept", SESS, None),
    ("reject", SESS.with(Stage::Route).with(Stage::Deliver), None),
    ("tempfail", SESS.with(Stage::Route).with(Stage::Deliver), None),
    ("discard", SESS.with(Stage::Bounce).with(Stage::Delay), None),
    ("stop", Stages::ALL, None),
    ("set", Stages::ALL, None),
    ("unset", Stages::ALL, None),
    ("log", Stages::ALL, None),
    ("greet", Stages::one(Stage::Connect), None),
    ("tarpit", SESS, None),
    ("dsn", Stages::range(Stage::Mail, Stage::Rcpt), None),
    ("header", Stages::one(Stage::Data).with(Stage::Route).with(Stage::Bounce), None),
    ("hold", SESS.with(Stage::Route), None),
    ("redirect", Stages::range(Stage::Rcpt, Stage::Data).with(Stage::Route), None),
    ("bcc", Stages::range(Stage::Mail, Stage::Data).with(Stage::Route), None),
    ("archive", Stages::one(Stage::Data).with(Stage::Route), None),
    ("filter", Stages::range(Stage::Connect, Stage::Data), None),
    ("deliver", Stages::one(Stage::Route), None),
    ("rewrite", Stages::range(Stage::Mail, Stage::Data).with(Stage::Route), None),
    ("masquerade", Stages::one(Stage::Route), None),
    ("expand", Stages::one(Stage::Route), None),
    ("alert", Stages::ALL, None),
    ("batv", Stages::range(Stage::Mail, Stage::Data), Some("batv")),
    ("access", Stages::range(Stage::Connect, Stage::Rcpt), None),
];

pub(super) fn usage(name: &str) -> String {
    let u = match name {
        "accept" | "discard" | "stop" | "callahead" => format!("`{name}` takes no arguments"),
        "reject" => "reject [CODE] [ENHANCED] [\"TEXT\"], e.g. reject 550 5.7.1 \"Relay access denied\"".into(),
        "tempfail" => "tempfail [CODE] [ENHANCED] [\"TEXT\"], e.g. tempfail 451 4.7.1 \"Try again later\"".into(),
        "deliver" | "filter" => format!("{name} mx | smtp \"HOST\" | lmtp \"HOST:PORT\" | maildir [\"FOLDER\"] | mbox \"FILE\" [:tls required|may|none] [:auth SECRET]"),
        other => match TESTS.iter().find(|t| t.0 == other) {
            Some((_, u)) => format!("usage: {u}"),
            None => "see spec/language.md for its arguments".into(),
        },
    };
    u
}
