//! `CoreRng`: the core's only source of randomness (connection IDs, backoff
//! jitter, client IDs, the filler of stateless resets).
//!
//! Seeded by the caller, portable (ChaCha8), so the same seed takes the same
//! path on every platform and version. Production seeds it from the OS; a
//! simulation from a number it prints.

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

/// A seeded, portable random number generator.
#[derive(Debug, Clone)]
pub struct CoreRng(ChaCha8Rng);

impl CoreRng {
    /// A generator from a 64-bit seed (simulations, tests).
    pub fn from_seed(seed: u64) -> CoreRng {
        CoreRng(ChaCha8Rng::seed_from_u64(seed))
    }

    /// A generator from 32 bytes of seed (production: fill them from the OS).
    pub fn from_seed_bytes(seed: [u8; 32]) -> CoreRng {
        CoreRng(ChaCha8Rng::from_seed(seed))
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        self.0.fill_bytes(buf);
    }

    /// A random `u64`.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// A uniform `f64` in `[0, 1)`.
    pub fn unit_f64(&mut self) -> f64 {
        // 53 random bits -> the mantissa of a double in [0, 1).
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A child generator, for a component that needs its own stream.
    pub fn fork(&mut self) -> CoreRng {
        let mut seed = [0u8; 32];
        self.fill(&mut seed);
        CoreRng::from_seed_bytes(seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bytes() {
        let (mut a, mut b) = (CoreRng::from_seed(7), CoreRng::from_seed(7));
        assert_eq!(a.next_u64(), b.next_u64());
        let mut c = CoreRng::from_seed(8);
        assert_ne!(CoreRng::from_seed(7).next_u64(), c.next_u64());
    }

    #[test]
    fn unit_is_in_range() {
        let mut r = CoreRng::from_seed(1);
        for _ in 0..10_000 {
            let x = r.unit_f64();
            assert!((0.0..1.0).contains(&x));
        }
    }
}
