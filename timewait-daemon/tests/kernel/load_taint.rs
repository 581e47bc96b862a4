//! Issue 26: loading the daemon leaves the kernel as it was. Kernels 5.6-6.0
//! print a WARN when a kprobe or classic tracepoint program references a
//! hash map allocated at run time (`BPF_F_NO_PREALLOC`; kernel/bpf/verifier.c
//! `check_map_prog_compatibility`: "trace type BPF program uses run-time
//! allocation"), which taints the kernel (`TAINT_WARN`, 512) and panics a
//! host booted with `panic_on_warn`; PREEMPT_RT kernels refuse the program.
//! The matrix runs this on 5.10's forced kprobe path (the lifecycle's and the
//! segments' kprobes, and with `--syscall-tracepoints` the classic
//! `syscalls` tracepoints); on any kernel it also checks the rule itself on
//! the daemon's loaded programs and their maps, as the kernel sees them,
//! and that of the socket iterators only its lifecycle's pair is loaded.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::support::{Daemon, NetNs, expected_paths, require_root, run_cmd};

/// The program types that kernels 5.6-6.0 check (`is_tracing_prog_type`):
/// fentry/fexit, tp_btf and iterators are `tracing`, which they do not.
const TRACE_TYPES: &[&str] = &["kprobe", "tracepoint", "raw_tracepoint", "perf_event"];

fn tainted() -> u64 {
    let text = std::fs::read_to_string("/proc/sys/kernel/tainted").expect("read /proc/sys/kernel/tainted");
    text.trim().parse().unwrap_or_else(|e| panic!("tainted {text:?}: {e}"))
}

/// The kernel log lines after `last` (the last line before; all when the
/// ring buffer no longer holds it).
fn dmesg_since(last: &str) -> Vec<String> {
    let lines: Vec<String> = run_cmd("dmesg", &[]).lines().map(str::to_string).collect();
    let from = lines.iter().rposition(|l| l == last).map_or(0, |i| i + 1);
    lines[from..].to_vec()
}

/// The daemon's program ids, from its file descriptors.
fn prog_ids(pid: u32) -> Vec<u64> {
    let mut ids = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(fd.path()).unwrap_or_default();
        ids.extend(text.lines().filter_map(|l| l.strip_prefix("prog_id:")).filter_map(|v| v.trim().parse::<u64>().ok()));
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn bpftool_json(what: &str) -> Vec<Value> {
    let text = run_cmd("bpftool", &["-j", what, "show"]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("bpftool -j {what} show: {e}"))
}

/// "program (type) uses MAP (type, flags)" for every trace-type program of
/// process `pid` that references a hash map allocated at run time.
fn trace_programs_with_runtime_maps(pid: u32) -> (usize, Vec<String>) {
    let ours = prog_ids(pid);
    let all_maps = bpftool_json("map");
    let maps: BTreeMap<u64, &Value> = all_maps.iter().filter_map(|m| Some((m["id"].as_u64()?, m))).collect();
    let mut trace = 0;
    let mut bad = Vec::new();
    for p in bpftool_json("prog").iter().filter(|p| p["id"].as_u64().is_some_and(|id| ours.contains(&id))) {
        let ptype = p["type"].as_str().unwrap_or("");
        if !TRACE_TYPES.contains(&ptype) {
            continue;
        }
        trace += 1;
        for id in p["map_ids"].as_array().into_iter().flatten().filter_map(Value::as_u64) {
            let Some(m) = maps.get(&id) else { continue };
            let mtype = m["type"].as_str().unwrap_or("");
            let flags = m["flags"].as_u64().unwrap_or(0);
            // BPF_F_NO_PREALLOC on a hash map (LRU maps are always preallocated).
            if matches!(mtype, "hash" | "percpu_hash" | "hash_of_maps") && flags & 1 != 0 {
                let (prog, map) = (p["name"].as_str().unwrap_or("?"), m["name"].as_str().unwrap_or("?"));
                bad.push(format!("{prog} ({ptype}) uses {map} ({mtype}, flags {flags:#x})"));
            }
        }
    }
    (trace, bad)
}

#[test]
fn load_neither_warns_nor_taints() {
    if !require_root("load_neither_warns_nor_taints") {
        return;
    }
    let before = tainted();
    let last = run_cmd("dmesg", &[]).lines().last().unwrap_or_default().to_string();
    let ns = NetNs::new();
    // --syscall-tracepoints: the classic tracepoints of bind() errors load
    // too wherever the sockets signal is on its tracepoint (kprobe path).
    let daemon = Daemon::start(&ns, &["--syscall-tracepoints"]);
    let after = tainted();
    let log = dmesg_since(&last);
    let (trace, runtime_maps) = trace_programs_with_runtime_maps(daemon.pid());
    let iters = iterators(daemon.pid());
    daemon.stop();
    eprintln!("tainted {before} -> {after}; {} new kernel log lines; {trace} trace-type programs loaded", log.len());
    let warned: Vec<&String> =
        log.iter().filter(|l| l.contains("run-time allocation") || l.contains("WARNING") || l.contains("cut here")).collect();
    assert!(warned.is_empty(), "the daemon's load made the kernel warn:\n{}", log.join("\n"));
    assert_eq!(after, before, "the daemon's load tainted the kernel (/proc/sys/kernel/tainted)");
    assert!(runtime_maps.is_empty(), "trace-type programs reference maps allocated at run time: {runtime_maps:#?}");
    // Only the minisocket walks of the lifecycle attached are loaded
    // (`kernel/paths.rs`, `walks`): `iter_listeners` and one pair, which
    // references `TW_INDEX` on the tracepoint lifecycle alone.
    let lifecycle = expected_paths().0;
    assert_eq!(iters.len(), 3, "iter_listeners and one pair of minisocket walks ({lifecycle}): {iters:?}");
    let indexing = iters.iter().filter(|(_, uses)| *uses).count();
    assert_eq!(indexing, if lifecycle == "tracepoint" { 2 } else { 0 }, "{lifecycle}: iterators that reference TW_INDEX: {iters:?}");
}


/// The daemon's iterator programs, each with whether it references
/// `TW_INDEX` (kernel program names are cut at 15 characters: "iter_"
/// survives).
fn iterators(pid: u32) -> Vec<(String, bool)> {
    let ours = prog_ids(pid);
    let tw_index: Vec<u64> =
        bpftool_json("map").iter().filter(|m| m["name"].as_str() == Some("TW_INDEX")).filter_map(|m| m["id"].as_u64()).collect();
    assert!(!tw_index.is_empty(), "no map named TW_INDEX");
    bpftool_json("prog")
        .iter()
        .filter(|p| p["id"].as_u64().is_some_and(|id| ours.contains(&id)))
        .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("iter_")))
        .map(|p| {
            let mut ids = p["map_ids"].as_array().into_iter().flatten().filter_map(Value::as_u64);
            (p["name"].as_str().unwrap_or("?").to_string(), ids.any(|id| tw_index.contains(&id)))
        })
        .collect()
}
