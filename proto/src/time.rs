//! Times on the wire of control's API: RFC 3339 in UTC (`2026-05-02T12:00:00.000Z`), written
//! from and read back to unix milliseconds, the unit the store and the control channel keep.

/// RFC 3339 (UTC, seconds) of a unix-ms time, as agentapi-proxy writes times.
pub fn rfc3339(ms: i64) -> String {
    let mut s = rfc3339_ms(ms);
    s.replace_range(19..23, "");
    s
}

/// RFC 3339 (UTC, always with milliseconds, so that the strings sort as the times do) of a
/// unix-ms time: `2026-05-02T12:00:00.000Z`. Every time the API answers with.
pub fn rfc3339_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60,
        ms.rem_euclid(1000)
    )
}

/// Unix ms of `2026-05-02T12:00:00Z` (fractions and offsets as RFC 3339 allows) or of a plain
/// number of milliseconds.
pub fn parse_time_ms(s: &str) -> Option<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Some(ms);
    }
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    let mut frac_ms = 0;
    if let Some(f) = rest.strip_prefix('.') {
        let n = f.find(|c: char| !c.is_ascii_digit()).unwrap_or(f.len());
        let digits = &f[..n];
        frac_ms = format!("{digits:0<3}").get(..3)?.parse::<i64>().ok()?;
        rest = &f[n..];
    }
    let offset_secs = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6 => {
            let sign = match &o[..1] {
                "+" => 1,
                "-" => -1,
                _ => return None,
            };
            sign * (o[1..3].parse::<i64>().ok()? * 3600 + o[4..6].parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    // days_from_civil.
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + h * 3600 + mi * 60 + se) - offset_secs) * 1000 + frac_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_always_written_so_strings_sort_as_times() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_777_723_200_005), "2026-05-02T12:00:00.005Z");
        assert_eq!(rfc3339(1_777_723_200_005), "2026-05-02T12:00:00Z");
        assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
        let mut times = [
            1_777_723_200_000_i64,
            1_777_723_200_500,
            999,
            1_777_723_199_999,
        ];
        let mut strings: Vec<String> = times.iter().map(|t| rfc3339_ms(*t)).collect();
        times.sort();
        strings.sort();
        assert_eq!(strings, times.map(rfc3339_ms).to_vec());
        for t in times {
            assert_eq!(parse_time_ms(&rfc3339_ms(t)), Some(t));
        }
    }
}
