//! Links the XDP object with bpf-linker for BPF ISA v3.
//!
//! v3 is needed for the 64-bit compare-and-swap of the rate limiter (BPF_ATOMIC with
//! BPF_CMPXCHG, Linux 5.12) and gives 32-bit ALU and jumps that shorten the hot path.

use which::which;

fn main() {
    // bpf-linker is not a cargo dependency, so tell cargo to rebuild when it changes.
    let bpf_linker = which("bpf-linker").expect(
        "bpf-linker not found on PATH: run `cargo xtask setup` (it builds bpf-linker against LLVM 22)",
    );
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
    println!("cargo:rustc-link-arg=--cpu-features=+alu32");
}
