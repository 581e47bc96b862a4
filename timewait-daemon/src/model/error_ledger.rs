//! The connect()/bind() errors' ledger: counters under a bounded set of labels that never go backwards.
//!
//! The kernel counts under keys nobody bounds but the table size (a process
//! name is whatever the process says it is); the metrics show the busiest
//! few under their own label and the rest under `other`. Which keys are the
//! busiest changes over time, so summing the current non-busiest keys'
//! totals into `other` would make `other` fall whenever one of them climbs
//! out (a counter reset to Prometheus). Instead each key's *growth* since
//! the last read is added to the label the key maps to now: a label's value
//! only ever grows; a label that loses its place stops being shown and, if
//! it comes back, resumes where it stopped.

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
};

/// The label of what is folded.
pub const OTHER: &str = "other";

/// What has been attributed so far: per key its count at the last read,
/// per label the sum of the growth attributed to it.
#[derive(Debug)]
pub struct Ledger<K, L> {
    seen: HashMap<K, u64>,
    shown: HashMap<L, u64>,
}

impl<K: Eq + Hash + Clone, L: Eq + Hash + Clone> Default for Ledger<K, L> {
    fn default() -> Self {
        Self { seen: HashMap::new(), shown: HashMap::new() }
    }
}

impl<K: Eq + Hash + Clone, L: Eq + Hash + Clone> Ledger<K, L> {
    /// Adds what each key's cumulative count grew since the last call to the
    /// label `label_of` gives it now (a key new to the ledger: all of it). A
    /// label is created at 0 when its first key shows up, even at 0. A count
    /// lower than the last one read (a table made anew) takes nothing back:
    /// the key starts again from there.
    pub fn attribute(&mut self, reads: impl IntoIterator<Item = (K, u64)>, mut label_of: impl FnMut(&K) -> L) {
        for (key, count) in reads {
            let label = label_of(&key);
            let seen = self.seen.entry(key).or_insert(0);
            let grown = count.saturating_sub(*seen);
            *seen = count;
            *self.shown.entry(label).or_insert(0) += grown;
        }
    }

    /// Every label and its value: what has been attributed to it so far.
    pub fn shown(&self) -> impl Iterator<Item = (&L, u64)> {
        self.shown.iter().map(|(l, n)| (l, *n))
    }
}

/// The `n` groups with the largest counts within each class (ties: the
/// smaller group first), e.g. per errno the busiest process names.
pub fn busiest<C: Eq + Hash + Clone, G: Eq + Hash + Ord + Clone>(
    counts: impl IntoIterator<Item = ((C, G), u64)>,
    n: usize,
) -> HashSet<(C, G)> {
    let mut summed: HashMap<(C, G), u64> = HashMap::new();
    for (k, c) in counts {
        *summed.entry(k).or_default() += c;
    }
    let mut by_class: HashMap<C, Vec<(G, u64)>> = HashMap::new();
    for ((class, group), c) in summed {
        by_class.entry(class).or_default().push((group, c));
    }
    let mut top = HashSet::new();
    for (class, mut groups) in by_class {
        groups.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        top.extend(groups.into_iter().take(n).map(|(g, _)| (class.clone(), g)));
    }
    top
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One read: each key's cumulative count; the top `n` names keep their
    /// label, the rest go to "other". Returns the labels shown (top + other).
    fn read(l: &mut Ledger<&'static str, &'static str>, counts: &[(&'static str, u64)], n: usize) -> HashMap<&'static str, u64> {
        let top: HashSet<((), &str)> = busiest(counts.iter().map(|(k, c)| (((), *k), *c)), n);
        l.attribute(counts.iter().copied(), |k| if top.contains(&((), *k)) { *k } else { OTHER });
        l.shown().filter(|(lab, _)| **lab == OTHER || top.contains(&((), **lab))).map(|(lab, v)| (*lab, v)).collect()
    }

    fn assert_monotonic(before: &HashMap<&str, u64>, after: &HashMap<&str, u64>) {
        for (label, v) in after {
            if let Some(b) = before.get(label) {
                assert!(v >= b, "{label} went from {b} to {v}");
            }
        }
    }

    #[test]
    fn growth_goes_to_the_label_of_now() {
        let mut l = Ledger::default();
        let a = read(&mut l, &[("a", 5), ("b", 3), ("c", 1)], 1);
        assert_eq!(a, HashMap::from([("a", 5), (OTHER, 4)]));
        // c climbs past a: its growth is c's from now on; other keeps what
        // it had and adds a's growth.
        let b = read(&mut l, &[("a", 6), ("b", 3), ("c", 9)], 1);
        assert_eq!(b, HashMap::from([("c", 8), (OTHER, 5)]));
        assert_monotonic(&a, &b);
        // a comes back: resumes from where it stopped (5), plus its growth.
        let c = read(&mut l, &[("a", 20), ("b", 3), ("c", 9)], 1);
        assert_eq!(c, HashMap::from([("a", 19), (OTHER, 5)]));
        assert_monotonic(&b, &c);
        // Nothing is lost or counted twice: every label's value sums to the
        // kernel's total.
        let all: u64 = l.shown().map(|(_, v)| v).sum();
        assert_eq!(all, 20 + 3 + 9);
    }

    #[test]
    fn summing_the_current_rest_would_go_backwards_this_does_not() {
        // The case of issue 25: the top set moves as counts move.
        let mut l = Ledger::default();
        let mut last = HashMap::new();
        let mut counts = [("a", 0u64), ("b", 0), ("c", 0), ("d", 0)];
        for round in 0..200u64 {
            // Each round one key (not always the same) grows a lot.
            let i = ((round * 7) % 4) as usize;
            counts[i].1 += 1 + round % 5;
            let now = read(&mut l, &counts, 2);
            assert_monotonic(&last, &now);
            assert!(now.len() <= 3, "{now:?}");
            last = now;
        }
        assert_eq!(l.shown().map(|(_, v)| v).sum::<u64>(), counts.iter().map(|(_, c)| c).sum::<u64>());
    }

    #[test]
    fn a_label_appears_at_zero_and_a_table_made_anew_takes_nothing_back() {
        let mut l: Ledger<u32, &str> = Ledger::default();
        l.attribute([(1, 0)], |_| OTHER);
        assert_eq!(l.shown().collect::<Vec<_>>(), vec![(&OTHER, 0)]);
        l.attribute([(1, 7)], |_| OTHER);
        l.attribute([(1, 2)], |_| OTHER);
        l.attribute([(1, 3)], |_| OTHER);
        assert_eq!(l.shown().collect::<Vec<_>>(), vec![(&OTHER, 8)]);
    }

    #[test]
    fn busiest_is_per_class_with_ties_by_name() {
        let top = busiest([((1, "x"), 3), ((1, "y"), 3), ((1, "z"), 9), ((2, "x"), 1), ((1, "z"), 1)], 2);
        assert_eq!(top, HashSet::from([(1, "z"), (1, "x"), (2, "x")]));
    }
}
