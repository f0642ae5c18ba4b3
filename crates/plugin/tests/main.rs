//! Every integration test of this crate in one test binary: each
//! `tests/*.rs` is one module here (`cargo test --test integration NAME`
//! filters as before, with the file name as the path prefix, `FILE::NAME`).
//! (Files that change process-wide state keep their own binary: Cargo.toml.)
//! One binary instead of one per file because each release test binary
//! costs a thin-LTO link of the whole dependency graph (~45 s on the 2-core
//! CI machine), and CI's time budget is mostly compiling. New test files
//! are added as modules below, never as new `tests/*.rs` binaries.
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

mod delegation;
mod faults;
mod hostile;
mod linux_bridge;
mod ovs_bridge;
mod protocol;
