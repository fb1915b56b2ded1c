//! ISO 8601 dates and times as seconds since 1970-01-01 UTC, so that an
//! interactions file may carry `2019-03-01` or `2019-03-01T12:34:56Z`
//! where MovieLens carries Unix seconds.
//!
//! Accepted: `YYYY-MM-DD`, optionally followed by `T` (or a space) and
//! `HH:MM`, `HH:MM:SS` or `HH:MM:SS.fraction`, optionally followed by `Z` or
//! an offset `±HH`, `±HHMM` or `±HH:MM`. A date without an offset is taken as
//! UTC (only the order of one user's interactions matters). Day 0 is
//! 1970-01-01 on the proleptic Gregorian calendar, as in Unix time.

/// Seconds since 1970-01-01T00:00:00Z of the ISO 8601 date or date-time
/// `text`.
///
/// # Errors
/// What is wrong with `text`, for an error message that names it.
pub fn parse_iso8601(text: &str) -> Result<f64, String> {
    let mut p = Cursor {
        rest: text.as_bytes(),
    };
    let year = p.digits(4, "a four-digit year")?;
    p.expect(b'-', "`-` after the year")?;
    let month = p.digits(2, "a two-digit month")?;
    p.expect(b'-', "`-` after the month")?;
    let day = p.digits(2, "a two-digit day")?;
    if !(1..=12).contains(&month) {
        return Err(format!("month {month} is not in 1..=12"));
    }
    let days_in_month = match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if !(1..=days_in_month).contains(&day) {
        return Err(format!(
            "day {day} is not in 1..={days_in_month} for {year}-{month:02}"
        ));
    }
    let mut seconds = 0.0;
    if matches!(p.peek(), Some(b'T' | b't' | b' ')) {
        p.rest = &p.rest[1..];
        let hour = p.digits(2, "a two-digit hour")?;
        p.expect(b':', "`:` after the hour")?;
        let minute = p.digits(2, "two-digit minutes")?;
        let second = if p.peek() == Some(b':') {
            p.rest = &p.rest[1..];
            p.digits(2, "two-digit seconds")?
        } else {
            0
        };
        // 24:00 is not accepted; a leap second (60) is.
        if hour > 23 || minute > 59 || second > 60 {
            return Err(format!(
                "time {hour:02}:{minute:02}:{second:02} is out of range"
            ));
        }
        seconds = f64::from(hour * 3600 + minute * 60 + second);
        if matches!(p.peek(), Some(b'.' | b',')) {
            p.rest = &p.rest[1..];
            let n = p.rest.iter().take_while(|b| b.is_ascii_digit()).count();
            if n == 0 {
                return Err("digits after the decimal point of the seconds".into());
            }
            let fraction = std::str::from_utf8(&p.rest[..n]).expect("ASCII digits");
            seconds += format!("0.{fraction}").parse::<f64>().expect("digits");
            p.rest = &p.rest[n..];
        }
        match p.peek() {
            Some(b'Z' | b'z') => p.rest = &p.rest[1..],
            Some(sign @ (b'+' | b'-')) => {
                p.rest = &p.rest[1..];
                let hours = p.digits(2, "a two-digit offset hour")?;
                if p.peek() == Some(b':') {
                    p.rest = &p.rest[1..];
                }
                let minutes = if p.rest.is_empty() {
                    0
                } else {
                    p.digits(2, "two-digit offset minutes")?
                };
                if hours > 23 || minutes > 59 {
                    return Err(format!("offset {hours:02}:{minutes:02} is out of range"));
                }
                // Local time = UTC + offset, so UTC = local − offset.
                let offset = f64::from(hours * 3600 + minutes * 60);
                seconds += if sign == b'+' { -offset } else { offset };
            }
            _ => {}
        }
    }
    if !p.rest.is_empty() {
        return Err(format!(
            "unexpected `{}` after the date",
            String::from_utf8_lossy(p.rest)
        ));
    }
    Ok(days_from_civil(year, month, day) as f64 * 86_400.0 + seconds)
}

/// Days from 1970-01-01 to `year-month-day` (Gregorian): the day count
/// of whole 400-year eras (146,097 days each) since year 0, plus the day of
/// the era, with years starting in March so that the leap day comes last.
fn days_from_civil(year: u32, month: u32, day: u32) -> i64 {
    let y = i64::from(year) - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let month_from_march = i64::from((month + 9) % 12);
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn is_leap(year: u32) -> bool {
    year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400))
}

/// The unread rest of the text.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    /// Reads exactly `n` ASCII digits.
    fn digits(&mut self, n: usize, what: &str) -> Result<u32, String> {
        match self.rest.get(..n) {
            Some(d) if d.iter().all(u8::is_ascii_digit) => {
                self.rest = &self.rest[n..];
                Ok(d.iter().fold(0, |acc, &b| acc * 10 + u32::from(b - b'0')))
            }
            _ => Err(format!("expected {what}")),
        }
    }

    fn expect(&mut self, byte: u8, what: &str) -> Result<(), String> {
        if self.peek() == Some(byte) {
            self.rest = &self.rest[1..];
            Ok(())
        } else {
            Err(format!("expected {what}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_count_days_from_1970() {
        assert_eq!(parse_iso8601("1970-01-01"), Ok(0.0));
        assert_eq!(parse_iso8601("1969-12-31"), Ok(-86_400.0));
        assert_eq!(parse_iso8601("2000-03-01"), Ok(11_017.0 * 86_400.0));
        // 978300760 is MovieLens 1M's first timestamp: 2000-12-31T22:12:40Z.
        assert_eq!(parse_iso8601("2000-12-31T22:12:40Z"), Ok(978_300_760.0));
        assert_eq!(parse_iso8601("2000-12-31 22:12:40"), Ok(978_300_760.0));
        assert_eq!(
            parse_iso8601("2001-01-01T00:12:40+02:00"),
            Ok(978_300_760.0)
        );
        assert_eq!(parse_iso8601("2000-12-31T21:12:40-0100"), Ok(978_300_760.0));
        assert_eq!(parse_iso8601("2000-12-31T23:12:40+01"), Ok(978_300_760.0));
        assert_eq!(parse_iso8601("2000-12-31T22:12"), Ok(978_300_720.0));
        assert_eq!(parse_iso8601("2000-12-31T22:12:40.25Z"), Ok(978_300_760.25));
        assert_eq!(parse_iso8601("2024-02-29"), Ok(19_782.0 * 86_400.0));
        assert_eq!(parse_iso8601("1600-03-01"), Ok(-135_080.0 * 86_400.0));
    }

    #[test]
    fn dates_order_as_time_does() {
        let times = [
            "1999-12-31T23:59:59Z",
            "2000-01-01",
            "2000-01-01T00:00:00.5",
            "2000-02-28T12:00",
            "2000-02-29",
            "2000-03-01",
            "2023-10-05T08:00:00+02:00",
            "2023-10-05T07:00:00Z",
        ];
        let secs: Vec<f64> = times.iter().map(|t| parse_iso8601(t).unwrap()).collect();
        assert!(secs.windows(2).all(|w| w[0] < w[1]), "{secs:?}");
    }

    #[test]
    fn bad_dates_say_what_is_wrong() {
        for (text, needle) in [
            ("2019-13-01", "month 13"),
            ("2019-02-29", "day 29 is not in 1..=28"),
            ("1900-02-29", "day 29"),
            ("2019-04-31", "day 31 is not in 1..=30"),
            ("2019-1-01", "two-digit month"),
            ("19-01-01", "four-digit year"),
            ("2019/01/01", "`-` after the year"),
            ("2019-01-01T25:00", "out of range"),
            ("2019-01-01T12", "`:` after the hour"),
            ("2019-01-01T12:00:00.", "decimal point"),
            ("2019-01-01T12:00+2", "offset hour"),
            ("2019-01-01 noon", "two-digit hour"),
            ("2019-01-01x", "unexpected `x`"),
            ("yesterday", "four-digit year"),
            ("", "four-digit year"),
        ] {
            let e = parse_iso8601(text).unwrap_err();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }
}
