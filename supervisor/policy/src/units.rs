//! Human-friendly values in profiles and the config, each parsed once into a
//! type: sizes ([`ByteSize`], "512M"), durations ([`Seconds`], "2h") and
//! CPU quotas ([`CpuQuota`], "150%"), rate limits ([`Rate`], a burst then
//! "60/min"). They deserialize straight from the
//! TOML string, so a bad value is reported at its place in the file and no
//! later code parses it again.

use std::marker::PhantomData;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

/// Implements `Deserialize` for types read from a TOML string or integer
/// through their `TryFrom<String>` or `TryFrom<u64>`. The conversion runs
/// inside the deserializer, so a bad value is reported at the value itself
/// (with `#[serde(try_from)]`, toml would point a bad list element at the
/// whole list).
macro_rules! deserialize_via {
    (String: $($t:ty),+ $(,)?) => {$(
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                $crate::units::from_string(d)
            }
        }
    )+};
    (u64: $($t:ty),+ $(,)?) => {$(
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                $crate::units::from_u64(d)
            }
        }
    )+};
}
pub(crate) use deserialize_via;

pub(crate) fn from_string<'de, D: Deserializer<'de>, T: TryFrom<String, Error = String>>(d: D) -> Result<T, D::Error> {
    struct V<T>(PhantomData<T>);
    impl<T: TryFrom<String, Error = String>> Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
            T::try_from(s.to_string()).map_err(E::custom)
        }
    }
    d.deserialize_string(V(PhantomData))
}

pub(crate) fn from_u64<'de, D: Deserializer<'de>, T: TryFrom<u64, Error = String>>(d: D) -> Result<T, D::Error> {
    struct V<T>(PhantomData<T>);
    impl<T: TryFrom<u64, Error = String>> Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a non-negative integer")
        }
        fn visit_u64<E: de::Error>(self, n: u64) -> Result<T, E> {
            T::try_from(n).map_err(E::custom)
        }
        fn visit_i64<E: de::Error>(self, n: i64) -> Result<T, E> {
            let n = u64::try_from(n).map_err(|_| E::invalid_value(de::Unexpected::Signed(n), &self))?;
            self.visit_u64(n)
        }
    }
    d.deserialize_u64(V(PhantomData))
}

deserialize_via!(String: ByteSize, Seconds, CpuQuota);

/// A byte count: a plain integer or one with a binary suffix K, M, G, T
/// (optionally followed by "i"/"iB"/"B").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(into = "u64")]
pub struct ByteSize(pub u64);

/// A duration in whole seconds: an integer followed by s, m, h or d (a bare
/// integer is seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(into = "u64")]
pub struct Seconds(pub u64);

/// A CPU quota given as a percentage of one CPU ("50%", "200%"), held as the
/// microseconds a worker may run per 100 ms period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(into = "u64")]
pub struct CpuQuota(pub u64);

impl TryFrom<String> for ByteSize {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        parse_size(&s).map(ByteSize)
    }
}

impl TryFrom<String> for Seconds {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        parse_duration(&s).map(Seconds)
    }
}

impl TryFrom<String> for CpuQuota {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        parse_cpu_quota(&s).map(CpuQuota)
    }
}

impl From<ByteSize> for u64 {
    fn from(v: ByteSize) -> u64 {
        v.0
    }
}

impl From<Seconds> for u64 {
    fn from(v: Seconds) -> u64 {
        v.0
    }
}

impl From<CpuQuota> for u64 {
    fn from(v: CpuQuota) -> u64 {
        v.0
    }
}

/// An amount: a plain integer, or a size string like "16M".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Amount(u64);

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Amount;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a count, or a size like \"16M\"")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Amount, E> {
                Ok(Amount(n))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Amount, E> {
                u64::try_from(n)
                    .map(Amount)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(n), &self))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Amount, E> {
                parse_size(s).map(Amount).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A rate limit: a burst, then a steady rate (a token bucket). Written
/// `{ burst = 30, rate = "60/min" }`; the rate is an amount per `s`,
/// `min`, `h` or `day`, and amounts may be sizes (`rate = "256M/day"`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rate {
    pub burst: u64,
    pub per_second: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRate {
    burst: Amount,
    rate: String,
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawRate::deserialize(d)?;
        let per_second = parse_rate(&raw.rate).map_err(de::Error::custom)?;
        if raw.burst.0 == 0 {
            return Err(de::Error::custom("expected a burst of at least 1"));
        }
        Ok(Rate {
            burst: raw.burst.0,
            per_second,
        })
    }
}

impl Rate {
    pub const fn new(burst: u64, per_second: f64) -> Rate {
        Rate { burst, per_second }
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let expected = || format!("expected a rate like \"10/s\", \"60/min\" or \"256M/day\", got {s:?}");
    let (amount, per) = s.split_once('/').ok_or_else(expected)?;
    let n = parse_size(amount).map_err(|_| expected())?;
    let secs: u32 = match per.trim() {
        "s" => 1,
        "min" => 60,
        "h" => 3600,
        "day" => 86400,
        _ => return Err(expected()),
    };
    if n == 0 {
        return Err(format!(
            "rate {s:?} is zero: nothing would ever be allowed after the burst"
        ));
    }
    #[allow(clippy::cast_precision_loss)] // Rates far below 2^52 per second.
    Ok(n as f64 / f64::from(secs))
}

/// `<digits><suffix>` split at the first non-digit.
fn split_number(s: &str) -> Option<(u64, &str)> {
    let t = s.trim();
    let end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(end);
    Some((num.parse().ok()?, suffix))
}

fn parse_size(s: &str) -> Result<u64, String> {
    let expected = || format!("expected a size like \"512M\" or \"4G\", got {s:?}");
    let (n, suffix) = split_number(s).ok_or_else(expected)?;
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

fn parse_duration(s: &str) -> Result<u64, String> {
    let expected = || format!("expected a duration like \"30s\", \"10m\" or \"2h\", got {s:?}");
    let (n, suffix) = split_number(s).ok_or_else(expected)?;
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

fn parse_cpu_quota(s: &str) -> Result<u64, String> {
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
    fn rates() {
        let r: Rate =
            toml::from_str::<std::collections::BTreeMap<String, Rate>>("r = { burst = 30, rate = \"60/min\" }")
                .unwrap()["r"];
        assert_eq!(r, Rate::new(30, 1.0));
        let r: Rate =
            toml::from_str::<std::collections::BTreeMap<String, Rate>>("r = { burst = \"16M\", rate = \"864K/day\" }")
                .unwrap()["r"];
        assert_eq!(r.burst, 16 << 20);
        assert!((r.per_second - 10.24).abs() < 1e-9, "{r:?}");
        assert!(parse_rate("10").is_err());
        assert!(parse_rate("10/week").is_err());
        assert!(parse_rate("0/s").unwrap_err().contains("zero"));
        let e = toml::from_str::<std::collections::BTreeMap<String, Rate>>("r = { burst = 0, rate = \"1/s\" }")
            .unwrap_err()
            .to_string();
        assert!(e.contains("burst of at least 1"), "{e}");
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

    #[test]
    fn values_deserialize_from_their_text() {
        #[derive(Debug, serde::Deserialize)]
        struct T {
            size: ByteSize,
            time: Seconds,
            cpu: CpuQuota,
        }
        let t: T = toml::from_str("size = \"2M\"\ntime = \"1m\"\ncpu = \"50%\"\n").unwrap();
        assert_eq!(
            (t.size, t.time, t.cpu),
            (ByteSize(2 << 20), Seconds(60), CpuQuota(50_000))
        );
        let e = toml::from_str::<T>("size = \"lots\"\ntime = \"1m\"\ncpu = \"50%\"\n").unwrap_err();
        assert!(e.message().starts_with("expected a size"), "{e}");
        assert_eq!(e.span().map(|s| s.start), Some(7), "the error points at the value");
    }
}
