//! The package test (`cargo xtask test --kernel deb`, part of `all`): the
//! .deb of `cargo xtask deb` installed on a real Debian system and driven
//! through systemd.
//!
//! The system: Debian bookworm made with `debootstrap` (the mirror of the
//! machine's own apt sources) with Debian's 6.1 kernel and its initramfs
//! installed in it (`linux-image-amd64`), written into an ext4 disk image
//! with `mke2fs -d` (no loop mount), cached in `~/.cache/timewait-vm/debtest`.
//! Each run boots a copy under qemu (TCG, no network device), systemd as
//! PID 1; a oneshot unit of the image mounts a second disk holding the
//! package and [`GUEST_SCRIPT`] and runs it. The script prints `DEBTEST ok`,
//! `DEBTEST fail` and `DEBTEST info` lines on the serial console, which the
//! host reads; `DEBTEST done` ends it and the guest powers off.
//!
//! The NAT side is checked both ways: under the unit as shipped it is
//! unavailable (no CAP_NET_ADMIN); with the package's example drop-in
//! (`/usr/share/doc/timewaitd/examples/nat.conf`) installed, the guest's own
//! namespace masquerades UDP between two namespaces the script makes onto 8
//! ports, and the service must show what `conntrack -L` and `conntrack -S`
//! show. All of it stays inside the guest, which has no network device.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cmd::{render, sh},
    part::PartResult,
};

/// The suite of the system the package is installed on.
const SUITE: &str = "bookworm";
/// What debootstrap adds to minbase: an init, the kernel and its initramfs,
/// device events, and the tools the script uses (iptables and conntrack for
/// the NAT side: a masquerading router inside the guest, and its oracle).
const INCLUDE: &str = "systemd-sysv,udev,linux-image-amd64,curl,iproute2,bpftool,procps,kmod,iptables,conntrack";
/// Bump when the image recipe changes: a new cache folder is made.
const IMAGE_VERSION: u32 = 2;
/// Size of the root disk image (sparse).
const IMAGE_SIZE: &str = "3G";
/// Boot, install, checks, power-off: about 3 minutes under TCG here.
const TIME_LIMIT: Duration = Duration::from_secs(900);

/// The oneshot unit of the image that runs the test script of the run.
const TEST_UNIT: &str = "[Unit]
Description=timewait package test (xtask/src/debtest.rs)
Requires=dev-vdb.device
After=dev-vdb.device basic.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'mkdir -p /mnt/payload && mount -o ro /dev/vdb /mnt/payload && exec /bin/sh /mnt/payload/run.sh'
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
";

/// What runs inside, as root, from the payload disk.
const GUEST_SCRIPT: &str = include_str!("debtest.sh");

/// The cached image: root disk, kernel and initramfs.
struct Image {
    disk: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
}

/// Runs the package test: builds the package, makes (or finds) the image,
/// boots it and counts the checks.
pub fn test_package(deb: &Path) -> PartResult {
    let name = "deb (bookworm, systemd, Debian 6.1)";
    match run(deb) {
        Ok((passed, failed, problem)) => PartResult { name: name.into(), passed, failed, problem, retried: false },
        Err(e) => PartResult { name: name.into(), passed: 0, failed: 1, problem: Some(format!("{e:#}")), retried: false },
    }
}

fn run(deb: &Path) -> Result<(u64, u64, Option<String>)> {
    let cache = crate::vm::cache_dir()?.join("debtest");
    let image = ensure_image(&cache)?;
    let run = cache.join(format!("run-{}", std::process::id()));
    fs::create_dir_all(&run)?;
    let _cleanup = RemoveOnDrop(run.clone());
    // A copy of the root disk per run (sparse: a second or two), and the
    // payload disk: the package and the script.
    let disk = run.join("root.raw");
    sh(Command::new("cp").arg("--sparse=always").arg(&image.disk).arg(&disk))?;
    let payload = run.join("payload");
    fs::create_dir_all(&payload)?;
    let deb_name = deb.file_name().context("package path")?;
    fs::copy(deb, payload.join(deb_name)).with_context(|| format!("copy {}", deb.display()))?;
    fs::write(payload.join("run.sh"), GUEST_SCRIPT)?;
    let payload_disk = run.join("payload.raw");
    sh(Command::new("mke2fs").args(["-q", "-t", "ext4", "-F", "-d"]).arg(&payload).arg(&payload_disk).arg("256M"))?;
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-smp", "2", "-m", "2048", "-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .args(["-append", "root=/dev/vda rw console=ttyS0 rcupdate.rcu_cpu_stall_timeout=120 systemd.show_status=0"])
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=raw", disk.display()))
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=raw", payload_disk.display()));
    eprintln!("xtask: [deb] booting Debian {SUITE} with systemd (time limit {} s)", TIME_LIMIT.as_secs());
    eprintln!("xtask: [deb] $ {}", render(&qemu));
    let started = Instant::now();
    let mut child = qemu.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().context("cannot start qemu")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (mut passed, mut failed, mut done) = (0u64, 0u64, false);
    let mut problem = None;
    let mut fails = Vec::new();
    loop {
        let left = TIME_LIMIT.saturating_sub(started.elapsed());
        if left.is_zero() {
            problem = Some(format!("time limit of {} s reached", TIME_LIMIT.as_secs()));
            break;
        }
        match rx.recv_timeout(left.min(Duration::from_secs(5))) {
            Ok(line) => {
                let line = line.trim_end_matches('\r');
                eprintln!("[deb] {line}");
                if let Some(at) = line.find("DEBTEST ") {
                    let msg = &line[at + "DEBTEST ".len()..];
                    if msg.starts_with("ok ") {
                        passed += 1;
                    } else if let Some(what) = msg.strip_prefix("fail ") {
                        failed += 1;
                        fails.push(what.to_string());
                    } else if msg.starts_with("done") {
                        done = true;
                    }
                }
                if line.contains("Kernel panic") {
                    problem = Some(format!("kernel panic: {line}"));
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(st) = child.try_wait()? {
                    if !done {
                        problem = Some(format!("qemu exited ({st}) before the script's end"));
                    }
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // The script powers the guest off after `done`; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait()?.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    if !done && problem.is_none() {
        problem = Some("the guest ended without the script's end".into());
    }
    if problem.is_some() && failed == 0 {
        failed = 1;
    }
    if !fails.is_empty() {
        eprintln!("xtask: [deb] failed checks: {}", fails.join("; "));
    }
    eprintln!("xtask: [deb] {passed} checks passed, {failed} failed in {:.0} s", started.elapsed().as_secs_f64());
    Ok((passed, failed, problem))
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The cached image, made when missing (debootstrap: a few minutes, once).
fn ensure_image(cache: &Path) -> Result<Image> {
    let dir = cache.join(format!("{SUITE}-v{IMAGE_VERSION}"));
    let image = Image { disk: dir.join("root.raw"), kernel: dir.join("vmlinuz"), initrd: dir.join("initrd.img") };
    if image.disk.exists() && image.kernel.exists() && image.initrd.exists() {
        return Ok(image);
    }
    if !crate::setup::is_root() {
        bail!("making the Debian image needs root (debootstrap)");
    }
    let missing: Vec<&str> = [("debootstrap", "debootstrap"), ("mke2fs", "e2fsprogs"), ("qemu-system-x86_64", "qemu-system-x86")]
        .into_iter()
        .filter(|(cmd, _)| {
            Command::new("sh").args(["-c", &format!("command -v {cmd}")]).stdout(Stdio::null()).status().is_ok_and(|s| !s.success())
        })
        .map(|(_, pkg)| pkg)
        .collect();
    if !missing.is_empty() {
        eprintln!("xtask: installing {missing:?}");
        sh(Command::new("apt-get").args(["update", "-qq"]))?;
        sh(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let mirror = crate::vm::release_mirror().context("no Debian mirror in the machine's apt sources for debootstrap")?;
    let work = cache.join(format!("build-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(work.clone());
    let rootfs = work.join("rootfs");
    fs::create_dir_all(&rootfs)?;
    eprintln!("xtask: [deb] making a Debian {SUITE} system with debootstrap from {mirror} (a few minutes, once; cached in {})", dir.display());
    sh(Command::new("debootstrap")
        .args(["--variant=minbase", &format!("--include={INCLUDE}"), SUITE])
        .arg(&rootfs)
        .arg(&mirror)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    configure(&rootfs)?;
    let boot = rootfs.join("boot");
    let find = |prefix: &str| -> Result<PathBuf> {
        let mut found: Vec<PathBuf> = fs::read_dir(&boot)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
            .collect();
        found.sort();
        found.pop().with_context(|| format!("no {prefix}* in {}", boot.display()))
    };
    let (kernel, initrd) = (find("vmlinuz-")?, find("initrd.img-")?);
    let tmp = work.join("image");
    fs::create_dir_all(&tmp)?;
    fs::copy(&kernel, tmp.join("vmlinuz"))?;
    fs::copy(&initrd, tmp.join("initrd.img"))?;
    sh(Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-F", "-L", "twroot", "-d"])
        .arg(&rootfs)
        .arg(tmp.join("root.raw"))
        .arg(IMAGE_SIZE))?;
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(cache)?;
    fs::rename(&tmp, &dir).with_context(|| format!("move the image to {}", dir.display()))?;
    Ok(image)
}

/// What the image needs beyond debootstrap: a root file system entry, a
/// host name, no timers that would run apt at boot (and hold its lock), and
/// the test unit, enabled.
fn configure(root: &Path) -> Result<()> {
    fs::write(root.join("etc/fstab"), "/dev/vda / ext4 rw,errors=remount-ro 0 1\n")?;
    fs::write(root.join("etc/hostname"), "timewait-debtest\n")?;
    let units = root.join("etc/systemd/system");
    fs::create_dir_all(units.join("multi-user.target.wants"))?;
    for timer in ["apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer"] {
        let link = units.join(timer);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink("/dev/null", &link)?;
    }
    fs::write(units.join("timewait-debtest.service"), TEST_UNIT)?;
    let wants = units.join("multi-user.target.wants/timewait-debtest.service");
    let _ = fs::remove_file(&wants);
    std::os::unix::fs::symlink("/etc/systemd/system/timewait-debtest.service", wants)?;
    Ok(())
}
