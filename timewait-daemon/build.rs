//! Builds the eBPF object (crate `timewait-ebpf`) with aya-build, so that a
//! plain `cargo build` of the daemon embeds up-to-date kernel code.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
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
