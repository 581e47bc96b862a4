//! Loads the eBPF object, hands it the running kernel's offsets, attaches the programs, runs the start-up snapshot.
//!
//! Programs are attached in the order that leaves no gap, each signal on the
//! path that attaches (see `paths`).

use std::io::Read as _;

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{Iter, TracePoint},
};
use timewait_common::{AggKey, Config, ConnEntry, ErrKey, IndexKey, IndexVal, RemoteKey, SynCounts, TwEntry};
use tracing::{debug, info};

use super::{
    LoadError, error_chain,
    netns::{in_netns, other_namespaces},
    offsets::{self, KernelError},
    paths, procfs,
};

/// The object embedded at build time by build.rs (aya-build).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/timewait"));

/// The classic syscall tracepoints of `--syscall-tracepoints`, in the order
/// they are attached: (program, category, name). The entry notes the
/// descriptor, whose socket the exit reads (TCP's errors alone count).
pub const BIND_PROGRAMS: [(&str, &str, &str); 2] =
    [("tw_enter_bind", "syscalls", "sys_enter_bind"), ("tw_exit_bind", "syscalls", "sys_exit_bind")];

/// How bind() errors are counted: with the fentry sockets hooks (`inet_bind`'s
/// exit), else through `syscalls/sys_exit_bind` when `wanted`, else not.
fn bind_errors(ebpf: &mut Ebpf, sockets: &paths::SignalPath, wanted: bool) -> paths::SignalPath {
    let mut sp = paths::SignalPath { signal: paths::BIND_ERRORS, path: paths::Path::Unavailable, hooks: Vec::new(), refused: Vec::new() };
    if sockets.path == paths::Path::Fentry {
        sp.path = paths::Path::Fentry;
        sp.hooks = sockets.hooks.iter().filter(|h| h.ends_with("_bind")).cloned().collect();
        return sp;
    }
    if !wanted {
        sp.path = paths::Path::Off;
        sp.refused.push(paths::BIND_ERRORS_OFF.to_string());
        return sp;
    }
    let attach = |ebpf: &mut Ebpf| -> Result<(), String> {
        procfs::ensure_tracefs()?;
        for (name, category, tp) in BIND_PROGRAMS {
            attach_classic(ebpf, name, category, tp).map_err(|e| format!("tracepoint/{category}/{tp}: {e}"))?;
        }
        Ok(())
    };
    match attach(ebpf) {
        Ok(()) => {
            sp.path = paths::Path::Tracepoint;
            sp.hooks.extend(BIND_PROGRAMS.iter().map(|(_, category, tp)| format!("tracepoint/{category}/{tp}")));
        }
        Err(e) => {
            // A half-attached pair counts nothing: the exit without the
            // entry finds no descriptor. Detached with the object.
            tracing::warn!(error = %e, "bind() errors are not counted");
            sp.refused.push(e);
        }
    }
    sp
}

/// Options that shape what is loaded.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Watch every network namespace instead of our own.
    pub all_netns: bool,
    /// Capacity of the minisocket table; None sizes it from tcp_max_tw_buckets.
    pub max_tracked_sockets: Option<u32>,
    /// Capacity of each of the two gauge-delta tables (keys whose count
    /// changed between two drains, about a second); the per-remote SYN
    /// tables get half of it, and the daemon keeps that many remotes' SYN
    /// totals apart.
    pub max_series: u32,
    /// Which way into the kernel (`--probe-path`).
    pub probe_path: paths::ProbePath,
    /// Keys carry the owning cgroup (`--attribute-cgroups`).
    pub attribute_cgroups: bool,
    /// `--syscall-tracepoints`: bind() errors on the tracepoint path.
    pub syscall_tracepoints: bool,
    /// `--nat`: attach `nat_kfree_skb` where the kernel allows (signal
    /// `nat_failures`, present only when asked).
    pub nat_drops: bool,
}

/// The loaded programs and the maps the collector reads. Dropping it detaches
/// every program (links are owned by `ebpf`).
pub struct Probes {
    /// The object: its iterator programs run again for each reconciliation
    /// (the collector takes it).
    pub ebpf: Option<Ebpf>,
    /// The minisocket walks of the lifecycle attached (`walks.reconcile`
    /// is each reconciliation's).
    pub walks: paths::Walks,
    pub tw_socks: HashMap<MapData, u64, TwEntry>,
    pub conns: HashMap<MapData, u64, ConnEntry>,
    /// Tracepoint lifecycle: followed minisockets by 4-tuple (`IndexKey`).
    pub tw_index: HashMap<MapData, IndexKey, IndexVal>,
    pub counters: PerCpuArray<MapData, [u64; timewait_common::counter::COUNT as usize]>,
    /// The two gauge-delta and two SYN tables, by epoch (see `COUNTS_0` in
    /// the eBPF crate).
    pub counts: [HashMap<MapData, AggKey, i64>; 2],
    pub syns: [HashMap<MapData, RemoteKey, SynCounts>; 2],
    pub epoch: Array<MapData, u32>,
    /// Namespaces whose sockets the reconciliation walks (None: our own;
    /// with `--all-netns`, the others too, found at each walk).
    pub all_netns: Option<u32>,
    pub lifetime: PerCpuArray<
        MapData,
        [u64; (timewait_common::LIFETIME_REASONS * timewait_common::LIFETIME_SLOTS) as usize],
    >,
    pub connect_errors: HashMap<MapData, ErrKey, i64>,
    /// Each hook and whether it is attached.
    pub hooks: Vec<(String, bool)>,
    /// Which path serves each signal.
    pub signals: Vec<paths::SignalPath>,
    /// Our attached programs, to read how often the kernel skipped them.
    pub programs: Vec<(String, std::os::fd::OwnedFd)>,
    /// Keys carry cgroup ids (`--attribute-cgroups`).
    pub attribute_cgroups: bool,
    /// NAT allocation failures per destination, when attached (`--nat`).
    pub nat: Option<super::nat_drops::NatDrops>,
}

impl Probes {
    /// NAT allocation failures: per raw key, and those that fit no key
    /// (None when not attached). Cumulative: never drained.
    pub fn nat_drops(&self, errors: &std::sync::atomic::AtomicU64) -> Option<(Vec<(timewait_common::NatDropKey, u64)>, u64)> {
        self.nat.as_ref().map(|n| n.read(errors))
    }
}

/// Runs of a program the kernel skipped because it was already running on
/// that CPU (an interrupt came in the middle of it and hit the same hook):
/// `bpf_prog_info.recursion_misses`, Linux 5.12+. Each is an event lost.
pub fn recursion_misses(fd: std::os::fd::BorrowedFd<'_>) -> Option<u64> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: bpf_prog_info is plain old data; all-zero is a valid value.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // The rest of `union bpf_attr` must be zero: pad to its 128-byte minimum.
    #[repr(C)]
    struct Attr {
        info: InfoAttr,
        _rest: [u8; 112],
    }
    let mut attr = Attr {
        info: InfoAttr {
            bpf_fd: fd.as_raw_fd() as u32,
            info_len: size_of::<aya_obj::generated::bpf_prog_info>() as u32,
            info: (&raw mut info) as u64,
        },
        _rest: [0; 112],
    };
    // SAFETY: BPF_OBJ_GET_INFO_BY_FD writes at most info_len bytes into `info`,
    // which outlives the call; attr is valid and zero beyond the used fields.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            aya_obj::generated::bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            &raw mut attr,
            size_of::<Attr>() as libc::c_uint,
        )
    };
    (rc == 0).then_some(info.recursion_misses)
}

fn prog_err(program: &'static str, step: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> LoadError {
    move |e| LoadError::Program { program, step, err: error_chain(&e) }
}

/// Attaches a classic tracepoint program; a kernel without it (no tracefs, no
/// syscall tracepoints) costs only the feature it serves, so it is reported,
/// not fatal.
fn attach_classic(ebpf: &mut Ebpf, name: &'static str, category: &str, tp: &str) -> Result<(), LoadError> {
    let prog: &mut TracePoint = ebpf
        .program_mut(name)
        .ok_or(LoadError::Program { program: name, step: "be found", err: "not in object".into() })?
        .try_into()
        .map_err(prog_err(name, "convert"))?;
    prog.load().map_err(prog_err(name, "load"))?;
    prog.attach(category, tp).map_err(prog_err(name, "attach"))?;
    Ok(())
}

fn iter_prog<'e>(ebpf: &'e mut Ebpf, name: &'static str) -> Result<&'e mut Iter, LoadError> {
    ebpf.program_mut(name)
        .ok_or(LoadError::Program { program: name, step: "be found", err: "not in object".into() })?
        .try_into()
        .map_err(prog_err(name, "convert"))
}

/// Loads iterator programs (once; they run once per namespace).
fn load_iters(ebpf: &mut Ebpf, btf: &Btf, names: &[&'static str]) -> Result<(), LoadError> {
    for &name in names {
        iter_prog(ebpf, name)?.load("tcp", btf).map_err(prog_err(name, "load"))?;
    }
    Ok(())
}

/// Runs iterator program `name` over the TCP sockets of the namespace this
/// thread is in.
pub fn run_iter(ebpf: &mut Ebpf, name: &'static str) -> Result<(), LoadError> {
    let prog = iter_prog(ebpf, name)?;
    let link = prog.attach().map_err(prog_err(name, "attach"))?;
    let link = prog.take_link(link).map_err(prog_err(name, "take link"))?;
    let mut file = link.into_file().map_err(|e| LoadError::Program {
        program: name,
        step: "open",
        err: error_chain(&e),
    })?;
    let mut out = Vec::new();
    file.read_to_end(&mut out).map_err(|e| LoadError::Program {
        program: name,
        step: "run",
        err: e.to_string(),
    })?;
    Ok(())
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::Map(name, "not in object".into()))?;
    T::try_from(map).map_err(|e| LoadError::Map(name, error_chain(&e)))
}

/// Inserts `ErrKey::fallback` of each errno into `CONNECT_ERRORS`, at 0.
fn reserve_fallback_keys(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    let name = "CONNECT_ERRORS";
    let map = ebpf.map_mut(name).ok_or(LoadError::Map(name, "not in object".into()))?;
    let mut errors: HashMap<&mut MapData, ErrKey, i64> =
        HashMap::try_from(map).map_err(|e| LoadError::Map(name, error_chain(&e)))?;
    for errno in [timewait_common::EADDRINUSE, timewait_common::EADDRNOTAVAIL] {
        errors.insert(ErrKey::fallback(errno), 0, 0).map_err(|e| LoadError::Map(name, error_chain(&e)))?;
    }
    Ok(())
}

/// Default capacity of the minisocket table: every minisocket the kernel can
/// hold (`tcp_max_tw_buckets`, which bounds TIME_WAIT and FIN_WAIT2 ones
/// together) plus room for kills awaiting resolution.
fn default_tracked() -> u32 {
    let buckets = procfs::sysctl("net.ipv4.tcp_max_tw_buckets")
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or(262_144);
    buckets.saturating_add(16_384).clamp(1024, 1 << 22)
}

/// Remotes per SYN table: half the gauge tables' (SYNs come from fewer keys).
pub fn syn_capacity(max_series: u32) -> u32 {
    (max_series / 2).max(1024)
}

pub fn load(opts: &LoadOptions) -> Result<Probes, LoadError> {
    let btf_rs = offsets::load_btf()?;
    let mut offsets = offsets::offsets(&btf_rs)?;
    if opts.attribute_cgroups {
        (offsets.sk_cgrp_data, offsets.cgroup_kn, offsets.kernfs_node_id) = offsets::cgroup_offsets(&btf_rs)?;
    }
    let tw_state_params = offsets::param_count(&btf_rs, "tcp_timewait_state_process");
    let nat_config = opts.nat_drops.then(|| super::nat_drops::nat_config(&btf_rs));
    // Parsed BTF is tens of MB: one at a time (aya parses its own below), so
    // that the daemon's memory peak at start-up is one parse, not two.
    drop(btf_rs);
    let netns = procfs::own_netns()?;
    let functions = offsets::timer_functions()?;
    let port_range = procfs::local_port_range().unwrap_or((0, 0));
    let config = Config {
        offsets,
        tw_timer_handler: functions.tw_timer_handler,
        netns: if opts.all_netns { 0 } else { netns },
        port_lo: port_range.0,
        port_hi: port_range.1,
        cgroups: u32::from(opts.attribute_cgroups),
        head_fast: u32::from(
            [offsets.skc_daddr, offsets.skc_rcv_saddr, offsets.skc_hash, offsets.skc_dport, offsets.skc_num, offsets.skc_family, offsets.skc_state]
                == timewait_common::SockHead::OFFSETS,
        ),
    };
    debug!(?config, "kernel configuration");
    let tracked = opts.max_tracked_sockets.unwrap_or_else(default_tracked);
    let btf = Btf::from_sys_fs().map_err(|e| LoadError::Kernel(KernelError::Btf(e.to_string())))?;
    let nat_global = nat_config.as_ref().and_then(|c| c.as_ref().ok()).map(|(nat, _)| *nat);
    let mut loader = EbpfLoader::new();
    if let Some(nat) = &nat_global {
        loader.override_global("NAT_CONFIG", nat, true);
    }
    let mut ebpf = loader
        .btf(Some(&btf))
        .override_global("CONFIG", &config, true)
        .map_max_entries("TW_SOCKS", tracked)
        .map_max_entries("TW_INDEX", tracked)
        .map_max_entries("COUNTS_0", opts.max_series)
        .map_max_entries("COUNTS_1", opts.max_series)
        .map_max_entries("SYNS_0", syn_capacity(opts.max_series))
        .map_max_entries("SYNS_1", syn_capacity(opts.max_series))
        .load(OBJECT)
        .map_err(|e| LoadError::Load(error_chain(&e)))?;

    // Before any program runs: the reserved keys that what no longer fits
    // in CONNECT_ERRORS is counted under (comm="other").
    reserve_fallback_keys(&mut ebpf)?;
    let mut hooks = Vec::new();
    // 0. Full sockets: listeners (so every minisocket followed from step 2
    //    on gets its direction), active opens, closes; then the snapshot of
    //    existing ones.
    let sockets = paths::sockets(&mut ebpf, &btf, opts.probe_path)?;
    // bind() errors: part of the fentry hooks; on the tracepoint path only a
    // syscall tracepoint has them, and attaching any sends every system call
    // of every task through the slow path, so only when asked.
    let bind_errors = bind_errors(&mut ebpf, &sockets, opts.syscall_tracepoints);
    load_iters(&mut ebpf, &btf, &[paths::LISTENERS_WALK])?;
    run_iter(&mut ebpf, paths::LISTENERS_WALK)?;
    // 2. Minisockets: their lifecycle and segments, each on the path that
    //    attaches, then the snapshot of those that already exist. The
    //    snapshot inserts with BPF_NOEXIST: no double count.
    let lifecycle = paths::lifecycle(&mut ebpf, &btf, opts.probe_path, sockets.path)?;
    let segments = paths::segments(
        &mut ebpf,
        &btf,
        lifecycle.path,
        opts.probe_path,
        tw_state_params,
    )?;
    // NAT allocation failures: independent of the rest, only when asked.
    let (nat_failures, nat) = match nat_config {
        Some(c) => {
            let (sp, maps) = super::nat_drops::attach(&mut ebpf, &btf, c.map(|(_, hook_slow)| hook_slow));
            (Some(sp), maps)
        }
        None => (None, None),
    };
    for sp in [&sockets, &bind_errors, &lifecycle, &segments].into_iter().chain(nat_failures.as_ref()) {
        // One series per hook: segments and NAT failures share kfree_skb.
        for h in &sp.hooks {
            if !hooks.iter().any(|(seen, _)| seen == h) {
                hooks.push((h.clone(), true));
            }
        }
        info!(signal = sp.signal, path = sp.path.as_str(), hooks = %sp.hooks.join(", "), "attached");
        if !sp.refused.is_empty() {
            debug!(signal = sp.signal, refused = %sp.refused.join("; "), "paths not taken");
        }
    }
    // The minisocket walks of the lifecycle's path, and only they: those of
    // the other path are never loaded.
    let walks = paths::walks(lifecycle.path);
    load_iters(&mut ebpf, &btf, &[walks.timewait, walks.reconcile])?;
    run_iter(&mut ebpf, walks.timewait)?;
    if opts.all_netns {
        // A TCP iterator walks the namespace of whoever creates it: visit the
        // others from this thread, then come back.
        for ns in other_namespaces(netns) {
            if let Err(e) = in_netns(&ns, || {
                run_iter(&mut ebpf, paths::LISTENERS_WALK)?;
                run_iter(&mut ebpf, walks.timewait)
            }) {
                tracing::warn!(netns = %ns.display(), error = %e, "start-up snapshot of this namespace skipped");
            }
        }
    }
    hooks.push(("iter/tcp".to_string(), true));

    let programs = ebpf
        .programs()
        .filter_map(|(name, p)| {
            use std::os::fd::AsFd as _;
            let fd = p.fd().ok()?.as_fd().try_clone_to_owned().ok()?;
            Some((name.to_string(), fd))
        })
        .collect();
    let probes = Probes {
        programs,
        tw_socks: take(&mut ebpf, "TW_SOCKS")?,
        conns: take(&mut ebpf, "CONNS")?,
        tw_index: take(&mut ebpf, "TW_INDEX")?,
        counters: take(&mut ebpf, "COUNTERS")?,
        counts: [take(&mut ebpf, "COUNTS_0")?, take(&mut ebpf, "COUNTS_1")?],
        syns: [take(&mut ebpf, "SYNS_0")?, take(&mut ebpf, "SYNS_1")?],
        epoch: take(&mut ebpf, "EPOCH")?,
        all_netns: opts.all_netns.then_some(netns),
        attribute_cgroups: opts.attribute_cgroups,
        lifetime: take(&mut ebpf, "LIFETIME")?,
        connect_errors: take(&mut ebpf, "CONNECT_ERRORS")?,
        ebpf: Some(ebpf),
        walks,
        hooks,
        signals: [sockets, bind_errors, lifecycle, segments].into_iter().chain(nat_failures).collect(),
        nat,
    };
    info!(
        netns = if opts.all_netns { "all".to_string() } else { netns.to_string() },
        tracked_capacity = tracked,
        "eBPF programs attached and start-up snapshot loaded"
    );
    Ok(probes)
}
