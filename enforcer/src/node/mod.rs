//! The node daemon, `enforcer run`: what runs on each edge server besides the data plane it
//! loads. [`daemon`] is the main loop; around it the local control API ([`api`]), the
//! configuration file ([`config`]), the table of agent instances made from profiles
//! ([`instances`]), the hash-chained audit trail ([`audit`]), the
//! Prometheus endpoint ([`metrics`]), link events and XDP state from rtnetlink
//! ([`netlink`]) and systemd's readiness protocol ([`notify`]).

pub mod api;
pub mod audit;
pub mod config;
pub mod daemon;
pub mod guards;
pub mod instances;
pub mod metrics;
pub mod netlink;
pub mod notify;
