//! The comparison benchmark's sections and what they share (see `bench/README.md`).

pub mod accuracy;
pub mod bed;
pub mod common;
pub mod fleet;
pub mod generator;
pub mod inkernel;
pub mod inspect;
pub mod live;
pub mod report;
pub mod scale;
pub mod tcp;
pub mod xdpfilter;
