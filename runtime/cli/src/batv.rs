//! `mailc batv-tag`: mint the BATV tag the daemon would sign an address with (R29), for a
//! transcript's bounce or to check a key by hand.

use std::io::Read;

const USAGE: &str = "\
usage: mailc batv-tag [--keys FILE] [--key N] [--date YYYY-MM-DD] [--lifetime DAYS] ADDRESS
  Prints ADDRESS signed as `prvs=KDDDSSSSSS=ADDRESS`. The keys are those of the server's
  batv_keys secret, one `NUMBER KEY` per line, read from FILE or standard input; the highest
  number signs unless --key N. --date is the day of signing (default today, UTC; a
  transcript's default clock is 2026-01-01); --lifetime the server's batv_lifetime in days
  (default 7).";

pub fn main(args: Vec<std::ffi::OsString>) -> u8 {
    let usage = |msg: &str| {
        eprintln!("mailc batv-tag: {msg}\n{USAGE}");
        2
    };
    let mut keys_file = None;
    let mut key_num: Option<u8> = None;
    let mut date: Option<String> = None;
    let mut lifetime: u64 = 7;
    let mut address = None;
    let mut it = args.into_iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(a) = it.next() {
        match a.as_str() {
            "--keys" => keys_file = it.next(),
            "--key" => match it.next().and_then(|n| n.parse().ok()).filter(|n| *n <= 9) {
                Some(n) => key_num = Some(n),
                None => return usage("--key takes a key number 0-9"),
            },
            "--date" => date = it.next(),
            "--lifetime" => match it.next().and_then(|n| n.parse().ok()) {
                Some(n) => lifetime = n,
                None => return usage("--lifetime takes a number of days"),
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return 0;
            }
            s if s.starts_with('-') => return usage(&format!("unknown option {s}")),
            s if address.is_none() => address = Some(s.to_string()),
            _ => return usage("one address only"),
        }
    }
    let Some(address) = address.filter(|a| a.contains('@')) else {
        return usage("an address (local@domain) is needed");
    };
    let text = match &keys_file {
        Some(f) => match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("mailc batv-tag: cannot read {f}: {e}");
                return 2;
            }
        },
        None => {
            let mut t = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut t) {
                eprintln!("mailc batv-tag: cannot read the keys: {e}");
                return 2;
            }
            t
        }
    };
    let keys = mailpolicy_stdlib::batv::parse_keys(&text);
    let chosen = match key_num {
        Some(n) => keys.iter().find(|(k, _)| *k == n),
        None => keys.iter().max_by_key(|(k, _)| *k),
    };
    let Some((num, key)) = chosen else {
        eprintln!("mailc batv-tag: no usable key (lines of `NUMBER KEY`, NUMBER 0-9)");
        return 2;
    };
    let now_ms = match date.as_deref() {
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        Some(d) => match days_from_date(d) {
            Some(days) => days * mailpolicy_stdlib::batv::DAY_MS,
            None => return usage("--date is YYYY-MM-DD"),
        },
    };
    println!("{}", mailpolicy_stdlib::batv::sign(&address, *num, key, now_ms, lifetime));
    0
}

/// `2026-01-01` to days since 1970-01-01 (proleptic Gregorian).
fn days_from_date(d: &str) -> Option<u64> {
    let mut p = d.split('-');
    let (y, m, day): (i64, i64, i64) = (p.next()?.parse().ok()?, p.next()?.parse().ok()?, p.next()?.parse().ok()?);
    if p.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&day) || y < 1970 {
        return None;
    }
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    u64::try_from(era * 146_097 + doe - 719_468).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates() {
        assert_eq!(super::days_from_date("1970-01-01"), Some(0));
        assert_eq!(super::days_from_date("2026-01-01"), Some(20_454));
        assert_eq!(super::days_from_date("2026-13-01"), None);
    }
}
