//! Scenario 8: what the daemon costs a system call that has nothing to do
//! with TCP. Enabling any syscall tracepoint sends every system call of every
//! task through the kernel's slow path; the daemon attaches none unless
//! `--syscall-tracepoints` asks (bind() errors on the tracepoint path).
//! `dd if=/dev/zero of=/dev/null bs=1` (a read and a write per byte) in a
//! namespace: without the daemon, with it, and with it and
//! `--syscall-tracepoints`, in rotating order; nanoseconds per system call.

#[allow(clippy::wildcard_imports)]
use super::*;

/// The variants, in the order of the first round.
const VARIANTS: [(&str, Option<&[&str]>); 3] =
    [("without daemon", None), ("with daemon", Some(&[])), ("with daemon --syscall-tracepoints", Some(&["--syscall-tracepoints"]))];

/// Wall time of `dd bs=1 count=bytes` in `ns`, per system call.
fn dd(ns: &Netns, bytes: usize) -> Result<f64> {
    let t0 = Instant::now();
    let out = ns
        .command("dd")
        .args(["if=/dev/zero", "of=/dev/null", "bs=1", &format!("count={bytes}")])
        .stdin(Stdio::null())
        .output()
        .context("cannot start dd")?;
    let took = t0.elapsed();
    if !out.status.success() {
        bail!("dd failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(took.as_nanos() as f64 / (2 * bytes) as f64)
}

pub(super) fn syscalls(ctx: &Ctx, rep: &mut Report) -> Result<()> {
    const S: &str = "8 system calls";
    let z = &ctx.sizes;
    progress(format!(
        "scenario 8: dd bs=1 count={} ({} system calls) x {} rounds: without the daemon, with it, with --syscall-tracepoints",
        z.dd_bytes,
        2 * z.dd_bytes,
        z.dd_rounds
    ));
    let ns = Netns::new("sys")?;
    let mut per: [Vec<f64>; 3] = Default::default();
    for round in 0..z.dd_rounds {
        for k in 0..VARIANTS.len() {
            let i = (k + round) % VARIANTS.len();
            let (name, extra) = VARIANTS[i];
            let daemon = match extra {
                Some(extra) => Some(start_daemon_with(ctx, &ns, &format!("sys{round}{i}"), extra)?.0),
                None => None,
            };
            let ns_per_call = dd(&ns, z.dd_bytes)?;
            drop(daemon);
            progress(format!("  round {round}: {name}: {ns_per_call:.1} ns per system call"));
            per[i].push(ns_per_call);
        }
    }
    let median: Vec<f64> = per.iter().map(|v| pct(v, 50.0)).collect();
    for ((name, _), (m, runs)) in VARIANTS.iter().zip(median.iter().zip(&per)) {
        let runs = runs.iter().map(|r| format!("{r:.1}")).collect::<Vec<_>>().join(", ");
        rep.row(S, format!("ns per system call, {name} (median; runs)"), format!("{m:.1} ({runs})"), "", None);
    }
    let ratio = median[0] / median[1];
    rep.row(
        S,
        "system call rate with the daemon / without (median)",
        format!("{ratio:.3}"),
        ">= 0.99",
        Some(ratio >= 0.99),
    );
    rep.row(
        S,
        "added by --syscall-tracepoints (median, ns per call)",
        format!("{:.1} (rate ratio {:.3})", median[2] - median[1], median[1] / median[2]),
        "",
        None,
    );
    Ok(())
}
