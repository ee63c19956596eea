//! Unix time <-> calendar date conversion (proleptic Gregorian, UTC) and BCD helpers.

/// Seconds per day.
const DAY_SECONDS: i64 = 86_400;

/// A broken-down UTC date and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    /// Year (proleptic Gregorian).
    pub year: i64,
    /// 1..=12
    pub month: u8,
    /// 1..=31
    pub day: u8,
    /// 0..=23
    pub hour: u8,
    /// 0..=59
    pub minute: u8,
    /// 0..=59
    pub second: u8,
    /// 0 = Sunday .. 6 = Saturday
    pub weekday: u8,
}

/// Days since 1970-01-01 of a civil date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

/// Number of days in `month` (1..=12) of `year`; 0 for an invalid month.
fn days_in_month(year: i64, month: u8) -> u8 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(year) => 29,
        2 => 28,
        _ => 0,
    }
}

impl DateTime {
    /// The date and time `secs` seconds after the Unix epoch.
    pub fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(DAY_SECONDS);
        let rem = secs.rem_euclid(DAY_SECONDS);
        let (year, month, day) = civil_from_days(days);
        Self {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
            // 1970-01-01 was a Thursday.
            weekday: (days + 4).rem_euclid(7) as u8,
        }
    }

    /// Seconds since the Unix epoch, or `None` if any field is out of range (the weekday is
    /// ignored: it follows from the date).
    pub fn to_unix(self) -> Option<i64> {
        let valid = (1..=12).contains(&self.month)
            && self.day >= 1
            && self.day <= days_in_month(self.year, self.month)
            && self.hour < 24
            && self.minute < 60
            && self.second < 60;
        valid.then(|| {
            days_from_civil(self.year, self.month, self.day) * DAY_SECONDS
                + i64::from(self.hour) * 3600
                + i64::from(self.minute) * 60
                + i64::from(self.second)
        })
    }
}

/// Encode 0..=99 as BCD (or leave binary).
pub fn encode(value: u8, bcd: bool) -> u8 {
    if bcd {
        ((value / 10 % 10) << 4) | (value % 10)
    } else {
        value
    }
}

/// Decode a BCD (or binary) register; `None` for a non-decimal BCD nibble.
pub fn decode(byte: u8, bcd: bool) -> Option<u8> {
    if !bcd {
        return Some(byte);
    }
    let (hi, lo) = (byte >> 4, byte & 0x0f);
    (hi <= 9 && lo <= 9).then_some(hi * 10 + lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_calendar_epoch_is_thursday_1970() {
        let dt = DateTime::from_unix(0);

        assert_eq!((dt.year, dt.month, dt.day, dt.weekday), (1970, 1, 1, 4));
    }

    #[test]
    fn test_calendar_known_date_round_trips() {
        // 2024-02-29T23:59:58Z, a Thursday.
        let secs = 1_709_251_198;

        let dt = DateTime::from_unix(secs);

        assert_eq!(
            (dt.year, dt.month, dt.day, dt.hour, dt.minute, dt.second, dt.weekday),
            (2024, 2, 29, 23, 59, 58, 4)
        );
        assert_eq!(dt.to_unix(), Some(secs));
    }

    #[test]
    fn test_calendar_round_trip_over_many_days() {
        for days in (-800_000..800_000).step_by(997) {
            let secs = days * DAY_SECONDS + 12_345;
            assert_eq!(DateTime::from_unix(secs).to_unix(), Some(secs));
        }
    }

    #[test]
    fn test_calendar_invalid_fields_are_refused() {
        let base = DateTime::from_unix(0);

        assert_eq!(DateTime { month: 13, ..base }.to_unix(), None);
        assert_eq!(
            DateTime {
                month: 2,
                day: 30,
                ..base
            }
            .to_unix(),
            None
        );
        assert_eq!(
            DateTime {
                year: 2023,
                month: 2,
                day: 29,
                ..base
            }
            .to_unix(),
            None
        );
        assert_eq!(DateTime { hour: 24, ..base }.to_unix(), None);
        assert_eq!(DateTime { day: 0, ..base }.to_unix(), None);
    }

    #[test]
    fn test_bcd_encode_decode() {
        assert_eq!(encode(59, true), 0x59);
        assert_eq!(encode(59, false), 59);
        assert_eq!(decode(0x59, true), Some(59));
        assert_eq!(decode(0x5a, true), None);
        assert_eq!(decode(0xa0, true), None);
        assert_eq!(decode(0xa0, false), Some(0xa0));
    }
}
