//! Fuzz target: `dtf::protocol::fuzzing::requests` (see that module).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dtf::protocol::fuzzing::requests(data));
