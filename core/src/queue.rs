//! The client's bounded queue of reports not yet acknowledged.
//!
//! Every submitted sample gets the next `seq` and waits here until the
//! server acknowledges it. Each entry is either *waiting* (to be sent on the
//! current or next connection) or *in flight* (sent on the current
//! connection, answer pending). A lost connection puts every in-flight entry
//! back to waiting, oldest first, so reports are sent again in `seq` order.
//!
//! Overflow policy: when the queue is full (in reports, or in bytes: each
//! report counted at [`Sample::held_bytes`]), the **oldest** reports are
//! dropped until the newest fits (and the caller says so out loud). It is
//! the only way a report is lost. The newest report is always kept, even
//! alone over the byte limit.

use std::collections::{BTreeMap, BTreeSet};

use crate::report::Sample;

/// A report number, unique per client process.
pub type Seq = u64;

/// One queued report.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its sequence number.
    pub seq: Seq,
    /// What it reports.
    pub sample: Sample,
    /// How many times it was taken to be sent.
    pub sends: u32,
    /// Some earlier send handed all of it to a connection, so the server
    /// may have recorded it ([`ReportQueue::handed`]); a restored report
    /// may have been recorded by an earlier run of the client.
    pub maybe_recorded: bool,
    /// What it counts against the byte limit: its report's length at most.
    pub bytes: usize,
}

/// Bounded, seq-ordered queue of unacknowledged reports.
#[derive(Debug)]
pub struct ReportQueue {
    entries: BTreeMap<Seq, Entry>,
    waiting: BTreeSet<Seq>,
    limit: usize,
    /// Most bytes queued (the entries' [`Entry::bytes`]).
    limit_bytes: usize,
    /// The entries' bytes.
    bytes: usize,
    next_seq: Seq,
    dropped: u64,
}

impl ReportQueue {
    /// An empty queue holding at most `limit` reports (at least 1); the first
    /// report gets `first_seq`.
    pub fn new(limit: usize, first_seq: Seq) -> ReportQueue {
        ReportQueue {
            entries: BTreeMap::new(),
            waiting: BTreeSet::new(),
            limit: limit.max(1),
            limit_bytes: usize::MAX,
            bytes: 0,
            next_seq: first_seq,
            dropped: 0,
        }
    }

    /// The same queue holding at most `bytes` of reports as well.
    pub fn with_byte_limit(mut self, bytes: usize) -> ReportQueue {
        self.limit_bytes = bytes.max(1);
        self
    }

    /// Drops the oldest reports, except `keep` (the newest), while the
    /// queue is over either limit; their seqs, oldest first.
    fn shed(&mut self, keep: Seq) -> Vec<Seq> {
        let mut dropped = Vec::new();
        while self.entries.len() > self.limit || self.bytes > self.limit_bytes {
            let Some(&old) = self.entries.keys().find(|s| **s != keep) else {
                break;
            };
            if let Some(e) = self.entries.remove(&old) {
                self.bytes -= e.bytes;
            }
            self.waiting.remove(&old);
            self.dropped += 1;
            dropped.push(old);
        }
        dropped
    }

    fn insert(&mut self, seq: Seq, sample: Sample, maybe_recorded: bool) {
        let bytes = sample.held_bytes();
        self.bytes += bytes;
        let entry = Entry {
            seq,
            sample,
            sends: 0,
            maybe_recorded,
            bytes,
        };
        if let Some(old) = self.entries.insert(seq, entry) {
            self.bytes -= old.bytes;
        }
        self.waiting.insert(seq);
    }

    /// Queues a sample as the next report. Returns its seq, and the seqs of
    /// the oldest reports if they had to be dropped to make room.
    pub fn push(&mut self, sample: Sample) -> (Seq, Vec<Seq>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.insert(seq, sample, false);
        (seq, self.shed(seq))
    }

    /// Queues a report that already has its seq (one a previous process
    /// queued and never had acknowledged), waiting, as [`ReportQueue::push`]
    /// would: the oldest are dropped if the queue is full (their seqs are
    /// returned). Restore in ascending seq order, before any push; later
    /// pushes get seqs above `seq`.
    pub fn restore(&mut self, seq: Seq, sample: Sample) -> Vec<Seq> {
        self.insert(seq, sample, true);
        self.next_seq = self.next_seq.max(seq + 1);
        self.shed(seq)
    }

    /// Numbers the next pushed report `next` at least (seqs are never
    /// reused: a restarted client continues where it left off).
    pub fn continue_from(&mut self, next: Seq) {
        self.next_seq = self.next_seq.max(next);
    }

    /// Takes the oldest waiting report to send it; it is in flight until
    /// [`ReportQueue::ack`] or [`ReportQueue::requeue`].
    pub fn take_waiting(&mut self) -> Option<&mut Entry> {
        let seq = self.waiting.pop_first()?;
        let e = self
            .entries
            .get_mut(&seq)
            .expect("every waiting seq has an entry");
        e.sends += 1;
        Some(e)
    }

    /// The bytes the oldest waiting report is counted at (see
    /// [`ReportQueue::bytes`]), the one [`ReportQueue::take_waiting`]
    /// would take.
    pub fn next_waiting_bytes(&self) -> Option<usize> {
        let seq = self.waiting.first()?;
        self.entries.get(seq).map(|e| e.bytes)
    }

    /// All of `seq`'s report has been handed to a connection: from now on
    /// the server may have recorded it, whatever becomes of this send.
    pub fn handed(&mut self, seq: Seq) {
        if let Some(e) = self.entries.get_mut(&seq) {
            e.maybe_recorded = true;
        }
    }

    /// The server acknowledged (or permanently rejected) `seq`: forget it.
    /// Returns the entry, or `None` if it was not queued (acknowledged before,
    /// or dropped).
    pub fn ack(&mut self, seq: Seq) -> Option<Entry> {
        self.waiting.remove(&seq);
        let e = self.entries.remove(&seq)?;
        self.bytes -= e.bytes;
        Some(e)
    }

    /// Puts an in-flight report back to waiting (its connection was lost, or
    /// the server could not record it).
    pub fn requeue(&mut self, seq: Seq) {
        if self.entries.contains_key(&seq) {
            self.waiting.insert(seq);
        }
    }

    /// Reports queued (waiting or in flight).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes queued (each report at its length at most).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Reports waiting to be sent.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Reports dropped for lack of room since the start.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The seq the next pushed report will get.
    pub fn next_seq(&self) -> Seq {
        self.next_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    fn sample(n: u64) -> Sample {
        Sample {
            fields: Map::new(),
            sampled_at_ms: n,
        }
    }

    #[test]
    fn sends_in_seq_order_and_forgets_on_ack() {
        let mut q = ReportQueue::new(10, 1);
        for i in 0..3 {
            assert_eq!(q.push(sample(i)), (i + 1, Vec::<Seq>::new()));
        }
        let a = q.take_waiting().expect("1").seq;
        let b = q.take_waiting().expect("2").seq;
        assert_eq!((a, b), (1, 2));
        assert_eq!(q.waiting(), 1);
        assert!(q.ack(1).is_some());
        assert!(q.ack(1).is_none(), "a second ack finds nothing");
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn requeued_reports_go_out_first_again() {
        let mut q = ReportQueue::new(10, 1);
        for i in 0..3 {
            q.push(sample(i));
        }
        while q.take_waiting().is_some() {}
        q.requeue(2);
        q.requeue(1);
        assert_eq!(q.take_waiting().map(|e| (e.seq, e.sends)), Some((1, 2)));
        assert_eq!(q.take_waiting().map(|e| e.seq), Some(2));
        assert!(q.take_waiting().is_none());
    }

    #[test]
    fn a_report_may_be_recorded_once_handed_whole_or_restored() {
        let mut q = ReportQueue::new(10, 1);
        q.restore(1, sample(1));
        assert_eq!(q.push(sample(2)), (2, Vec::<Seq>::new()));
        let restored = q.take_waiting().expect("1 then 2");
        assert!(restored.maybe_recorded, "an earlier run may have sent it");
        let taken = q.take_waiting().expect("2");
        assert!(!taken.maybe_recorded, "taken but not handed yet");
        q.requeue(2);
        assert!(!q.take_waiting().expect("2 again").maybe_recorded);
        q.handed(2);
        q.requeue(2);
        assert!(q.take_waiting().expect("2 again").maybe_recorded);
    }

    #[test]
    fn overflow_drops_the_oldest_and_counts_it() {
        let mut q = ReportQueue::new(2, 1);
        q.push(sample(0));
        q.push(sample(1));
        assert_eq!(q.push(sample(2)), (3, vec![1]));
        assert_eq!(q.dropped(), 1);
        assert_eq!(q.take_waiting().map(|e| e.seq), Some(2));
        q.requeue(1); // dropped: nothing to requeue
        assert_eq!(q.take_waiting().map(|e| e.seq), Some(3));
        assert!(q.take_waiting().is_none());
    }

    #[test]
    fn restored_reports_keep_their_seq_and_numbering_continues() {
        let mut q = ReportQueue::new(2, 1);
        assert_eq!(q.restore(7, sample(7)), Vec::<Seq>::new());
        assert_eq!(q.restore(9, sample(9)), Vec::<Seq>::new());
        assert_eq!(q.restore(10, sample(10)), vec![7], "full: the oldest goes");
        q.continue_from(5); // below what is queued: no effect
        assert_eq!(q.push(sample(11)), (11, vec![9]));
        q.continue_from(20);
        assert_eq!(q.take_waiting().map(|e| e.seq), Some(10));
        assert_eq!(q.push(sample(0)), (20, vec![10]));
    }

    fn sized(n: u64, len: usize) -> Sample {
        let mut fields = Map::new();
        fields.insert("v".into(), serde_json::Value::String("x".repeat(len)));
        Sample {
            fields,
            sampled_at_ms: n,
        }
    }

    /// From review: a body of many small values takes far more memory
    /// parsed than its length (32 bytes per `0`), and the byte limit counts
    /// that, not the length: a 63 KiB `{"a":[0,0,...]}` counts about 1 MiB,
    /// so a 4 MiB limit holds 4 such samples, not 64.
    #[test]
    fn the_byte_limit_counts_what_a_sample_holds_parsed() {
        let small_values = || {
            let body = format!("{{\"a\":[{}0]}}", "0,".repeat(31 * 1024));
            Sample::from_json(body.as_bytes(), 0).expect("an object")
        };
        let s = small_values();
        let len = s.max_report_len();
        assert!(len < 64 * 1024, "{len}");
        assert!(s.held_bytes() >= 31 * 1024 * 32, "{}", s.held_bytes());
        let mut q = ReportQueue::new(1000, 1).with_byte_limit(4 << 20);
        for _ in 0..64 {
            q.push(small_values());
        }
        assert!(q.len() <= 4, "{} held", q.len());
        assert!(q.bytes() <= 4 << 20);
        // An ordinary sample is counted at about its report's length.
        let plain = Sample::from_json(br#"{"value": 0.42}"#, 0).expect("an object");
        assert!(plain.held_bytes() >= plain.max_report_len());
        assert!(plain.held_bytes() < 2 * plain.max_report_len());
    }

    #[test]
    fn past_the_byte_limit_the_oldest_go_until_the_newest_fits() {
        let one = sized(0, 1000).held_bytes();
        let mut q = ReportQueue::new(100, 1).with_byte_limit(3 * one);
        for i in 0..3 {
            assert_eq!(q.push(sized(i, 1000)).1, Vec::<Seq>::new());
        }
        assert_eq!(q.bytes(), 3 * one);
        // Twice the size: two of the old ones make room for it.
        let two = sized(3, 2000);
        assert!(two.held_bytes() > one && two.held_bytes() <= 2 * one);
        assert_eq!(q.push(two).1, vec![1, 2]);
        assert_eq!(q.len(), 2);
        assert!(q.bytes() <= 3 * one);
        assert_eq!(q.dropped(), 2);
        // An acknowledged report gives its bytes back.
        q.ack(3);
        assert_eq!(q.push(sized(5, 1000)).1, Vec::<Seq>::new());
        // One larger than the whole limit is kept, alone.
        assert_eq!(q.push(sized(6, 10_000)).1, vec![4, 5]);
        assert_eq!(q.len(), 1);
        assert_eq!(q.take_waiting().map(|e| e.seq), Some(6));
        assert!(q.ack(6).is_some());
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn seq_is_never_reused() {
        let mut q = ReportQueue::new(1, 5);
        let seqs: Vec<_> = (0..4).map(|i| q.push(sample(i)).0).collect();
        assert_eq!(seqs, vec![5, 6, 7, 8]);
        assert_eq!(q.next_seq(), 9);
    }
}
