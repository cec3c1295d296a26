//! [`SeqSet`]: the one set of one client's report seqs, held as runs of
//! consecutive seqs, so a client that reports in order costs one run
//! whatever its count. The server's duplicate memory ([`crate::dedup`]),
//! the keys read back from a server's file and the demo's ledger all hold
//! their `(client, seq)` keys as one of these per client.

use std::collections::BTreeMap;

/// A set of seqs, as disjoint, non-adjacent inclusive runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqSet {
    /// Start of each run -> its end (inclusive).
    runs: BTreeMap<u64, u64>,
    len: u64,
}

impl SeqSet {
    /// The empty set.
    pub fn new() -> SeqSet {
        SeqSet::default()
    }

    /// Adds `seq`; false if it was there already.
    pub fn insert(&mut self, seq: u64) -> bool {
        let before = self.runs.range(..=seq).next_back().map(|(&a, &b)| (a, b));
        if let Some((_, end)) = before
            && end >= seq
        {
            return false;
        }
        let after = seq
            .checked_add(1)
            .and_then(|next| self.runs.get(&next).map(|&end| (next, end)));
        let joins_before = before.filter(|&(_, end)| end.checked_add(1) == Some(seq));
        let start = match joins_before {
            Some((start, _)) => start,
            None => seq,
        };
        let end = match after {
            Some((next, end)) => {
                self.runs.remove(&next);
                end
            }
            None => seq,
        };
        self.runs.insert(start, end);
        self.len += 1;
        true
    }

    /// Whether `seq` is in the set.
    pub fn contains(&self, seq: u64) -> bool {
        self.runs
            .range(..=seq)
            .next_back()
            .is_some_and(|(_, &end)| end >= seq)
    }

    /// Seqs in the set.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Runs of consecutive seqs in the set (what its memory grows with).
    pub fn runs_len(&self) -> usize {
        self.runs.len()
    }

    /// No seqs.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The smallest seq.
    pub fn first(&self) -> Option<u64> {
        self.runs.first_key_value().map(|(&a, _)| a)
    }

    /// The largest seq.
    pub fn last(&self) -> Option<u64> {
        self.runs.last_key_value().map(|(_, &b)| b)
    }

    /// The runs, smallest first, as inclusive `(start, end)`.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs.iter().map(|(&a, &b)| (a, b))
    }

    /// Every seq, smallest first.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs().flat_map(|(a, b)| a..=b)
    }

    /// Removes the run that starts at `start`, if there is one; returns
    /// its end.
    pub fn remove_run_at(&mut self, start: u64) -> Option<u64> {
        let end = self.runs.remove(&start)?;
        self.len -= end - start + 1;
        Some(end)
    }
}

impl FromIterator<u64> for SeqSet {
    fn from_iter<I: IntoIterator<Item = u64>>(iter: I) -> SeqSet {
        let mut set = SeqSet::new();
        for seq in iter {
            set.insert(seq);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Every operation agrees with a `BTreeSet` on a pseudo-random sequence.
    #[test]
    fn behaves_as_a_set() {
        let mut set = SeqSet::new();
        let mut model = BTreeSet::new();
        let mut x: u64 = 7;
        for i in 0..5_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let seq = (x >> 33) % 300;
            if i % 97 == 0 {
                // Give up the first run, as the duplicate memory does past
                // its cap: it is the model's smallest seqs, as many as are
                // consecutive.
                if let Some(first) = set.first() {
                    let end = set.remove_run_at(first).expect("a run starts at first");
                    for s in first..=end {
                        assert!(model.remove(&s), "{s} was in the run");
                    }
                    assert_eq!(model.first().copied().filter(|&s| s <= end + 1), None);
                }
            } else {
                assert_eq!(set.insert(seq), model.insert(seq), "insert {seq}");
            }
            assert_eq!(set.len(), model.len() as u64);
            assert_eq!(set.first(), model.first().copied());
            assert_eq!(set.last(), model.last().copied());
            assert_eq!(set.contains(seq), model.contains(&seq));
        }
        assert!(set.iter().eq(model.iter().copied()));
        // Disjoint and not adjacent: each run is as long as it can be.
        let runs: Vec<_> = set.runs().collect();
        assert!(runs.windows(2).all(|w| w[0].1 + 1 < w[1].0));
    }

    #[test]
    fn in_order_seqs_are_one_run() {
        let set: SeqSet = (1..=10_000).collect();
        assert_eq!(set.runs().collect::<Vec<_>>(), [(1, 10_000)]);
        assert_eq!(set.len(), 10_000);
        let mut set = set;
        assert_eq!(set.remove_run_at(1), Some(10_000));
        assert!(set.is_empty());
    }

    #[test]
    fn the_ends_of_the_range() {
        let mut set = SeqSet::new();
        assert!(set.insert(u64::MAX));
        assert!(set.insert(u64::MAX - 1));
        assert!(set.insert(0));
        assert!(!set.insert(u64::MAX));
        assert_eq!(
            set.runs().collect::<Vec<_>>(),
            [(0, 0), (u64::MAX - 1, u64::MAX)]
        );
    }
}
