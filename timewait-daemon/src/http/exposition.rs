//! Prometheus exposition of a `View`: text format 0.0.4, through the prometheus crate's encoder.

use prometheus::{
    Encoder as _, TextEncoder,
    proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType},
};
use timewait_common::LIFETIME_BUCKETS_NS;

use crate::collect::view::{REASONS, SEGMENT_KINDS, View};

/// Everything the exposition shows besides the kernel's view.
pub struct Static<'a> {
    pub version: &'a str,
    pub kernel: &'a str,
    pub hooks: &'a [(String, bool)],
    pub signals: &'a [crate::kernel::paths::SignalPath],
    pub read_errors: u64,
    /// Since the last drain of the kernel's tables (None: never drained).
    pub drain_age: Option<std::time::Duration>,
    /// Since the last successful reconciliation walk (None: none yet).
    pub reconcile_age: Option<std::time::Duration>,
}

pub(super) struct Family(pub(super) MetricFamily);

impl Family {
    pub(super) fn new(name: &str, help: &str, kind: MetricType) -> Self {
        let mut mf = MetricFamily::default();
        mf.set_name(name.to_string());
        mf.set_help(help.to_string());
        mf.set_field_type(kind);
        Self(mf)
    }

    fn labelled(labels: &[(&str, &str)]) -> Metric {
        let mut m = Metric::default();
        m.set_label(
            labels
                .iter()
                .map(|(k, v)| {
                    let mut l = LabelPair::default();
                    l.set_name((*k).to_string());
                    l.set_value((*v).to_string());
                    l
                })
                .collect(),
        );
        m
    }

    fn histogram(&mut self, labels: &[(&str, &str)], bounds_s: &[f64], cumulative: &[u64], count: u64, sum: f64) {
        let mut m = Self::labelled(labels);
        let mut h = Histogram::default();
        h.set_sample_count(count);
        h.set_sample_sum(sum);
        h.set_bucket(
            bounds_s
                .iter()
                .zip(cumulative)
                .map(|(b, c)| {
                    let mut bucket = Bucket::default();
                    bucket.set_upper_bound(*b);
                    bucket.set_cumulative_count(*c);
                    bucket
                })
                .collect(),
        );
        m.set_histogram(h);
        self.0.mut_metric().push(m);
    }

    pub(super) fn sample(&mut self, labels: &[(&str, &str)], value: f64) -> &mut Self {
        let mut m = Self::labelled(labels);
        match self.0.get_field_type() {
            MetricType::COUNTER => {
                let mut c = Counter::default();
                c.set_value(value);
                m.set_counter(c);
            }
            _ => {
                let mut g = Gauge::default();
                g.set_value(value);
                m.set_gauge(g);
            }
        }
        self.0.mut_metric().push(m);
        self
    }
}

/// `labels`, plus `netns` when the series has one (`--all-netns`).
pub(super) fn with_netns<'a>(labels: &[(&'a str, &'a str)], netns: &'a Option<String>) -> Vec<(&'a str, &'a str)> {
    let mut v = labels.to_vec();
    if let Some(n) = netns {
        v.push(("netns", n.as_str()));
    }
    v
}

/// `--nat`: packets conntrack dropped for want of a NAT port, per
/// destination; absent (not zeros) where the kernel does not serve them.
fn nat_failures(view: &View, fams: &mut Vec<Family>) {
    let Some(nat) = &view.nat_failures else { return };
    let mut per = Family::new(
        "timewait_nat_allocation_failures_total",
        "Packets dropped because NAT found no free source port (conntrack insert_failed), by NAT address and real destination.",
        MetricType::COUNTER,
    );
    for f in &nat.by_destination {
        let d = &f.destination;
        let (nat_address, remote, port) = (d.nat_address.to_string(), d.remote.to_string(), d.port.to_string());
        let netns = f.netns.map(|n| n.to_string());
        let labels = [("nat_address", nat_address.as_str()), ("remote", remote.as_str()), ("port", port.as_str()), ("protocol", d.protocol.label())];
        per.sample(&with_netns(&labels, &netns), f.count as f64);
    }
    fams.push(per);
    let mut other = Family::new(
        "timewait_nat_allocation_failures_unattributed_total",
        "NAT allocation failures no destination could be given to (the kernel's table full, unreadable headers, protocols without ports).",
        MetricType::COUNTER,
    );
    other.sample(&[], nat.unattributed as f64);
    fams.push(other);
}

pub fn render(view: &View, st: &Static<'_>) -> Vec<u8> {
    use MetricType::{COUNTER, GAUGE};
    let mut fams = Vec::new();

    let mut sockets = Family::new(
        "timewait_sockets",
        "TIME_WAIT sockets now, by direction, remote and service port (sums to `ss -tan state time-wait`).",
        GAUGE,
    );
    let mut orphans = Family::new(
        "timewait_fin_wait2_orphans",
        "Minisockets in substate FIN_WAIT2: closed by us, the peer's FIN not yet in.",
        GAUGE,
    );
    for s in &view.series {
        let port = crate::model::aggregate::port_label(s.port);
        let dir = s.direction.map_or("unknown", |d| d.as_str());
        let netns = s.netns.map(|n| n.to_string());
        let mut labels = with_netns(&[("direction", dir), ("remote", s.remote.as_str()), ("port", port.as_str())], &netns);
        if let Some(c) = &s.cgroup {
            labels.push(("cgroup", c.as_str()));
        }
        if s.time_wait > 0 {
            sockets.sample(&labels, s.time_wait as f64);
        }
        if s.fin_wait2 > 0 {
            orphans.sample(&labels, s.fin_wait2 as f64);
        }
    }
    fams.push(sockets);
    fams.push(orphans);

    let mut in_use = Family::new(
        "timewait_outbound_ports_in_use",
        "Local ports held toward remote:port (connections we opened, in every state, TIME_WAIT included).",
        GAUGE,
    );
    let mut ratio = Family::new(
        "timewait_port_exhaustion_ratio",
        "timewait_outbound_ports_in_use / timewait_local_port_range_size, 0..1.",
        GAUGE,
    );
    for s in &view.series {
        if s.direction == Some(crate::model::aggregate::Direction::Outbound) && s.ports_in_use() > 0 {
            let netns = s.netns.map(|n| n.to_string());
            let port = crate::model::aggregate::port_label(s.port);
            let mut labels = with_netns(&[("remote", s.remote.as_str()), ("port", port.as_str())], &netns);
            if let Some(c) = &s.cgroup {
                labels.push(("cgroup", c.as_str()));
            }
            in_use.sample(&labels, s.ports_in_use() as f64);
        }
    }
    // Per destination, whoever holds the ports (the cgroups share the
    // range); a folded series shows its busiest real destination's.
    for w in &view.ratios {
        let port = crate::model::aggregate::port_label(w.port);
        ratio.sample(&[("remote", w.remote.as_str()), ("port", port.as_str())], w.ratio);
    }
    fams.push(in_use);
    fams.push(ratio);
    let mut left = Family::new(
        "timewait_port_exhaustion_seconds",
        "Estimated seconds until the local port range toward remote:port is used up at the current rate of new ports, \
         the TIME_WAIT expiry schedule taken into account; +Inf when usage is not heading there (README: Time to exhaustion).",
        GAUGE,
    );
    let mut expiring = Family::new(
        "timewait_outbound_ports_expiring",
        "Local ports toward remote:port whose TIME_WAIT ends within the next 10 s / 60 s.",
        GAUGE,
    );
    let mut taken = Family::new(
        "timewait_outbound_ports_taken_per_second",
        "Local ports taken toward remote:port per second, over the last 10 s (connections opened, TIME_WAIT created).",
        GAUGE,
    );
    for e in &view.estimates {
        let port = crate::model::aggregate::port_label(e.port);
        let labels = [("remote", e.remote.as_str()), ("port", port.as_str())];
        left.sample(&labels, e.seconds_left.unwrap_or(f64::INFINITY));
        taken.sample(&labels, e.rate);
        let (l10, l60) = ([("within", "10s")], [("within", "60s")]);
        expiring.sample(&[labels.as_slice(), &l10].concat(), e.freed_10s as f64);
        expiring.sample(&[labels.as_slice(), &l60].concat(), e.freed_60s as f64);
    }
    fams.push(left);
    fams.push(expiring);
    fams.push(taken);
    let mut inbound_ratio = Family::new(
        "timewait_inbound_remote_port_ratio",
        "Inbound TIME_WAIT sockets from one remote / the source ports one remote can use (--remote-port-range-size).",
        GAUGE,
    );
    for r in &view.inbound_ratios {
        let netns = r.netns.map(|n| n.to_string());
        inbound_ratio.sample(&with_netns(&[("remote", r.remote.as_str())], &netns), r.ratio);
    }
    fams.push(inbound_ratio);

    let mut errors = Family::new(
        "timewait_connect_errors_total",
        "Failed connect() (EADDRNOTAVAIL) and bind() (EADDRINUSE) calls, by process name.",
        COUNTER,
    );
    for e in &view.connect_errors {
        let port = if e.remote.is_empty() { String::new() } else { e.port.to_string() };
        let mut labels = vec![("errno", e.errno), ("comm", e.comm.as_str())];
        if let Some(c) = &e.cgroup {
            labels.extend([("cgroup", c.as_str()), ("remote", e.remote.as_str()), ("port", port.as_str())]);
        }
        errors.sample(&labels, e.count as f64);
    }
    fams.push(errors);
    nat_failures(view, &mut fams);

    let c = &view.counters;
    let mut created = Family::new("timewait_created_total", "Minisockets created (TIME_WAIT or FIN_WAIT2).", COUNTER);
    created
        .sample(&[("direction", "inbound")], c.created_inbound as f64)
        .sample(&[("direction", "outbound")], c.created_outbound as f64);
    fams.push(created);

    let mut closed = Family::new("timewait_closed_total", "Minisockets gone, by why.", COUNTER);
    for ((reason, _), n) in REASONS.iter().zip(c.closed) {
        closed.sample(&[("reason", reason)], n as f64);
    }
    fams.push(closed);

    let mut lifetime = Family::new(
        "timewait_lifetime_seconds",
        "How long a minisocket lived (created under watch), by why it ended.",
        MetricType::HISTOGRAM,
    );
    let bounds: Vec<f64> = LIFETIME_BUCKETS_NS.iter().map(|ns| *ns as f64 / 1e9).collect();
    for l in &view.lifetimes {
        lifetime.histogram(&[("reason", l.reason)], &bounds, &l.cumulative, l.count, l.sum_seconds);
    }
    fams.push(lifetime);

    let mut syn = Family::new(
        "timewait_syn_total",
        "SYNs that arrived for a 4-tuple held by a TIME_WAIT minisocket.",
        COUNTER,
    );
    let mut rejected = Family::new(
        "timewait_syn_rejected_total",
        "SYNs for a 4-tuple in TIME_WAIT that the kernel did not accept (old sequence/timestamp, or FIN_WAIT2).",
        COUNTER,
    );
    for s in &view.syns {
        let netns = s.netns.map(|n| n.to_string());
        let labels = with_netns(&[("remote", s.remote.as_str())], &netns);
        syn.sample(&labels, s.total as f64);
        rejected.sample(&labels, s.rejected as f64);
    }
    let mut segments = Family::new("timewait_segments_total", "Segments dropped by a TIME_WAIT minisocket, by kind.", COUNTER);
    for ((kind, _), n) in SEGMENT_KINDS.iter().zip(c.segments) {
        segments.sample(&[("kind", kind)], n as f64);
    }
    // A kernel that cannot show segments gets no such series, not zeros
    // (timewait_probe_path{signal="segments",path="unavailable"} says why).
    let segments_seen = !st
        .signals
        .iter()
        .any(|sp| sp.signal == crate::kernel::paths::SEGMENTS && sp.path == crate::kernel::paths::Path::Unavailable);
    if segments_seen {
        fams.push(syn);
        fams.push(rejected);
        fams.push(segments);
    }

    let mut lost = Family::new(
        "timewait_events_lost_total",
        "Kernel events the daemon could not take (a full map).",
        COUNTER,
    );
    lost.sample(&[], c.lost as f64);
    fams.push(lost);

    let mut misses = Family::new(
        "timewait_program_recursion_misses_total",
        "Runs of a program the kernel skipped because it was already running on that CPU (an interrupt nested in a run); most are of unrelated timers or sockets, reconciliation heals the rest.",
        COUNTER,
    );
    for (name, n) in &c.recursion_misses {
        misses.sample(&[("program", name.as_str())], *n as f64);
    }
    fams.push(misses);

    let mut runs = Family::new("timewait_reconcile_runs_total", "Reconciliations against the kernel's socket list (sock_diag dump).", COUNTER);
    runs.sample(&[], c.reconcile_runs as f64);
    fams.push(runs);
    let mut rerr = Family::new("timewait_reconcile_errors_total", "Reconciliations that failed (the dump could not be read).", COUNTER);
    rerr.sample(&[], c.reconcile_errors as f64);
    fams.push(rerr);
    let mut skipped = Family::new(
        "timewait_reconcile_netns_skipped_total",
        "Reconciliation walks (--all-netns) that could not enter some network namespace; its counts were kept, not removed.",
        COUNTER,
    );
    skipped.sample(&[], c.reconcile_netns_skipped as f64);
    fams.push(skipped);
    let mut corr = Family::new(
        "timewait_reconcile_corrections_total",
        "How much reconciliation corrected the counts (sum of absolute changes): what the programs missed.",
        COUNTER,
    );
    corr.sample(&[], c.reconcile_corrections as f64);
    fams.push(corr);
    let mut rdur = Family::new("timewait_reconcile_duration_seconds", "How long the last reconciliation took.", GAUGE);
    rdur.sample(&[], c.reconcile_last_micros as f64 / 1e6);
    let mut sdur = Family::new(
        "timewait_schedule_walk_duration_seconds",
        "How long the last read of the per-socket tables for the time-to-exhaustion estimates took (0: none needed).",
        GAUGE,
    );
    sdur.sample(&[], c.schedule_walk_micros as f64 / 1e6);
    fams.push(rdur);
    fams.push(sdur);
    if let Some(age) = st.drain_age {
        let mut f = Family::new(
            "timewait_last_drain_age_seconds",
            "Seconds since the kernel's gauge and SYN tables were last drained (every second; /healthz fails above 30).",
            GAUGE,
        );
        f.sample(&[], age.as_secs_f64());
        fams.push(f);
    }
    if let Some(age) = st.reconcile_age {
        let mut f = Family::new(
            "timewait_last_reconcile_age_seconds",
            "Seconds since the last successful reconciliation walk.",
            GAUGE,
        );
        f.sample(&[], age.as_secs_f64());
        fams.push(f);
    }

    let mut snap = Family::new(
        "timewait_snapshot_sockets_total",
        "Minisockets that already existed when the daemon started (start-up snapshot).",
        COUNTER,
    );
    snap.sample(&[], c.snapshot as f64);
    fams.push(snap);

    let mut hist = Family::new(
        "timewait_direction_from_history_total",
        "Minisockets whose direction came from the connection's own history, not the listener table (a listener gone, or an active open from a listening port).",
        COUNTER,
    );
    hist.sample(&[], c.direction_from_history as f64);
    fams.push(hist);

    let mut ooo = Family::new(
        "timewait_out_of_order_total",
        "Minisockets another CPU reached between their hashing and their socket's close (tracepoint path), told from that CPU's event: a segment they dropped, or the connection that took them over.",
        COUNTER,
    );
    ooo.sample(&[], c.out_of_order as f64);
    fams.push(ooo);

    let sys = &view.sysctls;
    if let Some(max) = sys.max_buckets {
        let mut f = Family::new("timewait_max_buckets", "net.ipv4.tcp_max_tw_buckets.", GAUGE);
        f.sample(&[], max as f64);
        fams.push(f);
    }
    if let Some(n) = sys.local_port_range_size {
        let mut f = Family::new("timewait_local_port_range_size", "Ports in net.ipv4.ip_local_port_range.", GAUGE);
        f.sample(&[], n as f64);
        fams.push(f);
    }
    if let Some(n) = sys.overflow {
        let mut f = Family::new(
            "timewait_overflow_total",
            "Sockets that could not enter TIME_WAIT because tcp_max_tw_buckets was full (TcpExtTCPTimeWaitOverflow).",
            COUNTER,
        );
        f.sample(&[], n as f64);
        fams.push(f);
    }

    let mut hooks = Family::new(
        "timewait_probe_attached",
        "1 when the kernel hook is attached, 0 when the running kernel does not offer it.",
        GAUGE,
    );
    for (hook, ok) in st.hooks {
        hooks.sample(&[("hook", hook.as_str())], if *ok { 1.0 } else { 0.0 });
    }
    fams.push(hooks);

    let mut paths = Family::new(
        "timewait_probe_path",
        "1 for the path that serves each signal (sockets, bind_errors, lifecycle, segments, nat_failures with --nat): fentry, kprobe, tracepoint, unavailable (its metrics are then not exported) or off (left off by the configuration).",
        GAUGE,
    );
    for sp in st.signals {
        paths.sample(&[("signal", sp.signal), ("path", sp.path.as_str())], 1.0);
    }
    if let Some(nat) = &view.nat {
        for (signal, path) in super::nat_exposition::paths(nat) {
            paths.sample(&[("signal", signal), ("path", path)], 1.0);
        }
        super::nat_exposition::families(nat, &mut fams);
    }
    fams.push(paths);

    let mut errs = Family::new("timewait_map_read_errors_total", "BPF map reads that failed.", COUNTER);
    errs.sample(&[], st.read_errors as f64);
    fams.push(errs);

    let mut build = Family::new("timewait_build_info", "Always 1: version and kernel.", GAUGE);
    build.sample(&[("version", st.version), ("kernel", st.kernel)], 1.0);
    fams.push(build);

    let fams: Vec<MetricFamily> = fams.into_iter().map(|f| f.0).filter(|f| !f.get_metric().is_empty()).collect();
    let mut buf = Vec::with_capacity(4096);
    // Encoding into a Vec fails only on an empty family, filtered out above.
    let _ = TextEncoder::new().encode(&fams, &mut buf);
    buf
}
