//! Human-friendly units in profiles: sizes ("512M"), durations ("2h") and CPU
//! quotas ("150%").

/// Parses a byte size: a plain integer or one with a binary suffix K, M, G, T
/// (optionally followed by "i"/"iB"/"B"). Returns a description of what was
/// expected on error.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    let expected = || format!("expected a size like \"512M\" or \"4G\", got {s:?}");
    if num.is_empty() {
        return Err(expected());
    }
    let n: u64 = num.parse().map_err(|_| expected())?;
    let mult: u64 = match suffix.trim().trim_end_matches('B').trim_end_matches('i') {
        "" => 1,
        "K" | "k" => 1 << 10,
        "M" | "m" => 1 << 20,
        "G" | "g" => 1 << 30,
        "T" | "t" => 1 << 40,
        _ => return Err(expected()),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"))
}

/// Parses a duration: an integer followed by s, m, h or d (a bare integer is seconds).
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    let expected = || format!("expected a duration like \"30s\", \"10m\" or \"2h\", got {s:?}");
    if num.is_empty() {
        return Err(expected());
    }
    let n: u64 = num.parse().map_err(|_| expected())?;
    let mult = match suffix {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(expected()),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("duration {s:?} is too large"))
}

/// Parses a CPU quota given as a percentage of one CPU ("50%", "200%") into
/// the microseconds a worker may run per 100 ms period.
pub fn parse_cpu_quota(s: &str) -> Result<u64, String> {
    let expected = || format!("expected a percentage of one CPU like \"150%\", got {s:?}");
    let pct: u64 = s
        .trim()
        .strip_suffix('%')
        .ok_or_else(expected)?
        .trim()
        .parse()
        .map_err(|_| expected())?;
    if pct == 0 || pct > 100_000 {
        return Err(format!("CPU quota {s:?} is out of range (1% to 100000%)"));
    }
    Ok(pct * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("G").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(30));
        assert_eq!(parse_duration("10m"), Ok(600));
        assert_eq!(parse_duration("2h"), Ok(7200));
        assert_eq!(parse_duration("45"), Ok(45));
        assert!(parse_duration("1w").is_err());
    }

    #[test]
    fn cpu_quota() {
        assert_eq!(parse_cpu_quota("150%"), Ok(150_000));
        assert!(parse_cpu_quota("150").is_err());
        assert!(parse_cpu_quota("0%").is_err());
    }
}
