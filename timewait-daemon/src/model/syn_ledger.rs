//! The per-remote SYN counters: folded like the socket series, yet never going back.
//!
//! Also what the drains do with SYN counts before a scrape reads them: the
//! delta since a read, and the bound on remotes waiting (`fold_smallest`).

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use timewait_common::{RemoteKey, SynCounts};

use super::aggregate::{AggOptions, OTHER, addr_of, remote_label};

/// SYNs that hit a minisocket, per remote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SynSeries {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
    pub remote: String,
    pub total: u64,
    pub rejected: u64,
}

/// How long a remote's own SYN series lives on without a new SYN once
/// nothing keeps it (it then stops; one that comes back starts again at 0,
/// which Prometheus' `rate()`/`increase()` read as the reset it is, not as
/// a rise: the old value is gone from every window by then).
pub const SYN_SERIES_IDLE: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// The per-remote SYN counters, folded like the socket series yet counters
/// all the same: every series only ever grows while the daemon runs.
///
/// Folding cumulative totals would not do: a remote's totals would move into
/// `remote="other"` when it left the top set and out again when it came back,
/// so `other` would fall (a counter reset to Prometheus, and a false rise of
/// `increase()`). So the ledger takes SYNs as they come (deltas) and adds
/// them to the series their remote is shown under *then*; a series already
/// made keeps its value and goes on from it.
#[derive(Debug, Default)]
pub struct SynLedger {
    series: HashMap<(Option<u32>, String), LedgerEntry>,
}

#[derive(Debug, Default, Clone, Copy)]
struct LedgerEntry {
    total: u64,
    rejected: u64,
    /// When it last grew or was kept, in the caller's clock.
    touched: std::time::Duration,
}

impl SynLedger {
    /// Adds the SYNs seen since the last call (`deltas`, per kernel key;
    /// family 0 is what the daemon already folded) and returns the series.
    /// A remote has its own series when it has one already, when the socket
    /// series keep it (`kept`), or when it is among the `top_remotes`
    /// busiest of this call while fewer than `top_remotes` remotes that no
    /// socket series keeps have their own; the rest go to `remote="other"`.
    /// `holders` (remotes holding minisockets) that `kept` keeps get their
    /// series at 0 before their first SYN, so `increase()` sees that one.
    /// `now` is any monotonic clock (seconds since start will do).
    pub fn add(
        &mut self,
        deltas: impl IntoIterator<Item = (RemoteKey, SynCounts)>,
        opts: &AggOptions,
        kept: &std::collections::HashSet<String>,
        holders: &std::collections::HashSet<(Option<u32>, String)>,
        now: std::time::Duration,
    ) -> Vec<SynSeries> {
        let mut by_remote: BTreeMap<(Option<u32>, String), (u64, u64)> = BTreeMap::new();
        for (k, v) in deltas {
            let label = if k.family == 0 { OTHER.to_string() } else { remote_label(addr_of(k.family, k.remote), opts) };
            let slot = by_remote.entry((opts.per_netns.then_some(k.netns), label)).or_default();
            slot.0 += u64::try_from(v.total).unwrap_or(0);
            slot.1 += u64::try_from(v.rejected).unwrap_or(0);
        }
        for key in holders.iter().filter(|(_, r)| kept.contains(r)) {
            self.series.entry(key.clone()).or_default().touched = now;
        }
        let unkept = |s: &Self| s.series.keys().filter(|(_, r)| r != OTHER && !kept.contains(r)).count();
        let mut room = opts.top_remotes.saturating_sub(unkept(self));
        let mut ranked: Vec<((Option<u32>, String), (u64, u64))> =
            by_remote.into_iter().filter(|(_, (t, r))| *t > 0 || *r > 0).collect();
        ranked.sort_by(|a, b| b.1.0.cmp(&a.1.0).then_with(|| a.0.cmp(&b.0)));
        for ((netns, remote), (t, r)) in ranked {
            let own = remote != OTHER
                && (self.series.contains_key(&(netns, remote.clone())) || kept.contains(&remote) || {
                    let admit = room > 0;
                    room = room.saturating_sub(1);
                    admit
                });
            let key = if own { (netns, remote) } else { (netns, OTHER.to_string()) };
            let e = self.series.entry(key).or_default();
            e.total += t;
            e.rejected += r;
            e.touched = now;
        }
        // Series nothing keeps any more stop after a while, so the ledger
        // stays bounded (about twice --top-remotes).
        self.series.retain(|(_, r), e| r == OTHER || kept.contains(r) || now.saturating_sub(e.touched) < SYN_SERIES_IDLE);
        let mut out: Vec<SynSeries> = self
            .series
            .iter()
            .map(|((netns, remote), e)| SynSeries { netns: *netns, remote: remote.clone(), total: e.total, rejected: e.rejected })
            .collect();
        out.sort_by(|a, b| (a.netns, &a.remote).cmp(&(b.netns, &b.remote)));
        out
    }
}

/// The remote key of folded SYN counters (`remote="other"`): family 0.
pub const OTHER_FAMILY: u16 = 0;

/// `v - seen`, per field, never below 0.
pub fn syn_delta(v: SynCounts, seen: SynCounts) -> SynCounts {
    SynCounts { total: (v.total - seen.total).max(0), rejected: (v.rejected - seen.rejected).max(0) }
}

/// Folds the smallest per-remote SYN totals into one `other` entry per
/// namespace until `keep` remotes are left; sums are preserved.
pub fn fold_smallest(totals: &mut HashMap<RemoteKey, SynCounts>, keep: usize) {
    let mut ranked: Vec<(RemoteKey, SynCounts)> =
        totals.iter().filter(|(k, _)| k.family != OTHER_FAMILY).map(|(k, v)| (*k, *v)).collect();
    if ranked.len() <= keep {
        return;
    }
    ranked.sort_by(|a, b| b.1.total.cmp(&a.1.total).then(a.0.cmp(&b.0)));
    for (k, v) in ranked.into_iter().skip(keep) {
        totals.remove(&k);
        let other = totals.entry(RemoteKey { netns: k.netns, family: OTHER_FAMILY, ..RemoteKey::default() }).or_default();
        other.total += v.total;
        other.rejected += v.rejected;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use timewait_common::AF_INET;

    use super::*;

    fn syn_key(last: u8) -> RemoteKey {
        let mut r = RemoteKey { family: AF_INET, ..Default::default() };
        r.remote[..4].copy_from_slice(&[10, 0, 0, last]);
        r
    }

    fn totals(s: &[SynSeries]) -> Vec<(&str, u64, u64)> {
        s.iter().map(|x| (x.remote.as_str(), x.total, x.rejected)).collect()
    }

    #[test]
    fn syns_fold_like_sockets() {
        let raw = [
            (syn_key(1), SynCounts { total: 9, rejected: 1 }),
            (syn_key(2), SynCounts { total: 3, rejected: 3 }),
            (syn_key(3), SynCounts { total: 2, rejected: 0 }),
        ];
        let mut l = SynLedger::default();
        let s = l.add(raw, &AggOptions { top_remotes: 1, ..Default::default() }, &Default::default(), &Default::default(), Duration::ZERO);
        assert_eq!(totals(&s), [("10.0.0.1", 9, 1), (OTHER, 5, 3)]);
    }

    #[test]
    fn syn_series_never_go_back_when_the_busiest_change() {
        // The issue 25 case: a remote folded into other, then the busiest.
        let opts = AggOptions { top_remotes: 1, ..Default::default() };
        let (mut l, mut last) = (SynLedger::default(), BTreeMap::<String, u64>::new());
        let rounds: [&[(u8, i64)]; 4] = [&[(1, 4), (2, 2)], &[(2, 6)], &[(1, 1), (3, 9)], &[(2, 1), (3, 1)]];
        for (i, round) in rounds.iter().enumerate() {
            let deltas = round.iter().map(|(r, n)| (syn_key(*r), SynCounts { total: *n, rejected: 0 }));
            // The socket series keep whichever remote is busiest now.
            let kept: std::collections::HashSet<String> = [format!("10.0.0.{}", round[0].0)].into();
            let s = l.add(deltas, &opts, &kept, &Default::default(), Duration::from_secs(i as u64));
            for x in &s {
                let before = last.insert(x.remote.clone(), x.total).unwrap_or(0);
                assert!(x.total >= before, "round {i}: {} went {before} -> {}", x.remote, x.total);
            }
            // Nothing lost: the series sum to every SYN so far.
            let sent: i64 = rounds[..=i].iter().flat_map(|r| r.iter()).map(|(_, n)| n).sum();
            assert_eq!(s.iter().map(|x| x.total).sum::<u64>(), sent as u64);
        }
    }

    #[test]
    fn syns_keep_the_remotes_the_sockets_keep() {
        let opts = AggOptions { top_remotes: 1, ..Default::default() };
        let raw = [(syn_key(1), SynCounts { total: 9, rejected: 1 })];
        let holders = [(None, "10.0.0.2".to_string())].into();
        let mut l = SynLedger::default();
        let s = l.add(raw, &opts, &["10.0.0.2".to_string()].into(), &holders, Duration::ZERO);
        assert_eq!(totals(&s), [("10.0.0.1", 9, 1), ("10.0.0.2", 0, 0)]);
        let folded = [(RemoteKey::default(), SynCounts { total: 4, rejected: 2 })];
        let s = SynLedger::default().add(folded, &opts, &Default::default(), &Default::default(), Duration::ZERO);
        assert_eq!(totals(&s), [(OTHER, 4, 2)]);
    }

    #[test]
    fn idle_syn_series_stop_and_the_ledger_stays_bounded() {
        let opts = AggOptions { top_remotes: 2, ..Default::default() };
        let none = std::collections::HashSet::<String>::new();
        let mut l = SynLedger::default();
        for i in 0..50u8 {
            let t = Duration::from_secs(u64::from(i) * 60);
            let s = l.add([(syn_key(i), SynCounts { total: 1, rejected: 0 })], &opts, &none, &Default::default(), t);
            assert!(s.len() <= 3, "{s:?}");
        }
        let s = l.add([], &opts, &none, &Default::default(), Duration::from_secs(50 * 60) + SYN_SERIES_IDLE);
        // Every own series went idle and stopped; other never does.
        assert_eq!(s.iter().map(|x| x.remote.as_str()).collect::<Vec<_>>(), [OTHER]);
        assert!(s[0].total >= 40, "{s:?}");
    }

    #[test]
    fn folding_keeps_the_busiest_and_the_sums() {
        let mut t = HashMap::new();
        for i in 1..=10u8 {
            let mut k = RemoteKey { family: AF_INET, ..Default::default() };
            k.remote[0] = i;
            t.insert(k, SynCounts { total: i64::from(i), rejected: 1 });
        }
        fold_smallest(&mut t, 4);
        assert_eq!(t.len(), 5);
        assert_eq!(t.values().map(|v| v.total).sum::<i64>(), 55);
        assert_eq!(t.values().map(|v| v.rejected).sum::<i64>(), 10);
        let other = t.iter().find(|(k, _)| k.family == OTHER_FAMILY).map(|(_, v)| *v).unwrap();
        assert_eq!((other.total, other.rejected), (21, 6));
    }
}
