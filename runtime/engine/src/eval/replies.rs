//! Replies of the evaluator: a policy's reply codes made a wire reply ([`reply_of`]), the
//! enhanced code of a call-ahead's answer, and `soft_bounce` on replies and reply lines.

use super::*;

/// R40 soft-bounce: a 5xy reply becomes the 4xy one (`554 5.7.1` -> `454 4.7.1`, `504`
/// -> `404`), as Postfix's `soft_bounce` does; other replies are returned as they are.
pub fn soft_bounce(r: &smtp::Reply) -> smtp::Reply {
    if r.code / 100 != 5 {
        return r.clone();
    }
    let enhanced = r.enhanced.map(|(a, b, c)| if a == 5 { (4, b, c) } else { (a, b, c) });
    smtp::Reply { code: r.code - 100, enhanced, text: r.text.clone() }
}

/// The wire reply of a policy's refusal: a reply template rendered, an access table's
/// value, a stage's default reply or a call-ahead's answer. The one conversion of the
/// IR's `(class, subject, detail)` (checked by the compiler: the class is the code's
/// first digit) to [`smtp::Reply`]'s.
pub(super) fn reply_of(code: u16, (class, subject, detail): (u16, u16, u16), text: impl Into<String>) -> smtp::Reply {
    let class = u8::try_from(class).unwrap_or((code / 100) as u8);
    smtp::Reply::new(code, (class, subject, detail), text)
}

/// [`soft_bounce`] on a reply line as the queue records it (`550 5.1.1 text`, or a code
/// and text without an enhanced code).
pub fn soft_bounce_line(line: &str) -> String {
    let mut parts = line.splitn(3, ' ');
    let (code, second, rest) = (parts.next().unwrap_or(""), parts.next(), parts.next());
    let Some(c) = code.parse::<u16>().ok().filter(|c| (500..600).contains(c)) else {
        return line.to_string();
    };
    let soft_enh = |e: &str| match e.strip_prefix("5.") {
        Some(tail) if e.split('.').count() == 3 && e.split('.').all(|p| p.parse::<u16>().is_ok()) => {
            Some(format!("4.{tail}"))
        }
        _ => None,
    };
    match (second, rest) {
        (Some(e), rest) if soft_enh(e).is_some() => {
            let e = soft_enh(e).unwrap_or_default();
            match rest {
                Some(t) => format!("{} {e} {t}", c - 100),
                None => format!("{} {e}", c - 100),
            }
        }
        _ => match line.split_once(' ') {
            Some((_, tail)) => format!("{} {tail}", c - 100),
            None => (c - 100).to_string(),
        },
    }
}

/// `5.1.1 User unknown` -> ((5,1,1), "User unknown"); without a code, a default of the class.
pub(super) fn split_enhanced(text: &str, class: u16) -> ((u16, u16, u16), String) {
    if let Some((head, rest)) = text.split_once(' ') {
        let p: Vec<&str> = head.split('.').collect();
        if p.len() == 3 {
            if let (Ok(a), Ok(b), Ok(c)) = (p[0].parse::<u16>(), p[1].parse::<u16>(), p[2].parse::<u16>()) {
                if a == class {
                    return ((a, b, c), rest.to_string());
                }
            }
        }
    }
    ((class, 1, 1), text.to_string())
}

#[cfg(test)]
mod soft_bounce_tests {
    use super::{soft_bounce, soft_bounce_line};
    use crate::smtp::Reply;

    #[test]
    fn five_becomes_four_digit_by_digit() {
        let r = |code, enhanced: (u8, u16, u16)| Reply::new(code, enhanced, "t");
        assert_eq!(soft_bounce(&r(554, (5, 7, 1))), r(454, (4, 7, 1)));
        assert_eq!(soft_bounce(&r(504, (5, 5, 2))), r(404, (4, 5, 2)));
        assert_eq!(soft_bounce(&r(550, (5, 1, 1))), r(450, (4, 1, 1)));
        assert_eq!(soft_bounce(&r(451, (4, 3, 0))), r(451, (4, 3, 0)));
        assert_eq!(soft_bounce_line("554 5.7.1 No thanks"), "454 4.7.1 No thanks");
        assert_eq!(soft_bounce_line("552 mailbox full"), "452 mailbox full");
        assert_eq!(soft_bounce_line("550"), "450");
        assert_eq!(soft_bounce_line("451 4.3.0 later"), "451 4.3.0 later");
        assert_eq!(soft_bounce_line("garbage \u{e9}"), "garbage \u{e9}");
    }
}
