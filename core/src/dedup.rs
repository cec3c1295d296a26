//! The server's memory of recorded reports, keyed by [`RecordKey`]
//! `(identity, client, seq)`, with bounded memory.
//!
//! Per `(identity, client)`: a *floor* (every seq below it was recorded;
//! seqs start at 1, so a new client's floor is 1) and the set of recorded
//! seqs above it (a [`SeqSet`], held as runs of consecutive seqs).
//! Recording the floor's seq advances the floor over the contiguous run, so
//! a client that reports in order costs a few bytes.
//!
//! States of one client's memory:
//!
//! - **Exact** (`sure == floor`): every seq is known recorded or not.
//! - **Jumped** (`sure < floor`): its set grew past its cap of runs
//!   ([`DedupConfig::per_client`], [`DedupConfig::anonymous_per_client`];
//!   a run costs about 26 bytes), so the floor jumped over the smallest
//!   run and the gaps below it. Seqs below `sure` are still known recorded;
//!   those in `sure..floor` (the gaps, and the recorded seqs of the runs
//!   given up) are *not known*: [`Dedup::contains`] says no, and the
//!   report goes to the sink each time it comes, which a database answers
//!   by its key (exactly once) and `stdout`/`file:` record (a copy
//!   recorded again rather than a late report lost). A client stays
//!   jumped until forgotten.
//!
//! The clients
//! are held in a [`PerIdentity`] table: each certificate identity keeps at
//! most `clients_per_identity` clients (its own least recently active is
//! forgotten first), the anonymous identity `anonymous_clients`, and at
//! most `max_identities` identities are remembered (the least recently
//! active is forgotten first). So an identity that invents `client` ids
//! evicts only its own memory, never another identity's.

use crate::identity::{Identity, RecordKey};
use crate::per_identity::{IdentityLimits, PerIdentity};
use crate::seqs::SeqSet;

/// Settings for [`Dedup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupConfig {
    /// Identities remembered at most (default 10,000).
    pub max_identities: usize,
    /// Clients remembered per certificate identity at most (default 64: a
    /// device that restarts gets a new `client` id each time).
    pub clients_per_identity: usize,
    /// Clients remembered for the anonymous identity at most (default
    /// 100,000: every peer without a certificate shares that identity).
    pub anonymous_clients: usize,
    /// Runs of out-of-order seqs remembered per client of a certificate
    /// identity at most (default 256; a client that keeps 8 reports in
    /// flight leaves a few).
    pub per_client: usize,
    /// The same for the anonymous identity's clients (default 16: strangers
    /// share it, and its 100,000 clients then hold at most 1.6 million runs,
    /// about 40 MB).
    pub anonymous_per_client: usize,
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            max_identities: 10_000,
            clients_per_identity: 64,
            anonymous_clients: 100_000,
            per_client: 256,
            anonymous_per_client: 16,
        }
    }
}

impl DedupConfig {
    fn limits(&self) -> IdentityLimits {
        IdentityLimits {
            max_identities: self.max_identities,
            clients_per_identity: self.clients_per_identity,
            anonymous_clients: self.anonymous_clients,
        }
    }
}

/// One client's recorded seqs: everything below `sure`, `above`, and
/// `u64::MAX` if `max` (a floor past it cannot be written); `sure..floor`
/// not known (see the module documentation).
#[derive(Debug)]
struct Seen {
    sure: u64,
    floor: u64,
    above: SeqSet,
    max: bool,
}

impl Default for Seen {
    fn default() -> Seen {
        // The protocol's first seq is 1 (report.rs refuses 0).
        Seen {
            sure: 1,
            floor: 1,
            above: SeqSet::new(),
            max: false,
        }
    }
}

impl Seen {
    fn contains(&self, seq: u64) -> bool {
        seq < self.sure || self.above.contains(seq) || (seq == u64::MAX && self.max)
    }

    /// Remembers `seq`, with at most `cap` runs above the floor.
    fn insert(&mut self, seq: u64, cap: usize) {
        if seq == u64::MAX {
            self.max = true;
            return;
        }
        if seq < self.floor {
            return;
        }
        self.above.insert(seq);
        self.absorb();
        while self.above.runs_len() > cap.max(1) {
            let Some(end) = self.above.first().and_then(|s| self.above.remove_run_at(s)) else {
                break;
            };
            self.floor = end.saturating_add(1);
            self.absorb();
        }
    }

    /// Moves the floor over the run of `above` that starts at it (and
    /// `sure` with it while the memory is exact).
    fn absorb(&mut self) {
        if let Some(end) = self.above.remove_run_at(self.floor) {
            let exact = self.sure == self.floor;
            self.floor = end.saturating_add(1);
            if exact {
                self.sure = self.floor;
            }
        }
    }
}

/// The set of recorded [`RecordKey`]s.
#[derive(Debug)]
pub struct Dedup {
    cfg: DedupConfig,
    seen: PerIdentity<Seen>,
}

impl Default for Dedup {
    fn default() -> Dedup {
        Dedup::new(DedupConfig::default())
    }
}

impl Dedup {
    /// An empty set.
    pub fn new(cfg: DedupConfig) -> Dedup {
        Dedup {
            cfg,
            seen: PerIdentity::new(cfg.limits()),
        }
    }

    /// Whether `key` was recorded.
    pub fn contains(&self, key: &RecordKey) -> bool {
        self.contains_parts(&key.identity, &key.client, key.seq)
    }

    fn contains_parts(&self, identity: &Identity, client: &str, seq: u64) -> bool {
        self.seen
            .peek(identity.as_str(), client)
            .is_some_and(|s| s.contains(seq))
    }

    /// Remembers that `key` was recorded.
    pub fn insert(&mut self, key: &RecordKey) {
        let cap = if key.identity.is_anonymous() {
            self.cfg.anonymous_per_client
        } else {
            self.cfg.per_client
        };
        self.seen
            .entry(&key.identity, &key.client, Seen::default)
            .insert(key.seq, cap);
    }

    /// Clients remembered (over all identities).
    pub fn clients(&self) -> usize {
        self.seen.clients()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(identity: &str, client: &str, seq: u64) -> RecordKey {
        RecordKey {
            identity: Identity::from_stored(identity),
            client: client.into(),
            seq,
        }
    }

    #[test]
    fn remembers_in_and_out_of_order() {
        let mut d = Dedup::new(DedupConfig::default());
        for s in [1, 2, 5, 4] {
            d.insert(&key("", "a", s));
        }
        for s in [1, 2, 4, 5] {
            assert!(d.contains(&key("", "a", s)), "{s}");
        }
        assert!(!d.contains(&key("", "a", 3)));
        assert!(!d.contains(&key("", "b", 1)));
        d.insert(&key("", "a", 3));
        assert!(d.contains(&key("", "a", 3)));
    }

    #[test]
    fn the_largest_seq_is_remembered_too() {
        let mut d = Dedup::new(DedupConfig::default());
        for s in [1, u64::MAX - 1, u64::MAX] {
            d.insert(&key("", "a", s));
        }
        for s in [1, u64::MAX - 1, u64::MAX] {
            assert!(d.contains(&key("", "a", s)), "{s}");
        }
        // The floor climbs to the top (seqs in order): MAX is still known.
        let mut d = Dedup::new(DedupConfig {
            per_client: 2,
            anonymous_per_client: 2,
            ..DedupConfig::default()
        });
        for s in [u64::MAX - 3, u64::MAX - 2, u64::MAX - 1, u64::MAX] {
            d.insert(&key("", "b", s));
        }
        assert!(d.contains(&key("", "b", u64::MAX)));
        assert!(d.contains(&key("", "b", u64::MAX - 1)));
    }

    #[test]
    fn identities_have_their_own_namespaces() {
        let mut d = Dedup::new(DedupConfig::default());
        d.insert(&key("alice", "c", 1));
        assert!(d.contains(&key("alice", "c", 1)));
        assert!(!d.contains(&key("mallory", "c", 1)));
        assert!(!d.contains(&key("", "c", 1)));
    }

    #[test]
    fn in_order_reports_cost_no_set_entries() {
        let mut d = Dedup::new(DedupConfig::default());
        for s in 2..10_000 {
            d.insert(&key("", "a", s));
        }
        // seq 1 never came: everything above waits in the set, as one run.
        let seen = d.seen.peek("", "a").expect("known client");
        assert_eq!(seen.above.runs_len(), 1);
        assert!(!d.contains(&key("", "a", 1)) && d.contains(&key("", "a", 9_999)));
        let mut d = Dedup::new(DedupConfig::default());
        for s in 1..10_000 {
            d.insert(&key("", "a", s));
        }
        assert!(
            d.seen.peek("", "a").expect("known").above.is_empty(),
            "a client that reports in order costs no set entries"
        );
    }

    #[test]
    fn past_its_runs_a_client_forgets_gaps_as_not_known_never_as_recorded() {
        let mut d = Dedup::new(DedupConfig::default());
        let anonymous = DedupConfig::default().anonymous_per_client as u64;
        let named = DedupConfig::default().per_client as u64;
        // 1..=10 recorded, then every other seq from 12: a run each.
        for (identity, cap) in [("", anonymous), ("alice", named)] {
            for s in (1..=10).chain((12..).step_by(2).take(10 * cap as usize)) {
                d.insert(&key(identity, "a", s));
            }
            let seen = d.seen.peek(identity, "a").expect("known");
            assert!(seen.above.runs_len() as u64 <= cap, "{identity:?}");
            for s in 1..=10 {
                assert!(d.contains(&key(identity, "a", s)), "{s}: still known");
            }
            // A late copy of a gap below the jump: not known, so it goes to
            // the sink (which a database answers by its key) instead of
            // being answered duplicate and never recorded.
            assert!(!d.contains(&key(identity, "a", 11)), "{identity:?}");
            assert!(!d.contains(&key(identity, "a", 13)), "{identity:?}");
            let last = 12 + 2 * (10 * cap - 1);
            assert!(
                d.contains(&key(identity, "a", last)),
                "recent ones are kept"
            );
            assert!(!d.contains(&key(identity, "a", last - 1)));
        }
    }

    #[test]
    fn an_identity_inventing_clients_cannot_evict_another() {
        let mut d = Dedup::new(DedupConfig {
            clients_per_identity: 8,
            ..DedupConfig::default()
        });
        d.insert(&key("alice", "a", 1));
        for i in 0..10_000 {
            d.insert(&key("mallory", &format!("m{i}"), 1));
        }
        assert!(d.contains(&key("alice", "a", 1)));
        assert_eq!(d.clients(), 9);
    }
}
