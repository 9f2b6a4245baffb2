//! What only the command line uses: `enforcer demo` ([`demo`]) and the tables it prints
//! ([`table`]). The commands themselves are
//! in `main.rs`, as clients of the daemon's API ([`crate::node::api`]) or, with no daemon,
//! readers of the pinned maps ([`crate::dataplane`]).

pub mod demo;
pub mod table;
