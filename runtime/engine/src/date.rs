//! Calendar dates from Unix time, UTC: the one date helper of the workspace (`Date:` and
//! `Received:` fields, DSN dates, the mbox `From ` line, log and `mailc queue` times,
//! transcript `time:` fixtures). Pure arithmetic (Howard Hinnant's civil-date algorithms):
//! the engine reads no clock, callers pass the time.

const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

/// A moment split into its UTC calendar parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Civil {
    pub year: i64,
    /// 1..=12
    pub month: u32,
    /// 1..=31
    pub day: u32,
    pub hour: u64,
    pub minute: u64,
    pub second: u64,
    /// `Thu` for 1970-01-01.
    pub weekday: &'static str,
}

impl Civil {
    /// The parts of `secs` seconds after the epoch.
    pub fn from_secs(secs: u64) -> Civil {
        let days = secs / 86_400;
        let rem = secs % 86_400;
        let (year, month, day) = civil_from_days(days as i64);
        Civil {
            year,
            month,
            day,
            hour: rem / 3600,
            minute: rem % 3600 / 60,
            second: rem % 60,
            weekday: WEEKDAYS.get((days % 7) as usize).copied().unwrap_or("Thu"),
        }
    }

    pub fn month_name(&self) -> &'static str {
        MONTHS.get((self.month as usize).saturating_sub(1)).copied().unwrap_or("Jan")
    }
}

/// Days since 1970-01-01 to (year, month, day).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097) as u64;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe as i64 + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day) to days since 1970-01-01.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400) as u64;
    let mp = if m > 2 { m - 3 } else { m + 9 } as u64;
    let doy = (153 * mp + 2) / 5 + d as u64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe as i64 - 719_468
}

/// RFC 5322 date-time, UTC: `Sun, 22 Nov 2026 10:00:00 +0000`.
pub fn rfc2822(ms: u64) -> String {
    let c = Civil::from_secs(ms / 1000);
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        c.weekday,
        c.day,
        c.month_name(),
        c.year,
        c.hour,
        c.minute,
        c.second
    )
}

/// RFC 3339, UTC: `2026-11-22T10:00:00Z`.
pub fn rfc3339(ms: u64) -> String {
    let c = Civil::from_secs(ms / 1000);
    format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z", c.year, c.month, c.day, c.hour, c.minute, c.second)
}

/// `2026-11-22 10:00:00` (UTC), for tables people read.
pub fn plain(ms: u64) -> String {
    let c = Civil::from_secs(ms / 1000);
    format!("{:04}-{:02}-{:02} {:02}:{:02}:{:02}", c.year, c.month, c.day, c.hour, c.minute, c.second)
}

/// asctime(3), UTC, for the mbox `From ` line: `Mon Jan  2 15:04:05 2006`.
pub fn asctime(secs: u64) -> String {
    let c = Civil::from_secs(secs);
    format!("{} {} {:>2} {:02}:{:02}:{:02} {}", c.weekday, c.month_name(), c.day, c.hour, c.minute, c.second, c.year)
}

/// `2026-11-22T10:00:00Z` (UTC) to Unix milliseconds.
pub fn parse_rfc3339(s: &str) -> Result<u64, String> {
    let bad = || format!("\"{s}\" is not a time like 2026-11-22T10:00:00Z");
    let s2 = s.strip_suffix('Z').ok_or_else(bad)?;
    let (date, time) = s2.split_once('T').ok_or_else(bad)?;
    let d: Vec<i64> = date.split('-').map(|x| x.parse().map_err(|_| bad())).collect::<Result<_, _>>()?;
    let t: Vec<u64> = time.split(':').map(|x| x.parse().map_err(|_| bad())).collect::<Result<_, _>>()?;
    let (&[y, m, dd], &[h, mi, se]) = (d.as_slice(), t.as_slice()) else {
        return Err(bad());
    };
    if !(1..=12).contains(&m) || !(1..=31).contains(&dd) || h > 23 || mi > 59 || se > 60 {
        return Err(bad());
    }
    let days = days_from_civil(y, m as u32, dd as u32);
    if days < 0 {
        return Err(bad());
    }
    Ok(((days as u64) * 86_400 + h * 3600 + mi * 60 + se) * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        let ms = 1_795_341_600_000; // 2026-11-22T10:00:00Z, a Sunday
        assert_eq!(rfc2822(ms), "Sun, 22 Nov 2026 10:00:00 +0000");
        assert_eq!(rfc3339(ms), "2026-11-22T10:00:00Z");
        assert_eq!(plain(ms + 61_000), "2026-11-22 10:01:01");
        assert_eq!(asctime(1_136_214_245), "Mon Jan  2 15:04:05 2006");
        assert_eq!(rfc2822(0), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn round_trips() {
        for days in [0i64, 59, 60, 365, 10_956, 11_016, 20_000, 100_000, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
            let ms = days as u64 * 86_400_000 + 3_723_000;
            assert_eq!(parse_rfc3339(&rfc3339(ms)), Ok(ms));
        }
        for bad in ["2026-11-22", "2026-13-01T00:00:00Z", "2026-11-22T24:00:00Z", "1969-12-31T00:00:00Z", "x"] {
            assert!(parse_rfc3339(bad).is_err(), "{bad}");
        }
    }
}
