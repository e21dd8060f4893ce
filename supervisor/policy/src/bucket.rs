//! A token bucket: a burst, then a steady refill. The one rate-limit
//! arithmetic of warden, used by the daemon (spawns, reports, audit
//! budgets) and by a worker's init (reports of its denied calls).

use std::time::{Duration, Instant};

use crate::Rate;

/// One token bucket.
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    rate: Rate,
    last: Instant,
    suppressed: u64,
}

impl Bucket {
    pub fn new(rate: Rate) -> Self {
        Bucket {
            tokens: burst(rate),
            rate,
            last: Instant::now(),
            suppressed: 0,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + elapsed * self.rate.per_second).min(burst(self.rate));
    }

    /// Takes one token. When there is one, returns how many were refused
    /// since the last time one was taken (to report them); otherwise counts
    /// this one as refused.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        self.take(1.0, now).then(|| std::mem::take(&mut self.suppressed))
    }

    /// Takes `n` tokens if there are that many; counts a refusal if not.
    pub fn take(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Takes `n` tokens even into debt (for what must happen anyway; the
    /// debt is paid back by the refill before anything else is let through).
    pub fn charge(&mut self, n: f64, now: Instant) {
        self.refill(now);
        self.tokens -= n;
    }

    /// Whether there is at least one token.
    pub fn has_tokens(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= 1.0
    }

    /// Refused since the last admission.
    pub fn pending(&self) -> u64 {
        self.suppressed
    }

    /// Takes the refused count (it is being reported).
    pub fn take_pending(&mut self) -> u64 {
        std::mem::take(&mut self.suppressed)
    }

    /// How long until `n` tokens are there (zero: now).
    pub fn wait_for(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        let missing = n - self.tokens;
        if missing <= 0.0 || self.rate.per_second <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(missing / self.rate.per_second)
        }
    }

    /// Full, with nothing refused left to report: the same as a new one.
    pub fn is_idle(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.suppressed == 0 && self.tokens >= burst(self.rate)
    }
}

#[allow(clippy::cast_precision_loss)] // Bursts are far below 2^52.
fn burst(rate: Rate) -> f64 {
    rate.burst as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storm_is_cut_to_the_burst_then_the_refill_and_counted() {
        let mut l = Bucket::new(Rate::new(3, 10.0));
        let t0 = Instant::now();
        let admitted: Vec<Option<u64>> = (0..6).map(|_| l.admit(t0)).collect();
        assert_eq!(admitted, [Some(0), Some(0), Some(0), None, None, None]);
        // 100 ms later one token is back, and it reports the 3 suppressed.
        assert_eq!(l.admit(t0 + Duration::from_millis(100)), Some(3));
        assert_eq!(l.admit(t0 + Duration::from_millis(100)), None);
        assert_eq!(l.pending(), 1);
    }

    #[test]
    fn a_charge_into_debt_is_paid_back_first() {
        let mut b = Bucket::new(Rate::new(10, 10.0));
        let t0 = Instant::now();
        b.charge(30.0, t0);
        assert!(!b.take(1.0, t0 + Duration::from_secs(1)), "still 10 in debt");
        let wait = b.wait_for(1.0, t0 + Duration::from_secs(1));
        assert_eq!(wait.as_millis(), 1100, "{wait:?}");
        assert!(b.take(1.0, t0 + Duration::from_millis(2100)));
    }
}
