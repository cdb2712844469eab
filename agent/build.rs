//! Builds the kernel programs (`agent-ebpf`) for bpfel-unknown-none and puts the
//! object in OUT_DIR, where `probes` embeds it with `include_bytes_aligned!`.
//!
//! The eBPF crate is compiled by the rustup toolchain `cargo xtask setup` links
//! (Debian's rustc-web, which ships a prebuilt `core` for the bpf target).

use std::path::Path;

use anyhow::Context as _;

/// Name of the rustup toolchain that compiles the eBPF crate; keep in sync
/// with `xtask/src/setup.rs`.
const DEFAULT_BPF_TOOLCHAIN: &str = "resptrace-bpf";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=RESPTRACE_BPF_TOOLCHAIN");
    let toolchain =
        std::env::var("RESPTRACE_BPF_TOOLCHAIN").unwrap_or_else(|_| DEFAULT_BPF_TOOLCHAIN.into());
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let ebpf_dir = Path::new(&manifest_dir).join("../agent-ebpf");
    let ebpf_dir = ebpf_dir
        .canonicalize()
        .with_context(|| format!("eBPF crate not found at {}", ebpf_dir.display()))?;
    let root_dir = ebpf_dir.to_str().context("eBPF crate path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agent-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .with_context(|| {
        format!(
            "building the eBPF programs with the rustup toolchain `{toolchain}` failed; \
             run `cargo xtask setup` first"
        )
    })
}
