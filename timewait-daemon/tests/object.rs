//! Issue 26, on the eBPF object itself (no kernel, no root): which maps each
//! program references, as aya links it (the program with every function it
//! calls). Kernels 5.6-6.0 WARN at load, taint themselves (a panic with
//! `panic_on_warn`) when a kprobe, tracepoint, raw tracepoint or perf event
//! program references a hash map allocated at run time (`BPF_F_NO_PREALLOC`;
//! kernel/bpf/verifier.c `check_map_prog_compatibility`), and PREEMPT_RT
//! kernels refuse it. The kernel-side counterpart, on 5.10's kprobe path, is
//! `tests/kernel/load_taint.rs`.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use aya_obj::{Object, ProgramSection};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/timewait"));

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
const BPF_MAP_TYPE_HASH_OF_MAPS: u32 = 12;
const BPF_F_NO_PREALLOC: u32 = 1;
/// `BPF_LD | BPF_IMM | BPF_DW`, with `src_reg` `BPF_PSEUDO_MAP_FD`: a map reference.
const LD_IMM64: u8 = 0x18;
const BPF_PSEUDO_MAP_FD: u8 = 1;

struct Linked {
    /// Program name -> (its section, the maps it references).
    programs: BTreeMap<String, (ProgramSection, BTreeSet<String>)>,
    /// Map name -> whether it is allocated at run time.
    runtime: BTreeMap<String, bool>,
}

/// Links every program as aya does, with a made-up descriptor per map, and
/// reads back which maps each one loads.
fn linked() -> Linked {
    let mut obj = Object::parse(OBJECT).expect("parse the eBPF object");
    let maps: Vec<(String, aya_obj::Map)> = obj.maps.iter().map(|(n, m)| (n.clone(), m.clone())).collect();
    let fd_base = 1000;
    let fds: BTreeMap<i32, String> = maps.iter().enumerate().map(|(i, (n, _))| (fd_base + i as i32, n.clone())).collect();
    let text: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
    obj.relocate_maps(maps.iter().enumerate().map(|(i, (n, m))| (n.as_str(), fd_base + i as i32, m)), &text)
        .expect("relocate maps");
    obj.relocate_calls(&text).expect("link calls");
    let runtime = maps
        .iter()
        .map(|(n, m)| {
            let hash = matches!(m.map_type(), BPF_MAP_TYPE_HASH | BPF_MAP_TYPE_PERCPU_HASH | BPF_MAP_TYPE_HASH_OF_MAPS);
            (n.clone(), hash && m.map_flags() & BPF_F_NO_PREALLOC != 0)
        })
        .collect();
    let programs = obj
        .programs
        .iter()
        .map(|(name, p)| {
            let f = &obj.functions[&p.function_key()];
            let used = f
                .instructions
                .iter()
                .filter(|i| i.code == LD_IMM64 && i.src_reg() == BPF_PSEUDO_MAP_FD)
                .filter_map(|i| fds.get(&i.imm).cloned())
                .collect();
            (name.clone(), (p.section.clone(), used))
        })
        .collect();
    Linked { programs, runtime }
}

fn trace_type(s: &ProgramSection) -> bool {
    matches!(
        s,
        ProgramSection::KProbe
            | ProgramSection::KRetProbe
            | ProgramSection::UProbe { .. }
            | ProgramSection::URetProbe { .. }
            | ProgramSection::TracePoint
            | ProgramSection::RawTracePoint
            | ProgramSection::PerfEvent
    )
}

#[test]
fn no_trace_type_program_uses_a_map_allocated_at_run_time() {
    let l = linked();
    let mut bad = Vec::new();
    let mut trace = 0;
    for (name, (section, used)) in &l.programs {
        if !trace_type(section) {
            continue;
        }
        trace += 1;
        // Not vacuous: every one of ours keeps or counts something.
        assert!(!used.is_empty(), "{name} references no map: the relocations were not read");
        bad.extend(used.iter().filter(|m| l.runtime[*m]).map(|m| format!("{name} ({section:?}) uses {m}")));
    }
    assert!(trace >= 7, "the kprobes, kretprobe and syscall tracepoints: {trace} found");
    assert!(bad.is_empty(), "trace-type programs with maps allocated at run time: {bad:#?}");
}

/// What only the tracepoint lifecycle uses is referenced by tracepoint
/// programs (and that lifecycle's walks) alone, not by a program of the
/// kernel-function lifecycle, fentry or kprobe.
#[test]
fn tw_index_is_the_tracepoint_paths_own() {
    let l = linked();
    assert!(l.runtime["TW_INDEX"], "TW_INDEX is the map allocated as used");
    let users: BTreeSet<&str> =
        l.programs.iter().filter(|(_, (_, used))| used.contains("TW_INDEX")).map(|(n, _)| n.as_str()).collect();
    for (name, (section, _)) in &l.programs {
        let kernel_functions = matches!(
            section,
            ProgramSection::KProbe | ProgramSection::KRetProbe | ProgramSection::FEntry { .. } | ProgramSection::FExit { .. }
        );
        assert!(!(kernel_functions && users.contains(name.as_str())), "{name} ({section:?}) references TW_INDEX");
    }
    for name in ["tw_sock_set_state", "tw_timer_expire", "tw_kfree_skb"] {
        assert!(users.contains(name), "{name} indexes minisockets; TW_INDEX users: {users:?}");
    }
    // Nor by any other program, iterator or not, that would decide at run
    // time whether to use it: tracepoint programs (tp_btf) and the tracepoint
    // lifecycle's walks alone. The daemon loads the walks of the lifecycle
    // attached (`kernel/paths.rs`, `walks`).
    let tp_walks = ["iter_timewait_tp", "iter_reconcile_tp"];
    let others: Vec<String> = l
        .programs
        .iter()
        .filter(|(name, _)| users.contains(name.as_str()))
        .filter(|(name, (section, _))| {
            !matches!(section, ProgramSection::BtfTracePoint)
                && !(matches!(section, ProgramSection::Iter { .. }) && tp_walks.contains(&name.as_str()))
        })
        .map(|(name, (section, _))| format!("{name} ({section:?})"))
        .collect();
    assert!(others.is_empty(), "programs outside the tracepoint lifecycle reference TW_INDEX: {others:#?}");
    // Not vacuous: each lifecycle has its pair of walks, and only the `_tp`
    // one indexes.
    for name in ["iter_listeners", "iter_timewait", "iter_reconcile", "iter_timewait_tp", "iter_reconcile_tp"] {
        let (section, used) = l.programs.get(name).unwrap_or_else(|| panic!("{name} not in the object"));
        assert!(matches!(section, ProgramSection::Iter { .. }), "{name} is {section:?}, not an iterator");
        assert!(used.contains("TW_SOCKS") || name == "iter_listeners", "{name} walks minisockets: {used:?}");
        assert_eq!(used.contains("TW_INDEX"), tp_walks.contains(&name), "{name} and TW_INDEX: {used:?}");
    }
}

