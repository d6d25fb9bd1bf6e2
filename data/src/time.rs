//! MIMIC timestamps (`YYYY-MM-DD HH:MM:SS`, MIMIC-CXR's `StudyDate` `YYYYMMDD` and `StudyTime`
//! `HHMMSS[.ffffff]`) as seconds since 1970-01-01 in the proleptic Gregorian calendar, and back.
//! MIMIC's shifted dates (years 2100-2200) are ordinary dates here.

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, m, d)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    days_from_civil(if m == 12 { y + 1 } else { y }, if m == 12 { 1 } else { m + 1 }, 1) - days_from_civil(y, m, 1)
}

fn field(s: &str, range: std::ops::Range<usize>) -> Option<i64> {
    let t = s.get(range)?;
    t.bytes().all(|b| b.is_ascii_digit()).then(|| t.parse().ok()).flatten()
}

fn checked(y: i64, mo: i64, d: i64, h: i64, mi: i64, s: i64) -> Option<i64> {
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    Some(days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + s)
}

/// Parses `YYYY-MM-DD HH:MM:SS` (or with `T`; fractional seconds ignored) or a bare date
/// `YYYY-MM-DD` (midnight).
pub fn parse_datetime(s: &str) -> Option<i64> {
    let s = s.trim();
    let b = s.as_bytes();
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, mo, d) = (field(s, 0..4)?, field(s, 5..7)?, field(s, 8..10)?);
    if b.len() == 10 {
        return checked(y, mo, d, 0, 0, 0);
    }
    if b.len() < 19 || !(b[10] == b' ' || b[10] == b'T') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    checked(y, mo, d, field(s, 11..13)?, field(s, 14..16)?, field(s, 17..19)?)
}

/// Parses MIMIC-CXR's `StudyDate` (`YYYYMMDD`) and `StudyTime` (`HHMMSS[.f]`, possibly with
/// fewer leading digits, e.g. `93015.5` for 09:30:15).
pub fn parse_study_datetime(date: &str, time: &str) -> Option<i64> {
    let date = date.trim();
    if date.len() != 8 {
        return None;
    }
    let whole = time.trim().split('.').next()?;
    if whole.is_empty() || whole.len() > 6 || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let t: i64 = whole.parse().ok()?;
    checked(field(date, 0..4)?, field(date, 4..6)?, field(date, 6..8)?, t / 10000, t / 100 % 100, t % 100)
}

/// Formats seconds since 1970 as `YYYY-MM-DD HH:MM:SS`.
pub fn format_datetime(secs: i64) -> String {
    let (y, m, d) = civil_from_days(secs.div_euclid(86400));
    let r = secs.rem_euclid(86400);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", r / 3600, r / 60 % 60, r % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_validation() {
        for s in ["2180-02-29 23:59:59", "2150-01-01 00:00:00", "1970-01-01 00:00:01"] {
            assert_eq!(format_datetime(parse_datetime(s).unwrap()), s);
        }
        assert_eq!(parse_datetime("1970-01-02"), Some(86400));
        assert_eq!(parse_datetime("2181-02-29 00:00:00"), None);
        assert_eq!(parse_datetime("2180-13-01 00:00:00"), None);
        assert_eq!(parse_datetime("yesterday"), None);
        assert_eq!(parse_study_datetime("21800101", "93015.123"), parse_datetime("2180-01-01 09:30:15"));
        assert_eq!(parse_study_datetime("21800101", "x"), None);
    }
}
