//! The running kernel as /proc shows it: sysctls, netstat counters, the port range, the release, our namespace.
//!
//! And tracefs, mounted at /sys/kernel/tracing when nothing mounted it.

use std::{fs, os::unix::fs::MetadataExt as _, path::Path};

use super::offsets::KernelError;

/// Inode number of this process's network namespace.
pub fn own_netns() -> Result<u32, KernelError> {
    let path = "/proc/self/ns/net";
    let md = fs::metadata(path).map_err(|err| KernelError::Read { path: path.into(), err })?;
    Ok(md.ino() as u32)
}

/// A sysctl of this process's network namespace, as text.
pub fn sysctl(name: &str) -> Option<String> {
    let path = Path::new("/proc/sys").join(name.replace('.', "/"));
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// Where tracefs lives, mounting it at /sys/kernel/tracing when it is not
/// mounted anywhere (aya attaches classic tracepoints through it). Under
/// `ip netns exec` the mount stays in the daemon's own mount namespace.
pub fn ensure_tracefs() -> Result<&'static str, String> {
    const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
    // A tracefs we may not read (mode 0700, no CAP_DAC_READ_SEARCH) is still
    // mounted: say so at attach time rather than try to mount it again.
    let mounted = |p: &str| match fs::metadata(Path::new(p).join("events")) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::PermissionDenied,
    };
    if let Some(p) = CANDIDATES.into_iter().find(|p| mounted(p)) {
        return Ok(p);
    }
    let target = CANDIDATES[0];
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (src, dst, fstype) = (c("tracefs"), c(target), c("tracefs"));
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(format!("tracefs is not mounted and mounting it at {target} failed: {}", std::io::Error::last_os_error()));
    }
    Ok(target)
}

/// `net.ipv4.ip_local_port_range` of this process's namespace: (low, high).
pub fn local_port_range() -> Option<(u16, u16)> {
    let s = sysctl("net.ipv4.ip_local_port_range")?;
    let mut it = s.split_whitespace().map(|v| v.parse::<u16>());
    let (Some(Ok(lo)), Some(Ok(hi))) = (it.next(), it.next()) else { return None };
    (lo <= hi).then_some((lo, hi))
}

/// `net.ipv4.ip_local_port_range` as a number of ports (per namespace: read
/// through this process's /proc/sys/net).
pub fn local_port_range_size() -> Option<u64> {
    let s = sysctl("net.ipv4.ip_local_port_range")?;
    let mut it = s.split_whitespace().map(|v| v.parse::<u64>());
    let (Some(Ok(lo)), Some(Ok(hi))) = (it.next(), it.next()) else { return None };
    hi.checked_sub(lo).map(|d| d + 1)
}

/// A counter of this namespace's /proc/net/netstat, e.g. ("TcpExt", "TW").
pub fn netstat(group: &str, name: &str) -> Option<u64> {
    parse_netstat(&fs::read_to_string("/proc/self/net/netstat").ok()?, group, name)
}

fn parse_netstat(text: &str, group: &str, name: &str) -> Option<u64> {
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let (names, values) = (lines.next()?, lines.next()?);
    let idx = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(idx)?.parse().ok()
}

/// `uname -r`.
pub fn release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netstat_parsing() {
        let t = "TcpExt: SyncookiesSent TW TCPTimeWaitOverflow\nTcpExt: 0 17 40\nIpExt: InNoRoutes\nIpExt: 3\n";
        assert_eq!(parse_netstat(t, "TcpExt", "TCPTimeWaitOverflow"), Some(40));
        assert_eq!(parse_netstat(t, "TcpExt", "TW"), Some(17));
        assert_eq!(parse_netstat(t, "IpExt", "InNoRoutes"), Some(3));
        assert_eq!(parse_netstat(t, "TcpExt", "Nope"), None);
        assert!(netstat("TcpExt", "TW").is_some(), "this machine's /proc/net/netstat");
    }
}
