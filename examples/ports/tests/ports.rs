//! The server's tests at isolation level `full`: every test has its own network namespace (so
//! each may bind 127.0.0.1:8080), its own /tmp, and its own PID namespace (so the helper it
//! starts dies with it). They all pass in parallel. Run with `cargo test -p ports`.

include!("common/cases.rs");

cases!("full");

dtf::main!();
