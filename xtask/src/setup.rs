//! Installs what the build and the tests need, when it is missing.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::cmd::sh;

/// bpf-linker links with rustc's own LLVM: this release pairs with the LLVM of
/// the nightly the eBPF crate is built with. They move together or not at all.
const BPF_LINKER: &str = "0.10.2";
const BPF_LINKER_LLVM_MAJOR: &str = "22";

/// Debian packages the tests use: (a command that shows it is there, package).
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ss", "iproute2"),
    ("nstat", "iproute2"),
    ("sysctl", "procps"),
    // promtool, for the alert rules' unit tests.
    ("promtool", "prometheus"),
    // TLS tests: a certificate, and a real client.
    ("openssl", "openssl"),
    ("curl", "curl"),
    // Checks that a killed daemon leaves no BPF programs or links behind.
    ("bpftool", "bpftool"),
    // `timewaitd top` is driven in a real terminal.
    ("tmux", "tmux"),
    ("script", "bsdutils"),
    // Untidy hosts (issue 12): real servers that close first, under real
    // load, and the NAT lab (a router, a capture). The tests run their own
    // nginx in their own namespace; the package's system service must not
    // start (see `test_packages`).
    ("nginx", "nginx-light"),
    ("wrk", "wrk"),
    ("iptables", "iptables"),
    ("tshark", "tshark"),
    // The NAT side (issue 27): `conntrack -L` / `-S` are the oracle of the
    // router lab's tests, `nft` writes its native nftables rules.
    ("conntrack", "conntrack"),
    ("nft", "nftables"),
    // virtme-ng runs depmod for the guest kernels' modules.
    ("depmod", "kmod"),
];

/// Debian's hook that tells maintainer scripts whether they may start a
/// service; exit 101 means "no".
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

pub fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(cmd).args(args).output().ok()?;
    o.status.success().then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn have(cmd: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")]).status().is_ok_and(|s| s.success())
}

/// Nightly with rust-src (for `-Z build-std=core`) and the matching bpf-linker.
pub fn toolchain() -> Result<()> {
    let Some(vv) = output("rustc", &["+nightly", "-vV"]) else {
        eprintln!("xtask: installing the nightly toolchain (builds the eBPF object)");
        sh(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal", "--component", "rust-src"]))?;
        return toolchain();
    };
    let llvm = vv.lines().find_map(|l| l.strip_prefix("LLVM version: ")).unwrap_or("unknown").to_string();
    if !llvm.starts_with(&format!("{BPF_LINKER_LLVM_MAJOR}.")) {
        bail!(
            "nightly rustc uses LLVM {llvm}, but bpf-linker {BPF_LINKER} links against LLVM {BPF_LINKER_LLVM_MAJOR}: \
             pin a nightly with LLVM {BPF_LINKER_LLVM_MAJOR} or move bpf-linker with it (xtask/src/setup.rs)"
        );
    }
    let sysroot = output("rustc", &["+nightly", "--print", "sysroot"]).context("rustc +nightly --print sysroot")?;
    let core_src = std::path::Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    if !core_src.exists() {
        eprintln!("xtask: installing rust-src for nightly (needed by -Z build-std=core)");
        sh(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    let linker = output("bpf-linker", &["--version"]).unwrap_or_default();
    if !linker.contains(BPF_LINKER) {
        eprintln!("xtask: installing bpf-linker {BPF_LINKER} (about a minute)");
        sh(Command::new("cargo").args(["install", &format!("bpf-linker@{BPF_LINKER}"), "--locked", "--force"]))?;
    }
    Ok(())
}

/// The Debian packages the integration tests drive.
pub fn test_packages() -> Result<()> {
    let mut missing: Vec<&str> = TEST_PACKAGES.iter().filter(|(cmd, _)| !have(cmd)).map(|(_, pkg)| *pkg).collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("missing Debian packages {missing:?}: install them (apt-get install {})", missing.join(" "));
    }
    eprintln!("xtask: installing Debian packages {missing:?}");
    sh(Command::new("apt-get").args(["update", "-qq"]))?;
    // Installing nginx-light starts the system nginx on port 80 of the host
    // (and enables it at boot): the tests need only its binary, and a stray
    // web server on a CI machine is not ours to leave. A policy-rc.d that
    // exits 101 makes the maintainer scripts skip the start; it is removed
    // afterwards unless the machine had one of its own (a container's,
    // which then already did this).
    let own_policy = !std::path::Path::new(POLICY_RC_D).exists();
    if own_policy {
        std::fs::write(POLICY_RC_D, "#!/bin/sh\n# cargo xtask: no services started while it installs test packages\nexit 101\n")
            .and_then(|()| std::fs::set_permissions(POLICY_RC_D, std::os::unix::fs::PermissionsExt::from_mode(0o755)))
            .with_context(|| format!("write {POLICY_RC_D}"))?;
    }
    let installed =
        sh(Command::new("apt-get").args(["install", "-y", "-qq"]).args(&missing).env("DEBIAN_FRONTEND", "noninteractive"));
    if own_policy {
        let _ = std::fs::remove_file(POLICY_RC_D);
        if missing.contains(&"nginx-light") && have("systemctl") {
            // Not started, but enabled for the next boot: undo that too.
            let _ = Command::new("systemctl").args(["disable", "--quiet", "nginx"]).status();
        }
    }
    installed
}
