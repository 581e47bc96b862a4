//! Which way into the kernel serves each signal, decided by trying to load and attach, never by version number.
//!
//! This is the table of the README's "Kernels" section:
//!
//! | signal | fentry path | kprobe fallback | tracepoint path |
//! | --- | --- | --- | --- |
//! | lifecycle: creation, re-arm, kill, expiry | fentry on `inet_twsk_deschedule_put`, `tw_timer_handler`, `__inet_twsk_schedule` | kprobes on the same functions | `tp_btf/inet_sock_set_state` (creation from the full socket's close, takeovers from the next connection's start), `timer_expire_entry` |
//! | segments: SYN verdicts, segment kinds, reset kills | fentry + fexit on `tcp_timewait_state_process` | kprobe + kretprobe on it | `tp_btf/kfree_skb` with `rx_sk` (6.11+) |
//! | nat_failures (`--nat`): packets NAT found no port for, per destination | - | - | `tp_btf/kfree_skb` with `reason` (5.18+) and `struct nf_conn` in BTF (`nat_drops`) |
//!
//! Per function of the lifecycle, fentry first, then a kprobe. The tracepoint
//! lifecycle is one state machine over the timer events, so it is taken
//! whole, when any lifecycle function can be had neither way; what the
//! `inet_sock_set_state` program serves is told by `ROLES`. The start-up
//! snapshot and the reconciliation walk minisockets with the iterators of
//! the lifecycle's path (`walks`). Segments follow
//! the lifecycle's path; where none of their hooks attaches they are
//! reported unavailable (never as zeros).

use aya::{
    Btf, Ebpf,
    maps::{Array, MapData},
    programs::{BtfTracePoint, FEntry, FExit, KProbe, Program},
};
use timewait_common::{ROLE_LIFECYCLE, ROLE_SOCKETS};

use super::{LoadError, error_chain};

/// What `--probe-path` asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbePath {
    /// fentry where it attaches, else kprobes, else tracepoints.
    #[default]
    Auto,
    /// fentry/fexit only; fail when they do not attach.
    Fentry,
    /// kprobes only; fail when they do not attach.
    Kprobe,
    /// tracepoints only (what kernels that lock fentry and kprobes away get).
    Tracepoint,
}

impl ProbePath {
    fn allows(self, p: Path) -> bool {
        match self {
            ProbePath::Auto => true,
            ProbePath::Fentry => p == Path::Fentry,
            ProbePath::Kprobe => p == Path::Kprobe,
            ProbePath::Tracepoint => p == Path::Tracepoint,
        }
    }
}

/// The path that serves a signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    Fentry,
    Kprobe,
    Tracepoint,
    Unavailable,
    /// Left off by the configuration (bind() errors without `--syscall-tracepoints`).
    Off,
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Fentry => "fentry",
            Path::Kprobe => "kprobe",
            Path::Tracepoint => "tracepoint",
            Path::Unavailable => "unavailable",
            Path::Off => "off",
        }
    }
}

/// How one signal is served, and what did not attach on the way there.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SignalPath {
    pub signal: &'static str,
    pub path: Path,
    /// The attached hooks, e.g. `fentry/__inet_twsk_schedule`.
    pub hooks: Vec<String>,
    /// Why the preferred paths were not taken (one entry per refusal).
    pub refused: Vec<String>,
}

pub const LIFECYCLE: &str = "lifecycle";
pub const SEGMENTS: &str = "segments";
pub const SOCKETS: &str = "sockets";
pub const BIND_ERRORS: &str = "bind_errors";
/// Present only when NAT is asked for (`kernel::nat_drops`).
pub const NAT_FAILURES: &str = "nat_failures";
/// Why bind() errors are not counted on the tracepoint path by default.
pub const BIND_ERRORS_OFF: &str = "--syscall-tracepoints turns it on (syscalls/sys_enter_bind and sys_exit_bind; any syscall tracepoint \
     makes every system call of every process slower: +50 ns measured)";

/// The fentry hooks of the sockets signal (`timewait-ebpf/src/fentry/sockets.rs`):
/// (program, kernel function, fexit). Those that forget come first: a
/// socket that gets an entry (active open, listener) while the hook that
/// removes it is not attached yet would keep a stale entry, and a later
/// socket at the same address would inherit it (a connection the daemon's
/// own readiness probes opened during start-up once made an accepted
/// connection's minisocket read outbound).
const SOCKET_HOOKS: &[(&str, &str, bool)] = &[
    ("fentry_put_port", "inet_put_port", false),
    ("fentry_listen_stop", "inet_csk_listen_stop", false),
    ("fentry_inet_hash", "inet_hash", false),
    ("fentry_inet6_hash", "inet6_hash", false),
    ("fexit_hash_connect", "inet_hash_connect", true),
    ("fexit_hash6_connect", "inet6_hash_connect", true),
    ("fexit_inet_bind", "inet_bind", true),
    ("fexit_inet6_bind", "inet6_bind", true),
];

/// Attaches the full-socket hooks (listeners, active opens, the close that
/// gives a minisocket its direction): fentry on the functions where these
/// change, taken whole, else the `inet_sock_set_state` tracepoint (every
/// state change of every socket, which also tells active opens and
/// connect() failures: `timewait-ebpf/src/connect.rs`). The
/// tracepoint is the fallback whatever `--probe-path` says: it is what every
/// kernel of the matrix offers.
pub fn sockets(ebpf: &mut Ebpf, btf: &Btf, want: ProbePath) -> Result<SignalPath, LoadError> {
    let mut sp = SignalPath { signal: SOCKETS, path: Path::Fentry, hooks: Vec::new(), refused: Vec::new() };
    if want.allows(Path::Fentry) && want != ProbePath::Kprobe {
        let mut attached = Vec::new();
        for (program, function, exit) in SOCKET_HOOKS {
            match fentry(ebpf, btf, program, function, *exit) {
                Ok(()) => {
                    attached.push(*program);
                    sp.hooks.push(format!("{}/{function}", if *exit { "fexit" } else { "fentry" }));
                }
                Err(e) => {
                    sp.refused.push(format!("{}/{function}: {e}", if *exit { "fexit" } else { "fentry" }));
                    break;
                }
            }
        }
        if attached.len() == SOCKET_HOOKS.len() {
            return Ok(sp);
        }
        for program in attached {
            unload(ebpf, program);
        }
        sp.hooks.clear();
    }
    add_roles(ebpf, ROLE_SOCKETS)?;
    let (program, tp) = LISTEN_PROGRAM;
    tp_btf(ebpf, btf, program, tp).map_err(|err| LoadError::Program { program, step: "attach", err })?;
    sp.hooks.push(format!("tp_btf/{tp}"));
    sp.path = Path::Tracepoint;
    Ok(sp)
}

/// Adds `bits` to `ROLES[0]`: what the `inet_sock_set_state` program serves.
fn add_roles(ebpf: &mut Ebpf, bits: u32) -> Result<(), LoadError> {
    let map = ebpf.map_mut("ROLES").ok_or(LoadError::Map("ROLES", "not in object".into()))?;
    let mut roles: Array<&mut MapData, u32> =
        Array::try_from(map).map_err(|e| LoadError::Map("ROLES", super::error_chain(&e)))?;
    let now = roles.get(&0, 0).unwrap_or(0);
    roles.set(0, now | bits, 0).map_err(|e| LoadError::Map("ROLES", super::error_chain(&e)))
}

/// A kernel function of the fast path and its two programs.
struct Function {
    kernel: &'static str,
    fentry: &'static str,
    kprobe: &'static str,
}

/// Kill and expiry first, creation last: from then on every new minisocket is
/// followed to its end.
const LIFECYCLE_FUNCTIONS: [Function; 3] = [
    Function { kernel: "inet_twsk_deschedule_put", fentry: "fentry_twsk_deschedule_put", kprobe: "kprobe_twsk_deschedule_put" },
    Function { kernel: "tw_timer_handler", fentry: "fentry_tw_timer_handler", kprobe: "kprobe_tw_timer_handler" },
    Function { kernel: "__inet_twsk_schedule", fentry: "fentry_twsk_schedule", kprobe: "kprobe_twsk_schedule" },
];

/// The tracepoint program that serves listeners (and the tracepoint lifecycle).
pub const LISTEN_PROGRAM: (&str, &str) = ("tw_sock_set_state", "inet_sock_set_state");
/// Tracepoint lifecycle: the expiry (program, tracepoint); creation and
/// takeovers are `inet_sock_set_state`'s (`ROLE_LIFECYCLE`), turned on after it.
/// The timer tracepoints that fire for every timer armed or stopped
/// (`timer_init`, `timer_start`, `timer_cancel`) are not used.
pub const TIMER_PROGRAMS: &[(&str, &str)] = &[("tw_timer_expire", "timer_expire_entry")];
const KFREE_SKB: (&str, &str) = ("tw_kfree_skb", "kfree_skb");

const STATE_PROCESS: &str = "tcp_timewait_state_process";

/// One line of a load error: the syscall's answer and, for a verifier
/// rejection, the verifier's verdict (the last line of its log that is not a
/// statistic). The whole log goes to the debug log.
fn short(err: String) -> String {
    // What the usual refusals mean, for `check`'s readers.
    let hint = if err.contains("kprobe/type") {
        " (this kernel has no kprobes: CONFIG_KPROBES)"
    } else if err.contains("Operation not permitted") {
        " (kernel lockdown, or missing CAP_BPF + CAP_PERFMON)"
    } else {
        ""
    };
    let Some((head, log)) = err.split_once("Verifier output:") else {
        return format!("{err}{hint}");
    };
    tracing::debug!(verifier = %log, "verifier log");
    let verdict = log
        .lines()
        .map(str::trim)
        .rfind(|l| {
            !l.is_empty()
                && !l.starts_with("verification time")
                && !l.starts_with("stack depth")
                && !l.starts_with("processed ")
                && !l.starts_with(':')
        })
        .unwrap_or("");
    let head = head.trim_end().trim_end_matches('.');
    if verdict.is_empty() { format!("{head}{hint}") } else { format!("{head}: verifier: {verdict}") }
}

fn not_found(program: &'static str) -> String {
    format!("program {program} not in the object")
}

/// Loads and attaches an fentry (`exit` false) or fexit program; unloads it
/// again when the attach fails, so nothing is left behind.
fn fentry(ebpf: &mut Ebpf, btf: &Btf, program: &'static str, function: &str, exit: bool) -> Result<(), String> {
    let p = ebpf.program_mut(program).ok_or_else(|| not_found(program))?;
    let r = if exit {
        let p: &mut FExit = p.try_into().map_err(|e| error_chain(&e))?;
        p.load(function, btf).and_then(|()| p.attach().map(drop)).inspect_err(|_| {
            let _ = p.unload();
        })
    } else {
        let p: &mut FEntry = p.try_into().map_err(|e| error_chain(&e))?;
        p.load(function, btf).and_then(|()| p.attach().map(drop)).inspect_err(|_| {
            let _ = p.unload();
        })
    };
    r.map_err(|e| short(error_chain(&e)))
}

fn kprobe(ebpf: &mut Ebpf, program: &'static str, function: &str) -> Result<(), String> {
    let p: &mut KProbe =
        ebpf.program_mut(program).ok_or_else(|| not_found(program))?.try_into().map_err(|e| error_chain(&e))?;
    p.load().and_then(|()| p.attach(function, 0).map(drop)).inspect_err(|_| {
        let _ = p.unload();
    }).map_err(|e| short(error_chain(&e)))
}

pub fn tp_btf(ebpf: &mut Ebpf, btf: &Btf, program: &'static str, tracepoint: &str) -> Result<(), String> {
    let p: &mut BtfTracePoint =
        ebpf.program_mut(program).ok_or_else(|| not_found(program))?.try_into().map_err(|e| error_chain(&e))?;
    p.load(tracepoint, btf).and_then(|()| p.attach().map(drop)).inspect_err(|_| {
        let _ = p.unload();
    }).map_err(|e| short(error_chain(&e)))
}

/// Unloads (and so detaches) a program attached earlier.
fn unload(ebpf: &mut Ebpf, program: &str) {
    let r = match ebpf.program_mut(program) {
        Some(Program::FEntry(p)) => p.unload(),
        Some(Program::FExit(p)) => p.unload(),
        Some(Program::KProbe(p)) => p.unload(),
        Some(Program::BtfTracePoint(p)) => p.unload(),
        _ => Ok(()),
    };
    if let Err(e) = r {
        tracing::warn!(program, error = %error_chain(&e), "could not unload");
    }
}

/// Attaches the lifecycle hooks: per function fentry, then a kprobe; the
/// tracepoint lifecycle when a function can be had neither way (`sockets`:
/// the path of the sockets signal, whose `inet_sock_set_state` program it
/// shares).
pub fn lifecycle(ebpf: &mut Ebpf, btf: &Btf, want: ProbePath, sockets: Path) -> Result<SignalPath, LoadError> {
    let mut sp = SignalPath { signal: LIFECYCLE, path: Path::Fentry, hooks: Vec::new(), refused: Vec::new() };
    let mut attached: Vec<&'static str> = Vec::new();
    let mut complete = want != ProbePath::Tracepoint;
    for f in LIFECYCLE_FUNCTIONS.iter().filter(|_| want != ProbePath::Tracepoint) {
        let mut got = None;
        if want.allows(Path::Fentry) {
            match fentry(ebpf, btf, f.fentry, f.kernel, false) {
                Ok(()) => got = Some((Path::Fentry, f.fentry)),
                Err(e) => sp.refused.push(format!("fentry/{}: {e}", f.kernel)),
            }
        }
        if got.is_none() && want.allows(Path::Kprobe) {
            match kprobe(ebpf, f.kprobe, f.kernel) {
                Ok(()) => got = Some((Path::Kprobe, f.kprobe)),
                Err(e) => sp.refused.push(format!("kprobe/{}: {e}", f.kernel)),
            }
        }
        let Some((path, program)) = got else {
            complete = false;
            break;
        };
        if path == Path::Kprobe {
            sp.path = Path::Kprobe;
        }
        attached.push(program);
        sp.hooks.push(format!("{}/{}", path.as_str(), f.kernel));
    }
    if complete {
        return Ok(sp);
    }
    for program in attached {
        unload(ebpf, program);
    }
    sp.hooks.clear();
    if !want.allows(Path::Tracepoint) {
        return Err(refused(want, &sp));
    }
    // The expiry first, creation last: from then on every new minisocket is
    // followed to its end.
    for (program, tp) in TIMER_PROGRAMS {
        tp_btf(ebpf, btf, program, tp)
            .map_err(|err| LoadError::Program { program, step: "attach", err })?;
        sp.hooks.push(format!("tp_btf/{tp}"));
    }
    add_roles(ebpf, ROLE_LIFECYCLE)?;
    let (program, tp) = LISTEN_PROGRAM;
    if sockets != Path::Tracepoint {
        // Full sockets are followed by fentry: the program serves only this.
        tp_btf(ebpf, btf, program, tp).map_err(|err| LoadError::Program { program, step: "attach", err })?;
    }
    sp.hooks.insert(0, format!("tp_btf/{tp}"));
    sp.path = Path::Tracepoint;
    Ok(sp)
}

/// The socket iterators that walk minisockets for a lifecycle path
/// (`timewait-ebpf/src/iter.rs`): each pair follows what it finds as that
/// lifecycle's programs do, so the fentry and kprobe lifecycle's reference
/// no map only the tracepoint lifecycle uses. Only this pair is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walks {
    /// The start-up snapshot of existing minisockets.
    pub timewait: &'static str,
    /// A reconciliation walk: listeners, connections and minisockets.
    pub reconcile: &'static str,
}

/// The iterator that walks listeners and our connections, on either path.
pub const LISTENERS_WALK: &str = "iter_listeners";

/// The minisocket walks of the lifecycle attached on `lifecycle`.
pub fn walks(lifecycle: Path) -> Walks {
    if lifecycle == Path::Tracepoint {
        Walks { timewait: "iter_timewait_tp", reconcile: "iter_reconcile_tp" }
    } else {
        Walks { timewait: "iter_timewait", reconcile: "iter_reconcile" }
    }
}

fn refused(want: ProbePath, sp: &SignalPath) -> LoadError {
    LoadError::Path(format!(
        "--probe-path {}: {} cannot be served that way here: {}",
        want.as_str(),
        sp.signal,
        sp.refused.join("; ")
    ))
}

impl ProbePath {
    pub fn as_str(self) -> &'static str {
        match self {
            ProbePath::Auto => "auto",
            ProbePath::Fentry => "fentry",
            ProbePath::Kprobe => "kprobe",
            ProbePath::Tracepoint => "tracepoint",
        }
    }
}

/// Attaches the segment hooks on the lifecycle's path. `params` is the
/// parameter count of `tcp_timewait_state_process` in the kernel's BTF.
pub fn segments(
    ebpf: &mut Ebpf,
    btf: &Btf,
    lifecycle: Path,
    want: ProbePath,
    params: Option<usize>,
) -> Result<SignalPath, LoadError> {
    let mut sp = SignalPath { signal: SEGMENTS, path: Path::Unavailable, hooks: Vec::new(), refused: Vec::new() };
    if lifecycle == Path::Tracepoint {
        let (program, tp) = KFREE_SKB;
        match tp_btf(ebpf, btf, program, tp) {
            Ok(()) => {
                sp.path = Path::Tracepoint;
                sp.hooks.push(format!("tp_btf/{tp}"));
            }
            Err(e) => sp.refused.push(format!(
                "tp_btf/{tp}: {e} (before 6.11 kfree_skb has no rx_sk: SYN verdicts, segment kinds and reset \
                 reasons need fentry or kprobes, and a FIN_WAIT2 -> TIME_WAIT change can be missed)"
            )),
        }
    } else {
        if want.allows(Path::Fentry) {
            let exit = match params {
                Some(3) => Ok("fexit_tw_state_process_3"),
                Some(4) => Ok("fexit_tw_state_process_4"),
                Some(5) => Ok("fexit_tw_state_process_5"),
                other => Err(format!("{STATE_PROCESS} has {other:?} parameters in BTF; known: 3, 4, 5")),
            };
            let r = exit.and_then(|exit| {
                fentry(ebpf, btf, "fentry_tw_state_process", STATE_PROCESS, false)?;
                fentry(ebpf, btf, exit, STATE_PROCESS, true).inspect_err(|_| unload(ebpf, "fentry_tw_state_process"))
            });
            match r {
                Ok(()) => {
                    sp.path = Path::Fentry;
                    sp.hooks.push(format!("fentry/{STATE_PROCESS}"));
                    sp.hooks.push(format!("fexit/{STATE_PROCESS}"));
                }
                Err(e) => sp.refused.push(format!("fentry/{STATE_PROCESS}: {e}")),
            }
        }
        if sp.path == Path::Unavailable && want.allows(Path::Kprobe) {
            let r = kprobe(ebpf, "kprobe_tw_state_process", STATE_PROCESS).and_then(|()| {
                kprobe(ebpf, "kretprobe_tw_state_process", STATE_PROCESS)
                    .inspect_err(|_| unload(ebpf, "kprobe_tw_state_process"))
            });
            match r {
                Ok(()) => {
                    sp.path = Path::Kprobe;
                    sp.hooks.push(format!("kprobe/{STATE_PROCESS}"));
                    sp.hooks.push(format!("kretprobe/{STATE_PROCESS}"));
                }
                Err(e) => sp.refused.push(format!("kprobe/{STATE_PROCESS}: {e}")),
            }
        }
    }
    if sp.path == Path::Unavailable && want != ProbePath::Auto && want != ProbePath::Tracepoint {
        return Err(refused(want, &sp));
    }
    if sp.path == Path::Unavailable {
        tracing::warn!(refused = %sp.refused.join("; "), "segments unavailable: SYN verdicts and segment kinds are not exported");
    }
    Ok(sp)
}

#[cfg(test)]
mod tests {
    #[test]
    fn short_keeps_the_verdict() {
        let e = "the BPF_PROG_LOAD syscall returned Permission denied (os error 13). Verifier output: reg type \
                 unsupported for arg#0\n0: R1=ctx\n267: (79) r1 = *(u64 *)(r0 +0)\nR0 unbounded memory access\n\
                 verification time 27996 usec\nstack depth 120\n: Permission denied (os error 13)";
        assert_eq!(
            super::short(e.to_string()),
            "the BPF_PROG_LOAD syscall returned Permission denied (os error 13): verifier: R0 unbounded memory access"
        );
        assert_eq!(super::short("no such file".into()), "no such file");
    }

    #[test]
    fn each_lifecycle_walks_with_its_own_iterators() {
        use super::{Path, walks};
        for path in [Path::Fentry, Path::Kprobe] {
            assert_eq!((walks(path).timewait, walks(path).reconcile), ("iter_timewait", "iter_reconcile"));
        }
        let tp = walks(Path::Tracepoint);
        assert_eq!((tp.timewait, tp.reconcile), ("iter_timewait_tp", "iter_reconcile_tp"));
    }
}
