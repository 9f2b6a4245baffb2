//! The agent traffic enforcer: policy model and compile step, the XDP data plane's loader
//! and map writer, the daemon and its CLI.

pub mod api;
pub mod audit;
pub mod bundle;
pub mod certs;
pub mod compile;
pub mod config;
pub mod controlplane;
pub mod daemon;
pub mod dataplane;
pub mod demo;
pub mod dns;
pub mod inspect;
pub mod ktls;
pub mod lab;
pub mod metrics;
pub mod netlink;
pub mod notify;
pub mod policy;
pub mod proto;
pub mod stats;
pub mod sync;
pub mod table;
pub mod testrun;
pub mod verifier;
