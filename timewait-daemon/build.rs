//! Builds the eBPF object (crate `timewait-ebpf`) with aya-build, so that a
//! plain `cargo build` of the daemon embeds up-to-date kernel code; and
//! names the commit it is built from (`timewaitd --version`).
use std::process::Command;

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// The commit of the checkout (`TIMEWAIT_COMMIT` when set, e.g. for a build
/// outside git; `unknown` without either).
fn commit() -> String {
    println!("cargo:rerun-if-env-changed=TIMEWAIT_COMMIT");
    if let Ok(c) = std::env::var("TIMEWAIT_COMMIT")
        && !c.trim().is_empty()
    {
        return c.trim().to_string();
    }
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|s| !s.is_empty())
    };
    // A new commit or checkout moves HEAD or appends to its log.
    for path in ["HEAD", "logs/HEAD"] {
        if let Some(p) = git(&["rev-parse", "--git-path", path]) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_string())
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rustc-env=TIMEWAIT_COMMIT={}", commit());
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "timewait-ebpf")
        .ok_or_else(|| anyhow!("timewait-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("timewait-ebpf has no directory"))?;
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context("building the eBPF object (needs the nightly toolchain with rust-src and bpf-linker: run `cargo xtask setup`)")
}
