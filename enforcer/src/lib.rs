//! The agent traffic enforcer: policy model and compile step, the XDP data plane's loader
//! and map writer, the daemon and its CLI.
//!
//! A folder per role; what every role uses lives at the top, so no module reaches back up
//! into a role's own:
//! - [`dataplane`]: the eBPF program's loader, its maps, and the compile step that turns a
//!   policy into their entries;
//! - [`node`]: the daemon that runs on each edge server, with its local API, configuration,
//!   audit trail, metrics and systemd integration;
//! - [`controlplane`]: the gRPC server that signs and pushes policy bundles, and the node's
//!   client that receives them;
//! - [`inspect`]: the inspecting TLS proxy and its kernel-TLS hand-off;
//! - [`dns`]: the per-agent resolver behind host-name rules;
//! - [`cli`]: what only the command line uses (the demo and its tables);
//! - at the top: the [`policy`] model, [`error`] helpers, [`durable`] file replacement, and
//!   the network-namespace [`lab`] the demo, tests and benchmarks share.

pub mod cli;
pub mod controlplane;
pub mod dataplane;
pub mod dns;
pub mod durable;
pub mod error;
pub mod inspect;
pub mod lab;
pub mod node;
pub mod policy;
