//! The server's memory of recorded reports, keyed by `(client, seq)`, with
//! bounded memory.
//!
//! Per client: a *floor* (every seq below it was recorded; seqs start at
//! 1, so a new client's floor is 1) and the set of recorded seqs above it. Recording the floor's seq advances the floor over
//! the contiguous run, so a client that reports in order costs a few bytes.
//! When a client's set grows past `per_client` entries, the floor jumps to
//! the smallest entry (gaps below it are then taken as seen). At most
//! `max_clients` clients are remembered; the least recently active is
//! forgotten first.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Settings for [`Dedup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupConfig {
    /// Clients remembered at most.
    pub max_clients: usize,
    /// Out-of-order seqs remembered per client at most.
    pub per_client: usize,
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            max_clients: 100_000,
            per_client: 4096,
        }
    }
}

#[derive(Debug)]
struct Seen {
    floor: u64,
    above: BTreeSet<u64>,
    touched: u64,
}

impl Default for Seen {
    fn default() -> Seen {
        // The protocol's first seq is 1 (report.rs refuses 0).
        Seen {
            floor: 1,
            above: BTreeSet::new(),
            touched: 0,
        }
    }
}

impl Seen {
    fn contains(&self, seq: u64) -> bool {
        seq < self.floor || self.above.contains(&seq)
    }

    fn insert(&mut self, seq: u64, cap: usize) {
        if seq < self.floor {
            return;
        }
        self.above.insert(seq);
        while self.above.first() == Some(&self.floor) {
            self.above.pop_first();
            self.floor += 1;
        }
        while self.above.len() > cap {
            if let Some(s) = self.above.pop_first() {
                self.floor = s + 1;
            }
        }
        while self.above.first() == Some(&self.floor) {
            self.above.pop_first();
            self.floor += 1;
        }
    }
}

/// The set of recorded `(client, seq)` pairs.
#[derive(Debug, Default)]
pub struct Dedup {
    cfg: DedupConfig,
    clients: HashMap<String, Seen>,
    by_age: BTreeMap<u64, String>,
    tick: u64,
}

impl Dedup {
    /// An empty set.
    pub fn new(cfg: DedupConfig) -> Dedup {
        Dedup {
            cfg,
            ..Dedup::default()
        }
    }

    /// Whether `(client, seq)` was recorded.
    pub fn contains(&self, client: &str, seq: u64) -> bool {
        self.clients.get(client).is_some_and(|s| s.contains(seq))
    }

    /// Remembers that `(client, seq)` was recorded.
    pub fn insert(&mut self, client: &str, seq: u64) {
        self.tick += 1;
        let tick = self.tick;
        let cap = self.cfg.per_client.max(1);
        if let Some(seen) = self.clients.get_mut(client) {
            // Re-touch: the name moves to its new age, no allocation.
            let name = self
                .by_age
                .remove(&seen.touched)
                .unwrap_or_else(|| client.to_owned());
            seen.touched = tick;
            seen.insert(seq, cap);
            self.by_age.insert(tick, name);
        } else {
            if self.clients.len() >= self.cfg.max_clients.max(1)
                && let Some((_, oldest)) = self.by_age.pop_first()
            {
                self.clients.remove(&oldest);
            }
            let mut seen = Seen {
                touched: tick,
                ..Seen::default()
            };
            seen.insert(seq, cap);
            self.clients.insert(client.to_owned(), seen);
            self.by_age.insert(tick, client.to_owned());
        }
    }

    /// Clients remembered.
    pub fn clients(&self) -> usize {
        self.clients.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_in_and_out_of_order() {
        let mut d = Dedup::new(DedupConfig::default());
        for s in [1, 2, 5, 4] {
            d.insert("a", s);
        }
        for s in [1, 2, 4, 5] {
            assert!(d.contains("a", s), "{s}");
        }
        assert!(!d.contains("a", 3));
        assert!(!d.contains("b", 0));
        d.insert("a", 3);
        assert!(d.contains("a", 3));
    }

    #[test]
    fn in_order_reports_cost_no_set_entries() {
        let mut d = Dedup::new(DedupConfig::default());
        for s in 2..10_000 {
            d.insert("a", s);
        }
        // seq 1 never came: everything above waits in the set, up to the cap.
        let seen = d.clients.get("a").expect("known client");
        assert!(seen.above.len() <= 4096);
        let mut d = Dedup::new(DedupConfig::default());
        for s in 1..10_000 {
            d.insert("a", s);
        }
        assert!(
            d.clients.get("a").expect("known").above.is_empty(),
            "a client that reports in order costs no set entries"
        );
    }

    #[test]
    fn client_count_is_bounded_oldest_forgotten() {
        let mut d = Dedup::new(DedupConfig {
            max_clients: 2,
            per_client: 8,
        });
        d.insert("a", 1);
        d.insert("b", 1);
        d.insert("a", 2); // a is now newer than b
        d.insert("c", 1); // forgets b
        assert_eq!(d.clients(), 2);
        assert!(d.contains("a", 1) && d.contains("c", 1));
        assert!(!d.contains("b", 1));
    }
}
