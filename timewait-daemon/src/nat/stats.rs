//! conntrack's entries, limit and per-CPU stats of the calling thread's network namespace, from procfs.
//!
//! `/proc/thread-self/net/stat/nf_conntrack` is registered by `nf_conntrack`
//! itself, per namespace, and readable by anyone: one header line, then one
//! line of hexadecimal counters per possible CPU. Columns are found by name
//! (the kernel renamed some: `clashres` is `clash_resolve` and
//! `chainlength` is `chaintoolong` from 5.15, where `delete_list` was). Its
//! absence means conntrack is not loaded here: then nothing of the NAT side
//! is read (a netlink request would make the kernel load the module).

use std::path::Path;

/// The per-namespace stats file; its presence says conntrack is loaded.
const STAT: &str = "/proc/thread-self/net/stat/nf_conntrack";

/// The stats exported (`timewait_conntrack_stat_total{stat=...}`), by the
/// name the exposition gives them, and the header names that carry them.
pub const EXPORTED: [(&str, &[&str]); 10] = [
    ("insert_failed", &["insert_failed"]),
    ("drop", &["drop"]),
    ("early_drop", &["early_drop"]),
    ("clash_resolve", &["clashres"]),
    ("chaintoolong", &["chainlength"]),
    ("insert", &["insert"]),
    ("invalid", &["invalid"]),
    ("found", &["found"]),
    ("search_restart", &["search_restart"]),
    ("icmp_error", &["icmp_error"]),
];

/// What procfs says about conntrack in one namespace.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ConntrackStats {
    /// `nf_conntrack_count`.
    pub entries: u64,
    /// `nf_conntrack_max` (global; every namespace reads the same).
    pub limit: Option<u64>,
    /// Per-CPU counters summed, in [`EXPORTED`] order, those this kernel has.
    pub stats: Vec<(&'static str, u64)>,
    /// `nf_conntrack_tcp_timeout_time_wait` of this namespace, seconds.
    #[serde(skip)]
    pub tcp_time_wait_timeout: Option<u64>,
    /// `nf_conntrack_udp_timeout` of this namespace, seconds.
    #[serde(skip)]
    pub udp_timeout: Option<u64>,
}

/// Whether conntrack is loaded in the calling thread's namespace.
pub fn loaded() -> bool {
    Path::new(STAT).exists()
}

/// Reads the stats of the calling thread's namespace; None when conntrack
/// is not loaded there.
pub fn read() -> Option<ConntrackStats> {
    let text = std::fs::read_to_string(STAT).ok()?;
    let mut s = parse(&text)?;
    let sysctl = |name: &str| -> Option<u64> {
        // Network sysctls are those of the opening thread's namespace.
        std::fs::read_to_string(format!("/proc/sys/net/netfilter/{name}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    if let Some(n) = sysctl("nf_conntrack_count") {
        s.entries = n;
    }
    s.limit = sysctl("nf_conntrack_max");
    s.tcp_time_wait_timeout = sysctl("nf_conntrack_tcp_timeout_time_wait");
    s.udp_timeout = sysctl("nf_conntrack_udp_timeout");
    Some(s)
}

/// Pure: the stats file's text into counters summed over CPUs. `entries`
/// (a global count repeated on every line) comes from the first line.
pub fn parse(text: &str) -> Option<ConntrackStats> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next()?.split_whitespace().collect();
    let mut sums = vec![0u64; header.len()];
    let mut entries = None;
    for line in lines {
        let values: Vec<u64> = line.split_whitespace().map(|v| u64::from_str_radix(v, 16).unwrap_or(0)).collect();
        if values.len() != header.len() {
            continue;
        }
        for (sum, v) in sums.iter_mut().zip(&values) {
            *sum = sum.saturating_add(*v);
        }
        if entries.is_none() {
            entries = header.iter().position(|h| *h == "entries").map(|i| values[i]);
        }
    }
    let column = |names: &[&str]| header.iter().position(|h| names.contains(h)).map(|i| sums[i]);
    let stats = EXPORTED.iter().filter_map(|(name, cols)| column(cols).map(|v| (*name, v))).collect();
    Some(ConntrackStats { entries: entries.unwrap_or(0), limit: None, stats, tcp_time_wait_timeout: None, udp_timeout: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_cpus_by_header_name() {
        // 6.18's header (two CPUs).
        let text = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart\n\
                    00000013  00000000 0000000a 00000000 00000000 00000000 00000000 00000000 00000000 00000020 00000020 00000000 00000000  00000000 00000000 00000000 00000000\n\
                    00000013  00000002 00000000 00000000 00000001 00000000 00000000 00000000 00000001 00000001 00000001 00000000 00000000  00000000 00000000 00000000 00000000\n";
        let s = parse(text).unwrap();
        assert_eq!(s.entries, 19);
        let get = |n: &str| s.stats.iter().find(|(k, _)| *k == n).map(|(_, v)| *v);
        assert_eq!(get("insert_failed"), Some(33));
        assert_eq!(get("drop"), Some(33));
        assert_eq!(get("clash_resolve"), Some(2));
        assert_eq!(get("chaintoolong"), Some(0));
        assert_eq!(get("found"), Some(10));
        assert_eq!(get("invalid"), Some(1));
    }

    #[test]
    fn old_header_has_no_clash_columns() {
        // 5.10's header: no clashres, delete_list instead of chainlength.
        let text = "entries  searched found new invalid ignore delete delete_list insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart\n\
                    00000001  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000003 00000003 00000000 00000000  00000000 00000000 00000000 00000000\n";
        let s = parse(text).unwrap();
        assert!(s.stats.iter().all(|(k, _)| *k != "clash_resolve" && *k != "chaintoolong"));
        assert!(s.stats.contains(&("insert_failed", 3)));
    }

    #[test]
    fn garbage_is_not_a_panic() {
        assert!(parse("").is_none());
        let s = parse("entries drop\nzz 1 2 3\n").unwrap();
        assert_eq!(s.entries, 0);
    }
}
