//! Real etcd clusters for the control-plane tests. The harness lives in the enforcer
//! crate's lab ([`enforcer::lab::etcd`]) so the fleet benchmark starts etcd the same way;
//! this re-export keeps the tests' `integration_tests::etcd::...` paths.

pub use enforcer::lab::etcd::*;
