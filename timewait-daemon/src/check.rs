//! `timewaitd check`: one line per requirement, ok or missing and what to do.

use std::process::ExitCode;

use crate::{kernel, loader};

struct Line {
    what: String,
    ok: bool,
    detail: String,
}

fn line(what: impl Into<String>, ok: bool, detail: impl Into<String>) -> Line {
    Line { what: what.into(), ok, detail: detail.into() }
}


pub fn main() -> ExitCode {
    let mut lines = vec![line("kernel", true, kernel::release())];
    match kernel::load_btf() {
        Ok(btf) => {
            lines.push(line("btf", true, kernel::VMLINUX_BTF));
            match kernel::offsets(&btf) {
                Ok(o) => lines.push(line("struct offsets", true, format!("tw_timer at {}, tw_substate at {}", o.tw_timer, o.tw_substate))),
                Err(e) => lines.push(line("struct offsets", false, e.to_string())),
            }
            // The loader's own tables: every tp_btf hook it attaches needs its
            // btf_trace_<name> type in the kernel's BTF.
            let tracepoints = std::iter::once(loader::LISTEN_PROGRAM).chain(loader::TIMER_PROGRAMS.iter().copied());
            for (_, tp) in tracepoints {
                let ok = btf.resolve_ids_by_name(&format!("btf_trace_{tp}")).is_ok_and(|v| !v.is_empty());
                lines.push(line(
                    format!("tp_btf/{tp}"),
                    ok,
                    if ok { "available" } else { "missing: this kernel does not offer the tracepoint" },
                ));
            }
            let iter = btf.resolve_ids_by_name("bpf_iter__tcp").is_ok_and(|v| !v.is_empty());
            lines.push(line("iter/tcp", iter, if iter { "available (start-up snapshot)" } else { "missing: needs Linux 5.9+" }));
        }
        Err(e) => lines.push(line("btf", false, e.to_string())),
    }
    match kernel::timer_functions() {
        Ok(f) => {
            lines.push(line("tw_timer_handler", true, format!("{:#x}", f.tw_timer_handler)));
            let ok = f.reqsk_timer_handler != 0;
            lines.push(line(
                "reqsk_timer_handler",
                ok,
                if ok { format!("{:#x}", f.reqsk_timer_handler) } else { "missing: SYN reuse would read reason=\"other\"".into() },
            ));
        }
        Err(e) => lines.push(line("tw_timer_handler", false, e.to_string())),
    }
    for (_, category, tp) in loader::SYSCALL_PROGRAMS {
        let ok = std::path::Path::new(&format!("/sys/kernel/tracing/events/{category}/{tp}")).exists()
            || std::path::Path::new(&format!("/sys/kernel/debug/tracing/events/{category}/{tp}")).exists();
        lines.push(line(
            format!("tracepoint/{category}/{tp}"),
            ok,
            if ok { "available" } else { "missing: needs tracefs and CONFIG_FTRACE_SYSCALLS (reused_by_connect reads other, connect errors are not counted)" },
        ));
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    lines.push(line(
        "privileges",
        euid == 0,
        if euid == 0 { "root".to_string() } else { format!("uid {euid}: run as root, or grant CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN") },
    ));
    for s in ["net.ipv4.tcp_max_tw_buckets", "net.ipv4.ip_local_port_range", "net.ipv4.tcp_tw_reuse", "net.ipv4.tcp_fin_timeout"] {
        let v = kernel::sysctl(s);
        lines.push(line(s, v.is_some(), v.unwrap_or_else(|| "unreadable".into()).replace('\t', " ")));
    }
    let width = lines.iter().map(|l| l.what.len()).max().unwrap_or(0);
    let mut out = String::new();
    for l in &lines {
        out.push_str(&format!("{:<width$}  {:<7}  {}\n", l.what, if l.ok { "ok" } else { "missing" }, l.detail));
    }
    let all_ok = lines.iter().all(|l| l.ok);
    out.push_str(if all_ok { "timewaitd can run here\n" } else { "timewaitd cannot run here: fix the lines marked missing\n" });
    if crate::snapshot::print_out(&out) != ExitCode::SUCCESS {
        return ExitCode::from(2);
    }
    if all_ok { ExitCode::SUCCESS } else { ExitCode::from(1) }
}
