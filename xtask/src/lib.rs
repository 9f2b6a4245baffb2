//! The tasks behind `cargo xtask`, as a library so that the integration tests can run
//! `install` against a scratch root without going through cargo.
//!
//! xtask does not depend on the `enforcer` crate: it has to build on a fresh machine, before
//! `setup` has installed bpf-linker, which building `enforcer` needs.

pub mod install;
pub mod setup;
