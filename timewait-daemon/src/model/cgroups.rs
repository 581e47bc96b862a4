//! Names of the cgroups (v2) that own sockets, for `--attribute-cgroups`.
//!
//! The kernel side records a cgroup's id (`kernfs_node.id`, which is the
//! inode number of its directory in the cgroup2 file system). Here an id is
//! turned into what an operator knows: the systemd unit
//! (`/system.slice/nginx.service` -> `nginx.service`), a Kubernetes pod's
//! cgroup, or else the cgroup's path. The hierarchy is found from
//! `/proc/self/mountinfo` (hybrid layouts mount it at
//! `/sys/fs/cgroup/unified`, unified ones at `/sys/fs/cgroup`); a daemon
//! started by `ip netns exec`, which remounts `/sys` and so hides it, reads
//! it through PID 1's mount namespace (`/proc/1/root`).

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Label of sockets whose owner is not known (found at start-up, or
/// attribution off in the kernel).
pub const UNKNOWN: &str = "unknown";

/// How long an id that no walk found waits before the next walk for it.
const RETRY: Duration = Duration::from_secs(10);
/// Bounds of one walk of the hierarchy.
const MAX_DEPTH: usize = 32;
const MAX_ENTRIES: usize = 200_000;

/// The cgroup2 mount: `mountinfo` lines are `id parent dev root mountpoint
/// opts ... - fstype source superopts`.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(unescape(left.split_whitespace().nth(4)?)))
    })
}

/// `mountinfo` escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x"), 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where the cgroup2 hierarchy can be read from this process.
pub fn find_root() -> Option<PathBuf> {
    if let Some(p) = std::fs::read_to_string("/proc/self/mountinfo").ok().as_deref().and_then(cgroup2_mount)
        && p.is_dir()
    {
        return Some(p);
    }
    let p = std::fs::read_to_string("/proc/1/mountinfo").ok().as_deref().and_then(cgroup2_mount)?;
    let through = Path::new("/proc/1/root").join(p.strip_prefix("/").unwrap_or(&p));
    through.is_dir().then_some(through)
}

/// What a cgroup path is shown as: the innermost systemd service, else a
/// Kubernetes pod's cgroup (its containers folded into it), else the
/// innermost scope, else the path.
pub fn label_of(path: &str) -> String {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if let Some(unit) = parts.iter().rev().find(|p| p.ends_with(".service")) {
        return (*unit).to_string();
    }
    let is_pod = |p: &&str| {
        (p.starts_with("kubepods-") && p.contains("-pod") && p.ends_with(".slice"))
            || (p.starts_with("pod") && p.len() > 3 && p[3..].chars().all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_'))
    };
    if let Some(i) = parts.iter().position(is_pod) {
        return format!("/{}", parts[..=i].join("/"));
    }
    if let Some(scope) = parts.last().filter(|p| p.ends_with(".scope")) {
        return (*scope).to_string();
    }
    format!("/{}", parts.join("/"))
}

/// Resolves ids to labels, walking the hierarchy again when an id is new
/// (at once: a label given before the walk would split its series); an id
/// no walk found is tried again after [`RETRY`], and at most
/// [`MAX_MISSING`] such ids are remembered (then forgotten all at once: a
/// churn of scopes gone before their first resolution grew the map for
/// ever). Names stay known
/// after their cgroup is gone (a TIME_WAIT outlives the process that closed
/// it by a minute), up to [`MAX_ENTRIES`].
pub struct Names {
    root: Option<PathBuf>,
    known: HashMap<u64, String>,
    /// Ids no walk found, and when the last walk for them was.
    missing: HashMap<u64, Instant>,
}

/// Ids no walk found that are remembered (a churn of scopes gone before
/// their first resolution would otherwise grow the map for ever).
const MAX_MISSING: usize = 4096;

impl Names {
    pub fn new() -> Self {
        let root = find_root();
        let mut n = Names { root, known: HashMap::new(), missing: HashMap::new() };
        n.walk();
        n
    }

    /// Whether the hierarchy was found at all.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// The label of id `id`: `unknown` for 0, `cgroup-id:N` when no walk
    /// found it.
    pub fn label(&mut self, id: u64) -> String {
        if id == 0 {
            return UNKNOWN.to_string();
        }
        if let Some(n) = self.known.get(&id) {
            return n.clone();
        }
        let retry = self.missing.get(&id).is_none_or(|at| at.elapsed() >= RETRY);
        if retry {
            self.walk();
            if let Some(n) = self.known.get(&id) {
                return n.clone();
            }
            if self.missing.len() >= MAX_MISSING {
                self.missing.clear();
            }
            self.missing.insert(id, Instant::now());
        }
        format!("cgroup-id:{id}")
    }

    fn walk(&mut self) {
        let Some(root) = self.root.clone() else { return };
        if self.known.len() > MAX_ENTRIES {
            self.known.clear();
        }
        let mut stack = vec![(root.clone(), 0usize)];
        let mut seen = 0;
        while let Some((dir, depth)) = stack.pop() {
            let Ok(meta) = std::fs::metadata(&dir) else { continue };
            let rel = dir.strip_prefix(&root).map(|p| format!("/{}", p.display())).unwrap_or_else(|_| "/".into());
            self.known.insert(meta.ino(), label_of(&rel));
            self.missing.remove(&meta.ino());
            seen += 1;
            if depth >= MAX_DEPTH || seen >= MAX_ENTRIES {
                continue;
            }
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_name_units_pods_and_paths() {
        assert_eq!(label_of("/system.slice/nginx.service"), "nginx.service");
        assert_eq!(label_of("/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service"), "foo.service");
        assert_eq!(label_of("/system.slice/nginx.service/worker"), "nginx.service");
        assert_eq!(
            label_of("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_abcd.slice/cri-containerd-99.scope"),
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_abcd.slice"
        );
        assert_eq!(label_of("/kubepods/burstable/pod5e1f-22/0a0b"), "/kubepods/burstable/pod5e1f-22");
        assert_eq!(label_of("/user.slice/user-1000.slice/session-3.scope"), "session-3.scope");
        assert_eq!(label_of("/tw-test/client-a"), "/tw-test/client-a");
        assert_eq!(label_of("/"), "/");
        assert_eq!(label_of(""), "/");
    }

    #[test]
    fn mountinfo_finds_the_unified_hierarchy() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let unified = "30 22 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(cgroup2_mount("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"), None);
        assert_eq!(unescape("/mnt/with\\040space"), "/mnt/with space");
    }

    #[test]
    fn ids_of_this_host_resolve() {
        let mut n = Names::new();
        let Some(root) = n.root().map(Path::to_path_buf) else {
            eprintln!("SKIPPED: no cgroup2 hierarchy mounted here");
            return;
        };
        let ino = std::fs::metadata(&root).unwrap().ino();
        assert_eq!(n.label(ino), "/");
        assert_eq!(n.label(0), UNKNOWN);
        assert_eq!(n.label(u64::MAX), format!("cgroup-id:{}", u64::MAX));
        // Ids no walk finds: at most MAX_MISSING remembered.
        for id in 1..(MAX_MISSING as u64 + 100) {
            let _ = n.label(u64::MAX - id);
        }
        assert!(n.missing.len() <= MAX_MISSING);
    }
}
