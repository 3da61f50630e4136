//! The same tests at isolation level `env`: one network, one /tmp and one process table for all
//! of them, so they collide (the helper they start is caught and reported as leaked). Run with
//! `cargo test -p ports --features contrast --test ports_env`.

include!("common/cases.rs");

cases!("env");

dtf::main!();
