//! Statistics (percentiles, formatting) and the BPF programs' own run statistics.

#[allow(clippy::wildcard_imports)]
use super::*;

pub(super) fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let k = ((p / 100.0 * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[k - 1]
}

pub(super) fn ms(v: f64) -> String {
    if v < 1.0 {
        format!("{v:.3} ms")
    } else if v < 10.0 {
        format!("{v:.2} ms")
    } else if v < 100.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.0} ms")
    }
}

pub(super) fn p50_p99(v: &[f64]) -> String {
    format!("p50 {} / p99 {}", ms(pct(v, 50.0)), ms(pct(v, 99.0)))
}

pub(super) fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// (program name, run_time_ns, run_cnt).
pub(super) type ProgStats = Vec<(String, u64, u64)>;

/// Restores kernel.bpf_stats_enabled on drop.
pub(super) struct BpfStats(String);

impl BpfStats {
    pub(super) fn enable() -> Result<Self> {
        let prev = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")?.trim().to_string();
        std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")?;
        Ok(BpfStats(prev))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", &self.0) {
            eprintln!("bench: cannot restore kernel.bpf_stats_enabled={}: {e}", self.0);
        }
    }
}

/// Ids of the BPF programs `pid` holds a file descriptor to (from
/// /proc/PID/fdinfo: this bpftool is built without its `pids` feature).
pub(super) fn prog_ids(pid: u32) -> Result<Vec<u64>> {
    let mut ids = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))?.flatten() {
        let Ok(info) = std::fs::read_to_string(e.path()) else { continue };
        if let Some(id) = info.lines().find_map(|l| l.strip_prefix("prog_id:")).and_then(|v| v.trim().parse().ok()) {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// (name, run_time_ns, run_cnt) of the programs held by `pid`.
pub(super) fn prog_stats(pid: u32) -> Result<ProgStats> {
    let ids = prog_ids(pid)?;
    let out = Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .context("bpftool (apt-get install bpftool)")?;
    if !out.status.success() {
        bail!("bpftool prog show failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool JSON")?;
    let mut res = Vec::new();
    for p in v.as_array().context("bpftool: not an array")? {
        let by_pid = p["pids"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["pid"].as_u64() == Some(u64::from(pid))));
        let by_fd = p["id"].as_u64().is_some_and(|id| ids.contains(&id));
        if !(by_pid || by_fd) {
            continue;
        }
        res.push((
            p["name"].as_str().unwrap_or("?").to_string(),
            p["run_time_ns"].as_u64().unwrap_or(0),
            p["run_cnt"].as_u64().unwrap_or(0),
        ));
    }
    res.sort();
    Ok(res)
}
