//! Usage events' `started`: RFC 3339 in UTC with nanoseconds, written digit by digit into a
//! stack buffer (no `fmt`), as chrono's `to_rfc3339_opts(Nanos, true)` writes it.

/// `2026-11-23T03:02:01.123456789Z`.
#[derive(Clone, Copy)]
pub struct Rfc3339 {
    buf: [u8; 30],
}

impl Rfc3339 {
    /// The time `secs` seconds and `nanos` nanoseconds after the Unix epoch; `None` after
    /// the year 9999 (or with `nanos` of a second or more), which callers format the slow way.
    pub fn from_unix(secs: u64, nanos: u32) -> Option<Self> {
        if nanos >= 1_000_000_000 {
            return None;
        }
        let days = i64::try_from(secs / 86_400).ok()?;
        let rem = secs % 86_400;
        let (year, month, day) = civil_from_days(days);
        if year > 9999 {
            return None;
        }
        let mut buf = *b"0000-00-00T00:00:00.000000000Z";
        let mut put = |at: usize, width: usize, mut v: u64| {
            for i in (at..at + width).rev() {
                buf[i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(0, 4, year as u64);
        put(5, 2, u64::from(month));
        put(8, 2, u64::from(day));
        put(11, 2, rem / 3600);
        put(14, 2, rem % 3600 / 60);
        put(17, 2, rem % 60);
        put(20, 9, u64::from(nanos));
        Some(Self { buf })
    }

    /// The same second with `nanos` (< 10⁹) nanoseconds: a time in the second of the last
    /// one costs nine digits, not the calendar.
    pub fn set_nanos(&mut self, nanos: u32) {
        let mut v = nanos % 1_000_000_000;
        for i in (20..29).rev() {
            self.buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII digits and separators are ever written.
        core::str::from_utf8(&self.buf).unwrap_or_default()
    }
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_formatted_as_chrono_formats_them() {
        let mut t = 0u64;
        for i in 0..20_000u64 {
            // Spread over 1970..2500, leap days and month ends included.
            t = t
                .wrapping_add(0x2545_f491_4f6c_dd1d)
                .wrapping_mul(6364136223846793005);
            let secs = match i {
                0 => 0,
                1 => 951_782_400,   // 2000-02-29
                2 => 4_107_542_399, // 2100-02-28T23:59:59
                _ => t % 16_725_225_600,
            };
            let nanos = (t % 1_000_000_000) as u32;
            let ours = Rfc3339::from_unix(secs, nanos).expect("in range");
            let theirs = chrono::DateTime::from_timestamp(secs as i64, nanos)
                .expect("in range")
                .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
            assert_eq!(ours.as_str(), theirs, "{secs}");
            // The same second with other nanoseconds, as a cached second is reused.
            let mut same = ours;
            let other = (nanos + 123_456_789) % 1_000_000_000;
            same.set_nanos(other);
            let theirs = chrono::DateTime::from_timestamp(secs as i64, other)
                .expect("in range")
                .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
            assert_eq!(same.as_str(), theirs, "{secs}.{other}");
        }
        assert!(
            Rfc3339::from_unix(253_402_300_800, 0).is_none(),
            "year 10000"
        );
        assert!(Rfc3339::from_unix(0, 1_000_000_000).is_none());
    }
}
