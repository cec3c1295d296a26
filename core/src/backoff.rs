//! Reconnect delays: exponential backoff with jitter, reset once a
//! connection has carried an answer (see the client's module doc).
//!
//! Attempt `n` (0-based) waits a uniform time in `[d/2, d]` where
//! `d = min(initial * 2^n, max)` ("equal jitter"): never zero, never above
//! the cap, and clients that lost the same server spread out.

use std::time::Duration;

use crate::rng::CoreRng;

/// Backoff settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Delay bound of the first retry.
    pub initial: Duration,
    /// The cap on any delay.
    pub max: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        }
    }
}

/// The backoff state: how many attempts failed since the last success.
#[derive(Debug, Clone)]
pub struct Backoff {
    cfg: BackoffConfig,
    failures: u32,
}

impl Backoff {
    /// A fresh backoff.
    pub fn new(cfg: BackoffConfig) -> Backoff {
        Backoff { cfg, failures: 0 }
    }

    /// The delay before the next attempt; each call counts one more failure.
    pub fn next_delay(&mut self, rng: &mut CoreRng) -> Duration {
        let shift = self.failures.min(30);
        self.failures = self.failures.saturating_add(1);
        let bound = self
            .cfg
            .initial
            .saturating_mul(1u32 << shift)
            .min(self.cfg.max);
        let half = bound / 2;
        half + (bound - half).mul_f64(rng.unit_f64())
    }

    /// A connection succeeded: the next delay starts from `initial` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Failures since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter() {
        let cfg = BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let mut b = Backoff::new(cfg);
        let mut rng = CoreRng::from_seed(3);
        let bounds = [100u64, 200, 400, 800, 1000, 1000, 1000];
        for bound in bounds {
            let d = b.next_delay(&mut rng);
            let bound = Duration::from_millis(bound);
            assert!(
                d >= bound / 2 && d <= bound,
                "{d:?} not in [{:?}, {bound:?}]",
                bound / 2
            );
        }
        assert_eq!(b.failures(), 7);
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(BackoffConfig::default());
        let mut rng = CoreRng::from_seed(4);
        for _ in 0..10 {
            b.next_delay(&mut rng);
        }
        b.reset();
        assert!(b.next_delay(&mut rng) <= Duration::from_millis(100));
    }

    #[test]
    fn jitter_spreads_and_repeats_per_seed() {
        let draw = |seed| {
            let mut b = Backoff::new(BackoffConfig::default());
            let mut rng = CoreRng::from_seed(seed);
            (0..5).map(|_| b.next_delay(&mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(9), draw(9));
        assert_ne!(draw(9), draw(10));
    }

    #[test]
    fn many_failures_do_not_overflow() {
        let mut b = Backoff::new(BackoffConfig::default());
        let mut rng = CoreRng::from_seed(5);
        for _ in 0..1000 {
            assert!(b.next_delay(&mut rng) <= Duration::from_secs(1));
        }
    }
}
