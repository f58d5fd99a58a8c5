//! Event time: parsing `received_at` / `created_at` and rendering it back.
//!
//! Times are kept as microseconds since the Unix epoch (UTC) so they compare as
//! integers. Accepted inputs: the seed format `2020-12-08 20:03:16.759617` (no zone,
//! read as UTC) and RFC 3339 (`2020-12-08T20:03:16.759617Z`, `...+02:00`).

/// Microseconds since 1970-01-01T00:00:00Z.
pub type Micros = i64;

const MICROS_PER_SEC: i64 = 1_000_000;
const SECS_PER_DAY: i64 = 86_400;

/// Parses an event time.
///
/// # Errors
/// Returns a message naming the expected formats when `text` is not one of them or
/// names an impossible date or time.
pub fn parse(text: &str) -> Result<Micros, String> {
    parse_inner(text.as_bytes()).ok_or_else(|| {
        format!(
            "invalid timestamp {:?}: expected \"YYYY-MM-DD HH:MM:SS[.ffffff]\" (UTC) or RFC 3339",
            truncate(text, 64)
        )
    })
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

fn parse_inner(b: &[u8]) -> Option<Micros> {
    let year = digits(b, 0, 4)?;
    expect(b, 4, b'-')?;
    let month = digits(b, 5, 2)?;
    expect(b, 7, b'-')?;
    let day = digits(b, 8, 2)?;
    if !matches!(b.get(10), Some(b' ' | b'T' | b't')) {
        return None;
    }
    let hour = digits(b, 11, 2)?;
    expect(b, 13, b':')?;
    let minute = digits(b, 14, 2)?;
    expect(b, 16, b':')?;
    let second = digits(b, 17, 2)?;
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    // 60 is allowed for a leap second; it folds into the next minute.
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut pos = 19;
    let mut micros = 0i64;
    if b.get(pos) == Some(&b'.') {
        pos += 1;
        let start = pos;
        while let Some(d) = b.get(pos).filter(|c| c.is_ascii_digit()) {
            // Digits past the sixth are below our resolution and are truncated.
            if pos - start < 6 {
                micros = micros * 10 + i64::from(d - b'0');
            }
            pos += 1;
        }
        let n = pos - start;
        if n == 0 || n > 9 {
            return None;
        }
        for _ in n..6 {
            micros *= 10;
        }
    }
    let offset_secs = match b.get(pos) {
        None => 0,
        Some(b'Z' | b'z') if pos + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) => {
            let oh = digits(b, pos + 1, 2)?;
            let rest = &b[pos + 3..];
            let om = match rest {
                [b':', m1, m2] | [m1, m2] => digits(&[*m1, *m2], 0, 2)?,
                [] => 0,
                _ => return None,
            };
            if oh > 23 || om > 59 {
                return None;
            }
            let secs = oh * 3600 + om * 60;
            if sign == b'+' { secs } else { -secs }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * SECS_PER_DAY + hour * 3600 + minute * 60 + second - offset_secs;
    Some(secs * MICROS_PER_SEC + micros)
}

fn digits(b: &[u8], at: usize, n: usize) -> Option<i64> {
    let slice = b.get(at..at + n)?;
    slice.iter().try_fold(0i64, |acc, c| {
        c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
    })
}

fn expect(b: &[u8], at: usize, c: u8) -> Option<()> {
    (b.get(at) == Some(&c)).then_some(())
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Howard Hinnant's days_from_civil / civil_from_days: exact for the proleptic
// Gregorian calendar, no tables.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Bytes of [`render`]'s text for a time that [`renders_exactly`].
pub const RENDERED_LEN: usize = 27;

/// Whether [`render`] writes `t` as the [`RENDERED_LEN`] bytes
/// `YYYY-MM-DDTHH:MM:SS.ffffffZ`, which [`parse`] reads back as `t`: years 0000-9999.
pub fn renders_exactly(t: Micros) -> bool {
    (FIRST_RENDERED..=LAST_RENDERED).contains(&t)
}

/// 0000-01-01T00:00:00Z and the last microsecond of 9999.
const FIRST_RENDERED: Micros = -62_167_219_200 * MICROS_PER_SEC;
const LAST_RENDERED: Micros = 253_402_300_800 * MICROS_PER_SEC - 1;

/// Reads back what [`render`] wrote for a time that [`renders_exactly`]: [`parse`]'s
/// reader, held to that one form, `YYYY-MM-DDTHH:MM:SS.ffffffZ` (no leap second,
/// which `render` never writes).
pub fn parse_rendered(text: &str) -> Option<Micros> {
    let b = text.as_bytes();
    let form =
        b.len() == RENDERED_LEN && b[10] == b'T' && b[17] < b'6' && b[19] == b'.' && b[26] == b'Z';
    form.then(|| parse_inner(b)).flatten()
}

/// Renders a time as RFC 3339 in UTC with microseconds, e.g. `2020-12-08T20:03:16.759617Z`.
pub fn render(t: Micros) -> String {
    let mut out = String::with_capacity(27);
    render_into(&mut out, t);
    out
}

/// [`render`], appended to `out` (no formatting machinery: this runs for every answer).
pub fn render_into(out: &mut String, t: Micros) {
    let secs = t.div_euclid(MICROS_PER_SEC);
    let micros = t.rem_euclid(MICROS_PER_SEC);
    let days = secs.div_euclid(SECS_PER_DAY);
    let sod = secs.rem_euclid(SECS_PER_DAY);
    let (y, m, d) = civil_from_days(days);
    if !(0..=9999).contains(&y) {
        // Outside four-digit years (only reachable from RFC 3339 offsets at the edges).
        out.push_str(&format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
            sod / 3600,
            sod / 60 % 60,
            sod % 60
        ));
        return;
    }
    let mut buf = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut v: i64| {
        for i in (at..at + width).rev() {
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, y);
    put(5, 2, m);
    put(8, 2, d);
    put(11, 2, sod / 3600);
    put(14, 2, sod / 60 % 60);
    put(17, 2, sod % 60);
    put(20, 6, micros);
    // Every byte written above is an ASCII digit or one of the template's.
    out.push_str(std::str::from_utf8(&buf).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_that_renders_exactly_parses_back_to_itself() {
        let first = parse("0000-01-01T00:00:00.000000Z").unwrap();
        let last = parse("9999-12-31T23:59:59.999999Z").unwrap();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut times = vec![first, last, 0, -1, 1_607_457_796_759_617];
        for _ in 0..100_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            times.push(first + (seed % (last - first + 1) as u64) as i64);
        }
        for t in times {
            assert!(renders_exactly(t), "{t}");
            let text = render(t);
            assert_eq!(text.len(), RENDERED_LEN, "{text}");
            assert_eq!(parse(&text), Ok(t), "{text}");
            assert_eq!(parse_rendered(&text), Some(t), "{text}");
        }
        for t in [first - 1, last + 1, i64::MIN, i64::MAX] {
            assert!(!renders_exactly(t), "{t}");
        }
        // Only that form, and only real times.
        for text in [
            "2020-12-08 20:03:16.759617Z",
            "2020-12-08T20:03:16.759617",
            "2020-12-08T20:03:16.75961Z",
            "2020-02-30T20:03:16.759617Z",
            "2020-12-08T24:03:16.759617Z",
            "2020-12-08T20:03:60.759617Z",
            "2020-12-08T20:0x:16.759617Z",
            "+020-12-08T20:03:16.759617Z",
        ] {
            assert_eq!(parse_rendered(text), None, "{text}");
        }
    }

    #[test]
    fn seed_format_is_utc_microseconds() {
        let t = parse("2020-12-08 20:03:16.759617").unwrap();
        assert_eq!(t, 1_607_457_796_759_617);
        assert_eq!(render(t), "2020-12-08T20:03:16.759617Z");
    }

    #[test]
    fn rfc3339_with_zone_and_without_fraction() {
        assert_eq!(
            parse("2020-12-08T20:03:16Z").unwrap(),
            parse("2020-12-08 20:03:16.000000").unwrap()
        );
        assert_eq!(
            parse("2020-12-08T22:03:16.5+02:00").unwrap(),
            parse("2020-12-08 20:03:16.500000").unwrap()
        );
        assert_eq!(
            parse("2020-12-08T18:03:16-0200").unwrap(),
            parse("2020-12-08 20:03:16").unwrap()
        );
    }

    #[test]
    fn nanoseconds_are_truncated_to_micros() {
        assert_eq!(
            parse("2020-12-08T20:03:16.123456789Z").unwrap() % 1_000_000,
            123_456
        );
    }

    #[test]
    fn impossible_dates_and_junk_are_refused() {
        for bad in [
            "",
            "2020-02-30 00:00:00",
            "2021-02-29 00:00:00",
            "2020-13-01 00:00:00",
            "2020-12-08 24:00:00",
            "2020-12-08",
            "2020-12-08 20:03:16.",
            "2020-12-08 20:03:16.1234567890",
            "2020-12-08 20:03:16Zjunk",
            "2020-12-08 20:03:16+25:00",
            "yesterday",
            "２０２０-12-08 20:03:16",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(parse("2020-02-29 00:00:00").is_ok(), "leap day");
    }

    #[test]
    fn render_round_trips_across_eras() {
        for text in [
            "1970-01-01T00:00:00.000000Z",
            "1969-12-31T23:59:59.999999Z",
            "0001-01-01T00:00:00.000000Z",
            "2400-02-29T12:34:56.000001Z",
            "9999-12-31T23:59:59.999999Z",
        ] {
            assert_eq!(render(parse(text).unwrap()), text);
        }
    }
}
