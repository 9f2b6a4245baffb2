//! Empty library target: `enforcer` declares this crate as a build dependency so cargo
//! rebuilds the XDP object when its sources change; the program itself is `src/main.rs`.
#![no_std]
