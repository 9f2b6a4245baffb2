//! Builds the XDP object (`enforcer-ebpf`) with aya-build so `include_bytes_aligned!` can
//! embed it in the daemon, and generates the policy-sync gRPC code from
//! `proto/enforcer/v1/sync.proto` into `OUT_DIR` (never committed).

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    compile_protos()?;

    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("reading cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "enforcer-ebpf")
        .ok_or_else(|| anyhow!("enforcer-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("enforcer-ebpf manifest has no parent directory"))?;
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    // aya-build passes every line the inner cargo prints on to cargo as a warning: on a
    // fresh build, one "Compiling" line per crate of core's build. Quiet, that cargo prints
    // only what matters (compiler diagnostics and errors), which still reach the warnings.
    // SAFETY: the build script is single-threaded here; nothing reads the environment
    // concurrently.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf([package], Toolchain::default()).context("building the XDP program")
}

/// Generates the gRPC messages, client and server. `protoc` comes from the
/// `protoc-bin-vendored` crate, so a fresh machine needs no system package; `PROTOC` in the
/// environment still wins, for platforms that crate does not ship a binary for.
fn compile_protos() -> anyhow::Result<()> {
    const PROTO: &str = "proto/enforcer/v1/sync.proto";
    let mut config = tonic_prost_build::Config::new();
    match std::env::var_os("PROTOC") {
        Some(protoc) => config.protoc_executable(protoc),
        None => config.protoc_executable(
            protoc_bin_vendored::protoc_bin_path().context("locating the vendored protoc")?,
        ),
    };
    // Sorted maps: labels print and compare the same way every time.
    config.btree_map(["."]);
    println!("cargo:rerun-if-env-changed=PROTOC");
    // The other rerun-if lines of this script turn cargo's default (rerun on any change in
    // the package) off: without this one an edited .proto is not compiled again.
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &[PROTO], &["proto"])
        .with_context(|| format!("compiling {PROTO}"))
}
