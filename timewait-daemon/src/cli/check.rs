//! `timewaitd check`: one line per requirement, ok or missing and what to do.
//!
//! It does not guess from BTF names or version numbers: it loads and attaches
//! every program the daemon would use, exactly as the daemon does (then
//! detaches them), and reports per signal which path serves it.

use std::process::ExitCode;

use super::{args::RunArgs, config, fail, print_out};
use crate::kernel::{
    load::{self, LoadOptions},
    offsets,
    paths::{BIND_ERRORS, LIFECYCLE, NAT_FAILURES, Path, SEGMENTS, SOCKETS},
    procfs,
};

/// `ok`: served; `missing`: the daemon cannot run; `partial`: it runs, this
/// feature is unavailable (said so in /metrics, never exported as zeros).
#[derive(PartialEq)]
enum Status {
    Ok,
    Missing,
    Partial,
}

struct Line {
    what: String,
    status: Status,
    detail: String,
}

fn line(what: impl Into<String>, status: Status, detail: impl Into<String>) -> Line {
    Line { what: what.into(), status, detail: detail.into() }
}

fn ok_or(ok: bool, missing: Status) -> Status {
    if ok { Status::Ok } else { missing }
}

/// What each signal gives the user, for the check's lines.
fn feature(signal: &str) -> &'static str {
    match signal {
        LIFECYCLE => "lifecycle (TIME_WAIT gauges, created, closed, lifetimes)",
        SEGMENTS => "segments (SYN accepted/rejected, segment kinds, reset reasons)",
        SOCKETS => "sockets (listeners for direction, active opens for ports in use, connect errors)",
        BIND_ERRORS => "bind errors (EADDRINUSE)",
        NAT_FAILURES => "NAT failures (packets dropped for want of a NAT port, per destination)",
        _ => "",
    }
}

pub fn main(args: &RunArgs) -> ExitCode {
    let cfg = match config::resolve(args) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let mut lines = vec![line("kernel", Status::Ok, procfs::release())];
    match offsets::load_btf() {
        Ok(btf) => {
            lines.push(line("btf", Status::Ok, offsets::VMLINUX_BTF));
            match offsets::offsets(&btf) {
                Ok(o) => lines.push(line(
                    "struct offsets",
                    Status::Ok,
                    format!("tw_timer at {}, tw_substate at {}", o.tw_timer, o.tw_substate),
                )),
                Err(e) => lines.push(line("struct offsets", Status::Missing, e.to_string())),
            }
        }
        Err(e) => lines.push(line("btf", Status::Missing, e.to_string())),
    }
    match offsets::timer_functions() {
        Ok(f) => {
            lines.push(line("tw_timer_handler", Status::Ok, format!("{:#x}", f.tw_timer_handler)));
        }
        Err(e) => lines.push(line("tw_timer_handler", Status::Missing, e.to_string())),
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    lines.push(line(
        "privileges",
        ok_or(euid == 0, Status::Missing),
        if euid == 0 {
            "root".to_string()
        } else {
            format!("uid {euid}: run as root, or grant CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN")
        },
    ));
    lines.extend(attach_lines(&cfg));
    lines.extend(nat_lines(&cfg.nat));
    for s in ["net.ipv4.tcp_max_tw_buckets", "net.ipv4.ip_local_port_range", "net.ipv4.tcp_tw_reuse", "net.ipv4.tcp_fin_timeout"] {
        let v = procfs::sysctl(s);
        lines.push(line(s, ok_or(v.is_some(), Status::Missing), v.unwrap_or_else(|| "unreadable".into()).replace('\t', " ")));
    }
    let width = lines.iter().map(|l| l.what.len()).max().unwrap_or(0);
    let mut out = String::new();
    for l in &lines {
        let status = match l.status {
            Status::Ok => "ok",
            Status::Missing => "missing",
            Status::Partial => "partial",
        };
        out.push_str(&format!("{:<width$}  {status:<7}  {}\n", l.what, l.detail));
    }
    let can_run = lines.iter().all(|l| l.status != Status::Missing);
    out.push_str(if !can_run {
        "timewaitd cannot run here: fix the lines marked missing\n"
    } else if lines.iter().any(|l| l.status == Status::Partial) {
        "timewaitd can run here; the lines marked partial are features this kernel does not serve\n"
    } else {
        "timewaitd can run here\n"
    });
    if print_out(&out) != ExitCode::SUCCESS {
        return ExitCode::from(2);
    }
    if can_run { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

/// Loads and attaches everything the daemon would, then drops it (which
/// detaches every program): one line per signal and per other hook.
fn attach_lines(cfg: &config::Config) -> Vec<Line> {
    let opts = LoadOptions { all_netns: false, max_tracked_sockets: Some(1024), max_series: 1024, ..LoadOptions::of(cfg) };
    let probes = match load::load(&opts) {
        Ok(p) => p,
        Err(e) => return vec![line("attach", Status::Missing, format!("{e}"))],
    };
    let mut lines = Vec::new();
    for sp in &probes.signals {
        let what = feature(sp.signal);
        let refused = if sp.refused.is_empty() { String::new() } else { format!(" (not taken: {})", sp.refused.join("; ")) };
        if sp.path == Path::Off {
            lines.push(line(what, Status::Ok, format!("off: {}", sp.refused.join("; "))));
        } else if sp.path == Path::Unavailable && (sp.signal == BIND_ERRORS || sp.signal == NAT_FAILURES) {
            lines.push(line(what, Status::Partial, format!("unavailable{refused}")));
        } else if sp.path == Path::Unavailable {
            lines.push(line(
                what,
                Status::Partial,
                format!(
                    "unavailable{refused}; fix: a kernel that allows fentry or kprobes (not locked down, CONFIG_KPROBES), \
                     or Linux 6.11+ for the tracepoint path"
                ),
            ));
        } else {
            lines.push(line(what, Status::Ok, format!("{}: {}{refused}", sp.path.as_str(), sp.hooks.join(", "))));
        }
    }
    let signal_hooks: Vec<&String> = probes.signals.iter().flat_map(|sp| &sp.hooks).collect();
    for (hook, ok) in probes.hooks.iter().filter(|(h, _)| !signal_hooks.contains(&h)) {
        lines.push(line(
            hook.clone(),
            ok_or(*ok, Status::Partial),
            if *ok {
                "attached"
            } else {
                "missing"
            },
        ));
    }
    lines
}

/// The NAT side: whether conntrack can be read here, what it holds, and
/// where each NAT address's port range comes from.
fn nat_lines(opts: &crate::nat::reader::NatOptions) -> Vec<Line> {
    use crate::nat::{RangeSource, reader};
    const WHAT: &str = "nat (NAT source ports per destination, conntrack stats)";
    if opts.mode == reader::NatMode::Off {
        return vec![line(WHAT, Status::Ok, "off: --nat off")];
    }
    if !reader::has_net_admin() {
        let status = if opts.mode == reader::NatMode::On { Status::Missing } else { Status::Partial };
        return vec![line(
            WHAT,
            status,
            "unavailable: CAP_NET_ADMIN missing; fix: the unit's nat drop-in (deploy/systemd/timewaitd.service.d/nat.conf), or --nat off",
        )];
    }
    let ns = reader::check_here(opts);
    if let Some(why) = &ns.unavailable {
        let status = if ns.stats.is_none() { Status::Ok } else { Status::Partial };
        return vec![line(WHAT, status, format!("not watched: {why}"))];
    }
    let stats = ns.stats.clone().unwrap_or_default();
    let mut lines = vec![line(
        WHAT,
        Status::Ok,
        format!(
            "ctnetlink: {} entries (limit {}), {} NAT addresses x destinations, dump {:.3} s",
            ns.dump.entries,
            stats.limit.map_or_else(|| "unknown".to_string(), |l| l.to_string()),
            ns.fold.by_dest.len(),
            ns.dump_wall.as_secs_f64()
        ),
    )];
    match &ns.rules_error {
        Some(e) => lines.push(line("nat rules", Status::Partial, format!("{e}; ranges default to 1024-65535 unless --nat-port-range"))),
        None => {
            for r in &ns.rules {
                lines.push(line("nat rule", Status::Ok, r.clone()));
            }
            if ns.rules_unreadable > 0 {
                lines.push(line(
                    "nat rules",
                    Status::Partial,
                    format!("{} rule(s) whose port range cannot be read (a map, a register loaded at run time): set --nat-port-range", ns.rules_unreadable),
                ));
            }
        }
    }
    for (addr, proto, range, source, conflict) in &ns.ranges {
        let source = match source {
            RangeSource::Nftables => "nftables",
            RangeSource::Flag => "--nat-port-range",
            RangeSource::Default => "default (no rule names ports)",
        };
        let conflict = if *conflict { "; rules disagree: the union is used" } else { "" };
        lines.push(line(
            format!("nat range {addr} {}", proto.label()),
            Status::Ok,
            format!("{}-{} ({} ports) from {source}{conflict}", range.min, range.max, range.size()),
        ));
    }
    lines
}
