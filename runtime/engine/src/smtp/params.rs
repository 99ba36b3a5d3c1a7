//! ESMTP parameters of MAIL and RCPT (RFC 1870, 6152, 3030, 3461, 4954, 6531).

/// `BODY=` on MAIL.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum BodyType {
    /// `BODY=7BIT` or no BODY parameter.
    #[default]
    SevenBit,
    /// `BODY=8BITMIME` (RFC 6152).
    EightBitMime,
    /// `BODY=BINARYMIME` (RFC 3030); only BDAT may carry the content.
    BinaryMime,
}

/// `RET=` on MAIL (RFC 3461).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ret {
    /// Return the full message in a DSN.
    Full,
    /// Return the headers only.
    Hdrs,
}

/// Parameters of MAIL FROM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct MailParams {
    /// `SIZE=n` declared by the client.
    pub size: Option<u64>,
    /// `BODY=`.
    pub body: BodyType,
    /// `SMTPUTF8` given.
    pub smtputf8: bool,
    /// `RET=`.
    pub ret: Option<Ret>,
    /// `ENVID=`, xtext-decoded.
    pub envid: Option<String>,
    /// `AUTH=`, xtext-decoded (`<>` kept as is).
    pub auth: Option<String>,
}

/// `NOTIFY=` on RCPT (RFC 3461). All false with `never` false means absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Notify {
    /// `NEVER` (exclusive with the others).
    pub never: bool,
    /// `SUCCESS`.
    pub success: bool,
    /// `FAILURE`.
    pub failure: bool,
    /// `DELAY`.
    pub delay: bool,
}

/// `ORCPT=addr-type;xtext` on RCPT (RFC 3461).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Orcpt {
    /// The address type, e.g. `rfc822` or `utf-8`, as sent.
    pub addr_type: String,
    /// The xtext-decoded original address.
    pub address: String,
}

/// Parameters of RCPT TO.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct RcptParams {
    /// `NOTIFY=`; `None` when absent (RFC 3461: FAILURE, maybe DELAY).
    pub notify: Option<Notify>,
    /// `ORCPT=`.
    pub orcpt: Option<Orcpt>,
}

/// Which extensions are offered in this session (drives parameter checks).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Offered {
    pub size: bool,
    pub eight_bit: bool,
    pub binary: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub auth: bool,
}

/// A parameter error, mapped to a reply by the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ParamError {
    /// 501 5.5.4: malformed parameter or value.
    Syntax(&'static str),
    /// 555 5.5.4: unknown or not offered parameter.
    Unsupported,
    /// 552 5.3.4: SIZE above the limit.
    TooBig,
}

/// Decodes RFC 3461 xtext: `+HH` with uppercase hex, other chars 33..=126 except `+` and `=`.
pub fn decode_xtext(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'+' {
            let hex = |x: u8| match x {
                b'0'..=b'9' => Some(x - b'0'),
                b'A'..=b'F' => Some(x - b'A' + 10),
                _ => None,
            };
            let hi = hex(*b.get(i + 1)?)?;
            let lo = hex(*b.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else if (33..=126).contains(&c) && c != b'=' {
            out.push(c);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

/// Splits `KEY=value KEY2` into (keyword, value) pairs; checks the
/// esmtp-keyword and esmtp-value grammar.
fn split_params(s: &str) -> Result<Vec<(String, Option<&str>)>, ParamError> {
    let mut out: Vec<(String, Option<&str>)> = Vec::new();
    for p in s.split(' ').filter(|p| !p.is_empty()) {
        let (k, v) = match p.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (p, None),
        };
        let kw_ok = k.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !kw_ok {
            return Err(ParamError::Syntax("Invalid parameter syntax"));
        }
        if let Some(v) = v {
            let v_ok = !v.is_empty() && v.chars().all(|c| !c.is_ascii() || (('!'..='~').contains(&c) && c != '='));
            if !v_ok {
                return Err(ParamError::Syntax("Invalid parameter value"));
            }
        }
        let k = k.to_ascii_uppercase();
        if out.iter().any(|(o, _)| *o == k) {
            return Err(ParamError::Syntax("Duplicate parameter"));
        }
        out.push((k, v));
    }
    Ok(out)
}

pub(crate) fn parse_mail_params(s: &str, offered: Offered, max_size: u64) -> Result<MailParams, ParamError> {
    let mut p = MailParams::default();
    for (k, v) in split_params(s)? {
        match (k.as_str(), v) {
            ("SIZE", Some(v)) if offered.size => {
                if v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(ParamError::Syntax("Invalid SIZE value"));
                }
                let n: u64 = v.parse().map_err(|_| ParamError::Syntax("Invalid SIZE value"))?;
                if max_size > 0 && n > max_size {
                    return Err(ParamError::TooBig);
                }
                p.size = Some(n);
            }
            ("BODY", Some(v)) if offered.eight_bit || offered.binary => {
                p.body = match v.to_ascii_uppercase().as_str() {
                    "7BIT" => BodyType::SevenBit,
                    "8BITMIME" if offered.eight_bit => BodyType::EightBitMime,
                    "BINARYMIME" if offered.binary => BodyType::BinaryMime,
                    _ => return Err(ParamError::Syntax("Invalid BODY value")),
                };
            }
            ("SMTPUTF8", None) if offered.smtputf8 => p.smtputf8 = true,
            ("RET", Some(v)) if offered.dsn => {
                p.ret = Some(match v.to_ascii_uppercase().as_str() {
                    "FULL" => Ret::Full,
                    "HDRS" => Ret::Hdrs,
                    _ => return Err(ParamError::Syntax("Invalid RET value")),
                });
            }
            ("ENVID", Some(v)) if offered.dsn => {
                let d = decode_xtext(v).ok_or(ParamError::Syntax("Invalid ENVID value"))?;
                if d.len() > 100 {
                    return Err(ParamError::Syntax("ENVID too long"));
                }
                p.envid = Some(d);
            }
            ("AUTH", Some(v)) if offered.auth => {
                p.auth = Some(decode_xtext(v).ok_or(ParamError::Syntax("Invalid AUTH value"))?);
            }
            ("SIZE" | "BODY" | "RET" | "ENVID" | "AUTH", None) | ("SMTPUTF8", Some(_)) if is_offered(&k, offered) => {
                return Err(ParamError::Syntax("Invalid parameter syntax"));
            }
            _ => return Err(ParamError::Unsupported),
        }
    }
    Ok(p)
}

fn is_offered(k: &str, o: Offered) -> bool {
    match k {
        "SIZE" => o.size,
        "BODY" => o.eight_bit || o.binary,
        "SMTPUTF8" => o.smtputf8,
        "RET" | "ENVID" => o.dsn,
        "AUTH" => o.auth,
        "NOTIFY" | "ORCPT" => o.dsn,
        _ => false,
    }
}

pub(crate) fn parse_rcpt_params(s: &str, offered: Offered) -> Result<RcptParams, ParamError> {
    let mut p = RcptParams::default();
    for (k, v) in split_params(s)? {
        match (k.as_str(), v) {
            ("NOTIFY", Some(v)) if offered.dsn => {
                let mut n = Notify::default();
                for item in v.split(',') {
                    let flag = match item.to_ascii_uppercase().as_str() {
                        "NEVER" => &mut n.never,
                        "SUCCESS" => &mut n.success,
                        "FAILURE" => &mut n.failure,
                        "DELAY" => &mut n.delay,
                        _ => return Err(ParamError::Syntax("Invalid NOTIFY value")),
                    };
                    if *flag {
                        return Err(ParamError::Syntax("Invalid NOTIFY value"));
                    }
                    *flag = true;
                }
                if n.never && (n.success || n.failure || n.delay) {
                    return Err(ParamError::Syntax("NOTIFY=NEVER must be alone"));
                }
                p.notify = Some(n);
            }
            ("ORCPT", Some(v)) if offered.dsn => {
                let (t, a) = v.split_once(';').ok_or(ParamError::Syntax("Invalid ORCPT value"))?;
                let t_ok = !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
                let a = decode_xtext(a).ok_or(ParamError::Syntax("Invalid ORCPT value"))?;
                if !t_ok || a.is_empty() || a.len() > 500 {
                    return Err(ParamError::Syntax("Invalid ORCPT value"));
                }
                p.orcpt = Some(Orcpt { addr_type: t.to_string(), address: a });
            }
            ("NOTIFY" | "ORCPT", None) if offered.dsn => return Err(ParamError::Syntax("Invalid parameter syntax")),
            _ => return Err(ParamError::Unsupported),
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Offered {
        Offered { size: true, eight_bit: true, binary: true, smtputf8: true, dsn: true, auth: true }
    }

    #[test]
    fn xtext() {
        assert_eq!(decode_xtext("a+2Bb+3D").as_deref(), Some("a+b="));
        assert_eq!(decode_xtext("+2b"), None);
        assert_eq!(decode_xtext("+2"), None);
        assert_eq!(decode_xtext("a=b"), None);
        assert_eq!(decode_xtext("").as_deref(), Some(""));
    }

    #[test]
    fn mail_params() {
        let p =
            parse_mail_params(" SIZE=100 BODY=8bitmime RET=HDRS ENVID=QQ+2B1 SMTPUTF8 AUTH=<>", all(), 1000).unwrap();
        assert_eq!(p.size, Some(100));
        assert_eq!(p.body, BodyType::EightBitMime);
        assert_eq!(p.ret, Some(Ret::Hdrs));
        assert_eq!(p.envid.as_deref(), Some("QQ+1"));
        assert_eq!(p.auth.as_deref(), Some("<>"));
        assert!(p.smtputf8);
        assert_eq!(parse_mail_params("SIZE=1001", all(), 1000), Err(ParamError::TooBig));
        assert!(matches!(parse_mail_params("SIZE=abc", all(), 0), Err(ParamError::Syntax(_))));
        assert!(matches!(parse_mail_params("SIZE=1 SIZE=2", all(), 0), Err(ParamError::Syntax(_))));
        assert!(matches!(parse_mail_params("RET=ALL", all(), 0), Err(ParamError::Syntax(_))));
        assert!(matches!(parse_mail_params("BODY=9BIT", all(), 0), Err(ParamError::Syntax(_))));
        assert_eq!(parse_mail_params("FOO=bar", all(), 0), Err(ParamError::Unsupported));
        assert_eq!(parse_mail_params("RET=FULL", Offered::default(), 0), Err(ParamError::Unsupported));
        assert!(matches!(parse_mail_params("SIZE", all(), 0), Err(ParamError::Syntax(_))));
    }

    #[test]
    fn rcpt_params() {
        let p = parse_rcpt_params("NOTIFY=success,FAILURE ORCPT=rfc822;a+2Bb@example.com", all()).unwrap();
        let n = p.notify.unwrap();
        assert!(n.success && n.failure && !n.delay && !n.never);
        assert_eq!(p.orcpt.unwrap().address, "a+b@example.com");
        assert!(parse_rcpt_params("NOTIFY=NEVER", all()).unwrap().notify.unwrap().never);
        for bad in [
            "NOTIFY=NEVER,SUCCESS",
            "NOTIFY=",
            "NOTIFY=SOMETIMES",
            "NOTIFY=DELAY,DELAY",
            "ORCPT=rfc822",
            "ORCPT=;a@b",
            "ORCPT=rfc822;+zz",
        ] {
            assert!(parse_rcpt_params(bad, all()).is_err(), "{bad}");
        }
        assert_eq!(parse_rcpt_params("NOTIFY=NEVER", Offered::default()), Err(ParamError::Unsupported));
    }
}
