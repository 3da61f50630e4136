//! Fuzz target: `dtf::protocol::fuzzing::frames` (see that module).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dtf::protocol::fuzzing::frames(data));
