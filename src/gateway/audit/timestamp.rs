//! UTC timestamps as the audit log writes them, from the system clock alone.

use std::time::{SystemTime, UNIX_EPOCH};

/// A point in time broken down into its UTC calendar fields.
struct Utc {
    year: i64,
    month: u32,
    day: u32,
    hour: u64,
    minute: u64,
    second: u64,
    millis: u32,
}

impl Utc {
    fn of(time: SystemTime) -> Self {
        let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
        let seconds = since.as_secs();
        let (days, of_day) = (seconds / 86_400, seconds % 86_400);
        let (year, month, day) = civil_from_days(days as i64);
        Self {
            year,
            month,
            day,
            hour: of_day / 3600,
            minute: of_day % 3600 / 60,
            second: of_day % 60,
            millis: since.subsec_millis(),
        }
    }
}

/// RFC 3339 in UTC with milliseconds: `2026-12-04T22:22:04.123Z`.
pub fn rfc3339_millis(time: SystemTime) -> String {
    let t = Utc::of(time);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year, t.month, t.day, t.hour, t.minute, t.second, t.millis
    )
}

/// The day of a timestamp made by [`rfc3339_millis`]: its first ten characters.
pub fn day_of(rfc3339: &str) -> &str {
    rfc3339.get(..10).unwrap_or(rfc3339)
}

/// `HHMMSS.mmm` in UTC, for object names.
pub fn object_name_time(time: SystemTime) -> String {
    let t = Utc::of(time);
    format!(
        "{:02}{:02}{:02}.{:03}",
        t.hour, t.minute, t.second, t.millis
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(seconds: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(seconds * 1000 + millis)
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(rfc3339_millis(at(0, 0)), "1970-01-01T00:00:00.000Z");
        // `date -u -d @1709251199` is 2024-02-29T23:59:59Z, a leap day.
        assert_eq!(
            rfc3339_millis(at(1_709_251_199, 7)),
            "2024-02-29T23:59:59.007Z"
        );
        assert_eq!(
            rfc3339_millis(at(1_709_251_200, 0)),
            "2024-03-01T00:00:00.000Z"
        );
        assert_eq!(
            rfc3339_millis(at(951_782_400, 999)),
            "2000-02-29T00:00:00.999Z"
        );
        assert_eq!(
            rfc3339_millis(at(4_102_444_799, 0)),
            "2099-12-31T23:59:59.000Z"
        );
        assert_eq!(day_of("2024-03-01T00:00:00.000Z"), "2024-03-01");
        assert_eq!(object_name_time(at(1_709_251_199, 7)), "235959.007");
    }
}
