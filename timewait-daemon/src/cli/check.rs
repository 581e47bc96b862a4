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
