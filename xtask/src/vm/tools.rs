//! Installs what the guests need, once, into the cache: qemu (Debian
//! package, only when missing), a virtme-ng venv, a static busybox and the
//! kernel images, each extracted from its .deb.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, bail};

use super::{GuestKernel, Suite, cache_dir};
use crate::{cmd::sh, setup};

/// virtme-ng from PyPI. 1.42 is the release measured to boot Debian's
/// kernels here (shared/KERNEL-NOTES.md); move it only after booting all three.
const VIRTME_NG: &str = "1.42";
/// The host's Debian sources, read for the mirrors the bullseye configuration uses.
const HOST_SOURCES: &str = "/etc/apt/sources.list.d/debian.sources";
const HOST_SOURCES_LIST: &str = "/etc/apt/sources.list";
const DEFAULT_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// The private bullseye package lists are fetched again after this long.
const BULLSEYE_LISTS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// A kernel ready to boot, and the tools that boot it.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub guest: &'static GuestKernel,
    /// The Debian package, e.g. `linux-image-6.1.0-57-amd64`.
    pub package: String,
    /// What `uname -r` says inside, e.g. `6.1.0-57-amd64`.
    pub release: String,
    /// `.../boot/vmlinuz-RELEASE` (its modules are in `.../lib/modules/RELEASE`).
    pub image: PathBuf,
    pub vng: PathBuf,
    pub busybox: PathBuf,
    pub cache: PathBuf,
}

/// Installs (or finds in the cache) qemu, virtme-ng, busybox and these kernels.
pub fn ensure_tools(kernels: &[&'static GuestKernel]) -> Result<Vec<Kernel>> {
    let cache = cache_dir()?;
    fs::create_dir_all(&cache).with_context(|| format!("cannot create {}", cache.display()))?;
    ensure_qemu()?;
    let vng = ensure_virtme_ng(&cache)?;
    let busybox = ensure_busybox(&cache)?;
    let mut ready = Vec::new();
    for &gk in kernels {
        let (package, release, image) = ensure_kernel(&cache, gk)?;
        ready.push(Kernel { guest: gk, package, release, image, vng: vng.clone(), busybox: busybox.clone(), cache: cache.clone() });
    }
    Ok(ready)
}

fn have(cmd: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")]).status().is_ok_and(|s| s.success())
}

fn ensure_qemu() -> Result<()> {
    if have("qemu-system-x86_64") {
        return Ok(());
    }
    if !setup::is_root() {
        bail!("qemu-system-x86_64 is missing: install it (apt-get install qemu-system-x86)");
    }
    eprintln!("xtask: installing qemu-system-x86 (boots the test kernels; a minute or two)");
    sh(Command::new("apt-get").args(["update", "-qq"]))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends", "qemu-system-x86"])
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// A venv in the cache with virtme-ng pinned; returns the path of `vng`.
fn ensure_virtme_ng(cache: &Path) -> Result<PathBuf> {
    let venv = cache.join("venv");
    let marker = venv.join(format!(".virtme-ng-{VIRTME_NG}"));
    let vng = venv.join("bin/vng");
    if marker.exists() && vng.exists() {
        return Ok(vng);
    }
    eprintln!("xtask: installing virtme-ng {VIRTME_NG} into {}", venv.display());
    if venv.exists() {
        fs::remove_dir_all(&venv).with_context(|| format!("cannot remove {}", venv.display()))?;
    }
    sh(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    sh(Command::new(venv.join("bin/pip")).args(["install", "--quiet", &format!("virtme-ng=={VIRTME_NG}")]))?;
    fs::write(&marker, "")?;
    Ok(vng)
}

/// busybox-static's binary, extracted from the package of the machine's sources.
fn ensure_busybox(cache: &Path) -> Result<PathBuf> {
    let dir = cache.join("busybox");
    let bin = dir.join("bin/busybox");
    if bin.exists() {
        return Ok(bin);
    }
    eprintln!("xtask: downloading busybox-static (virtme-ng's guest init uses it)");
    let deb = download(cache, &Apt::host(), "busybox-static")?;
    extract(&deb, &dir)?;
    if !bin.exists() {
        bail!("{} has no bin/busybox", deb.display());
    }
    Ok(bin)
}

/// Returns (package, release, image) of the newest image of this series,
/// downloading and extracting it when the cache does not have it.
fn ensure_kernel(cache: &Path, gk: &GuestKernel) -> Result<(String, String, PathBuf)> {
    let apt = match gk.suite {
        Suite::Host => Apt::host(),
        Suite::Bullseye => Apt::bullseye(cache)?,
    };
    let package = match newest_image(&apt, gk) {
        Ok(p) => p,
        Err(e) => match cached_image(cache, gk) {
            // Offline, or the lists are gone: a kernel of the series that is
            // already here still tests that series.
            Some(p) => {
                eprintln!("xtask: warning: kernel {}: {e:#}; using {p} from the cache", gk.name);
                p
            }
            None => return Err(e),
        },
    };
    let dir = cache.join("kernels").join(&package);
    if find_image(&dir).is_err() {
        eprintln!("xtask: downloading kernel {} ({package})", gk.name);
        let deb = download(cache, &apt, &package)?;
        eprintln!("xtask: extracting kernel {} into {}", gk.name, dir.display());
        extract(&deb, &dir)?;
        fs::remove_file(&deb).ok();
    }
    let (release, image) = find_image(&dir)?;
    Ok((package, release, image))
}

/// The package the series' metapackage depends on, e.g. `linux-image-amd64`
/// -> `linux-image-6.1.0-57-amd64`: the newest generic image the sources have.
fn newest_image(apt: &Apt, gk: &GuestKernel) -> Result<String> {
    let find = || -> Option<String> {
        let out = apt.command("apt-cache").args(["depends", gk.metapackage]).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .map(str::trim)
            .find(|p| p.starts_with(gk.prefix) && p.ends_with("-amd64") && !p.contains("-cloud-") && !p.contains("-rt-"))
            .map(str::to_string)
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    // The machine's lists may be missing (a fresh image): fetch them once.
    if apt.suite == Suite::Host && setup::is_root() {
        sh(Command::new("apt-get").args(["update", "-qq"]))?;
        if let Some(p) = find() {
            return Ok(p);
        }
    }
    bail!("{} does not depend on a generic {}*-amd64 image in the {:?} sources", gk.metapackage, gk.prefix, apt.suite)
}

/// The newest image of this series already extracted in the cache.
fn cached_image(cache: &Path, gk: &GuestKernel) -> Option<String> {
    let mut names: Vec<String> = fs::read_dir(cache.join("kernels"))
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(gk.prefix))
        .collect();
    names.sort_by(|a, b| version_cmp(a, b));
    names.pop()
}

/// Compares version-like strings number by number (6.1.0-9 < 6.1.0-50).
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let nums = |s: &str| -> Vec<u64> { s.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect() };
    nums(a).cmp(&nums(b))
}

/// `boot/vmlinuz-RELEASE` inside an extracted image package.
fn find_image(dir: &Path) -> Result<(String, PathBuf)> {
    let boot = dir.join("boot");
    let entries = fs::read_dir(&boot).with_context(|| format!("no kernel image in {}", boot.display()))?;
    for e in entries {
        let name = e?.file_name().to_string_lossy().into_owned();
        if let Some(release) = name.strip_prefix("vmlinuz-") {
            if !dir.join("lib/modules").join(release).exists() {
                bail!("{} has no lib/modules/{release}", dir.display());
            }
            return Ok((release.to_string(), boot.join(&name)));
        }
    }
    bail!("no vmlinuz-* in {}", boot.display())
}

/// `apt-get download PACKAGE` into the cache; returns the .deb.
fn download(cache: &Path, apt: &Apt, package: &str) -> Result<PathBuf> {
    let debs = cache.join("debs");
    fs::create_dir_all(&debs)?;
    sh(apt.command("apt-get").args(["download", "-qq", package]).current_dir(&debs))?;
    let prefix = format!("{package}_");
    let mut found: Vec<PathBuf> = fs::read_dir(&debs)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    found.sort();
    found.pop().with_context(|| format!("apt-get download {package} left no {prefix}*.deb in {}", debs.display()))
}

/// `dpkg-deb -x` into a temporary folder, renamed into place when complete,
/// so that an interrupted run never leaves a half-extracted kernel.
fn extract(deb: &Path, dir: &Path) -> Result<()> {
    let tmp = dir.with_extension("partial");
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::create_dir_all(&tmp)?;
    sh(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tmp))?;
    fs::rename(&tmp, dir).with_context(|| format!("cannot move {} to {}", tmp.display(), dir.display()))
}

/// apt-get / apt-cache with the options of one suite.
struct Apt {
    suite: Suite,
    options: Vec<String>,
}

impl Apt {
    fn host() -> Self {
        Self { suite: Suite::Host, options: Vec::new() }
    }

    /// A separate apt configuration for Debian 11 in the cache: its own source
    /// list, package lists and cache, so that the machine's apt is untouched.
    fn bullseye(cache: &Path) -> Result<Self> {
        let root = cache.join("apt-bullseye");
        let lists = root.join("lists");
        let sources = root.join("sources.list");
        fs::create_dir_all(lists.join("partial"))?;
        fs::create_dir_all(root.join("cache/archives/partial"))?;
        fs::write(&sources, bullseye_sources()?)?;
        let apt = Self {
            suite: Suite::Bullseye,
            options: vec![
                format!("Dir::Etc::SourceList={}", sources.display()),
                "Dir::Etc::SourceParts=/dev/null".into(),
                format!("Dir::State::Lists={}", lists.display()),
                format!("Dir::Cache={}", root.join("cache").display()),
            ],
        };
        if lists_age(&lists).is_none_or(|age| age > BULLSEYE_LISTS_MAX_AGE) {
            eprintln!("xtask: fetching Debian 11 (bullseye) package lists into {}", lists.display());
            if let Err(e) = sh(apt.command("apt-get").args(["update", "-qq"])) {
                // Stale lists still name a kernel; no lists at all is checked later.
                eprintln!("xtask: warning: {e:#}");
            }
        }
        Ok(apt)
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        for o in &self.options {
            c.arg("-o").arg(o);
        }
        c
    }
}

/// How long ago the newest `*_Packages*` file in `lists` was fetched.
fn lists_age(lists: &Path) -> Option<Duration> {
    fs::read_dir(lists)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("_Packages"))
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max()
        .map(|t| SystemTime::now().duration_since(t).unwrap_or_default())
}

/// (URI, suite, keyring) of one `deb` source.
type Mirror = (String, String, String);

/// One-line sources for bullseye and bullseye-security, on the mirrors that
/// the machine's own sources use for its release and its security updates.
fn bullseye_sources() -> Result<String> {
    let mut mirrors = Vec::new();
    if let Ok(text) = fs::read_to_string(HOST_SOURCES) {
        mirrors.extend(deb822_mirrors(&text));
    }
    if let Ok(text) = fs::read_to_string(HOST_SOURCES_LIST) {
        mirrors.extend(one_line_mirrors(&text));
    }
    bullseye_lines(&mirrors)
        .with_context(|| format!("no Debian mirror found in {HOST_SOURCES} or {HOST_SOURCES_LIST} to fetch bullseye from"))
}

/// The URI of the machine's own Debian release suite (`bookworm`, no
/// `-security` or `-updates`): the mirror debootstrap takes.
pub fn release_mirror() -> Option<String> {
    let mut mirrors = Vec::new();
    if let Ok(text) = fs::read_to_string(HOST_SOURCES) {
        mirrors.extend(deb822_mirrors(&text));
    }
    if let Ok(text) = fs::read_to_string(HOST_SOURCES_LIST) {
        mirrors.extend(one_line_mirrors(&text));
    }
    mirrors.into_iter().find(|(_, suite, _)| !suite.contains('-')).map(|(uri, ..)| uri)
}

/// Maps the release suite (`bookworm`) to `bullseye` and its security suite
/// to `bullseye-security`, on the same URIs; other suites are dropped.
fn bullseye_lines(mirrors: &[Mirror]) -> Option<String> {
    let mut lines = Vec::new();
    for (uri, suite, keyring) in mirrors {
        let target = if suite.ends_with("-security") {
            "bullseye-security"
        } else if !suite.contains('-') {
            "bullseye"
        } else {
            continue; // -updates, -backports: no kernels the matrix wants
        };
        let line = format!("deb [signed-by={keyring}] {uri} {target} main\n");
        if !lines.contains(&line) {
            lines.push(line);
        }
    }
    lines.iter().any(|l| l.contains(" bullseye main")).then(|| lines.concat())
}

/// The `deb` sources of a deb822 `.sources` file.
fn deb822_mirrors(text: &str) -> Vec<Mirror> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(|v| v.trim().to_string())
        };
        if !field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb")) {
            continue;
        }
        let (Some(uris), Some(suites)) = (field("URIs"), field("Suites")) else { continue };
        let keyring = field("Signed-By").filter(|k| k.starts_with('/')).unwrap_or_else(|| DEFAULT_KEYRING.into());
        for uri in uris.split_whitespace() {
            for suite in suites.split_whitespace() {
                out.push((uri.to_string(), suite.to_string(), keyring.clone()));
            }
        }
    }
    out
}

/// The `deb` lines of a one-line `sources.list`.
fn one_line_mirrors(text: &str) -> Vec<Mirror> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb ") else { continue };
        // `deb [option=value ...] URI SUITE COMPONENTS`
        let rest = match rest.trim_start().strip_prefix('[') {
            Some(opts) => opts.split_once(']').map_or("", |(_, r)| r),
            None => rest,
        };
        let mut words = rest.split_whitespace();
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            out.push((uri.to_string(), suite.to_string(), DEFAULT_KEYRING.to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCES: &str = "Types: deb
# a comment
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
";

    #[test]
    fn bullseye_follows_the_host_mirrors() {
        let lines = bullseye_lines(&deb822_mirrors(SOURCES)).unwrap();
        assert_eq!(
            lines,
            format!(
                "deb [signed-by={DEFAULT_KEYRING}] http://mirror.example/debian bullseye main\n\
                 deb [signed-by={DEFAULT_KEYRING}] http://mirror.example/debian-security bullseye-security main\n"
            )
        );
    }

    #[test]
    fn one_line_sources_with_options() {
        let m = one_line_mirrors("# x\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\ndeb-src http://s bookworm main\n");
        assert_eq!(m, vec![("http://m.example/debian".into(), "bookworm".into(), DEFAULT_KEYRING.into())]);
        assert!(bullseye_lines(&[("http://m".into(), "bookworm-updates".into(), DEFAULT_KEYRING.into())]).is_none());
    }

    #[test]
    fn versions_compare_by_number() {
        assert!(version_cmp("linux-image-6.1.0-9-amd64", "linux-image-6.1.0-50-amd64").is_lt());
        assert!(version_cmp("linux-image-6.12.117+deb12-amd64", "linux-image-6.12.99+deb12-amd64").is_gt());
    }
}
