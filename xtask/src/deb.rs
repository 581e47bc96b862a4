//! `cargo xtask deb`: `target/debian/timewaitd_<version>-1_amd64.deb`, built
//! by cargo-deb from `[package.metadata.deb]` in timewait-daemon/Cargo.toml:
//! the binary, the systemd unit (enabled and started on install), the
//! default config `/etc/timewait/timewaitd.toml` (a conffile), a man page and
//! shell completions generated from the clap definitions
//! (`timewaitd generate-assets`), the README and the licenses.
//!
//! The package test (`systemd.rs`) installs it in a Debian system booted by
//! a real systemd.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{
    cmd::{cargo, render, sh, workspace_root},
    setup,
};

/// cargo-deb, pinned: installed with `cargo install --locked` when missing.
const CARGO_DEB: &str = "3.7.0";

/// Where the generated man page and completions go (cargo-deb's assets).
const ASSETS: &str = "target/release/deb-assets";

/// Builds the package and returns its path.
pub fn build() -> Result<PathBuf> {
    setup::toolchain()?;
    ensure_cargo_deb()?;
    // The release binary first, with the commit of this checkout in its
    // version, then what is generated from it, then the package around both.
    sh(cargo().args(["build", "--release", "--package", "timewait-daemon"]))?;
    let root = workspace_root();
    let assets = root.join(ASSETS);
    sh(Command::new(root.join("target/release/timewaitd")).arg("generate-assets").arg(&assets))?;
    // Debian ships man pages compressed (-n: no name or time in the header,
    // the same bytes for the same page).
    sh(Command::new("gzip").args(["-9nf"]).arg(assets.join("timewaitd.8")))?;
    let mut cmd = cargo();
    cmd.args(["deb", "--package", "timewait-daemon", "--no-build"]);
    eprintln!("xtask: $ {}", render(&cmd));
    let out = cmd.output().with_context(|| format!("cannot start {}", render(&cmd)))?;
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("{} failed ({})", render(&cmd), out.status);
    }
    // cargo-deb prints the path of the package it wrote.
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .context("cargo deb printed no .deb path")?;
    let path = if path.is_absolute() { path } else { root.join(path) };
    eprintln!("xtask: built {}", path.display());
    Ok(path)
}

fn ensure_cargo_deb() -> Result<()> {
    let have = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_DEB));
    if !have {
        eprintln!("xtask: installing cargo-deb {CARGO_DEB} (a minute or two)");
        sh(Command::new("cargo").args(["install", &format!("cargo-deb@{CARGO_DEB}"), "--locked", "--force"]))?;
    }
    Ok(())
}
