//! The kernel's floor under a forked test. With `DTF_BENCH_FLOOR=FILE`, a warm-up (so: in the
//! fork server, with its image, before its first fork) forks many children that do one shaped
//! test's work and nothing of dtf's, and writes what each cost to FILE
//! ([`dtf_bench_suites::fork_floor`]). One test, so the server is started.

#[dtf::warm_up]
fn measure_the_fork_floor() {
    if let Some(out) = std::env::var_os("DTF_BENCH_FLOOR") {
        let floor = dtf_bench_suites::fork_floor(15, 40);
        std::fs::write(out, floor).expect("write the floor's figures");
    }
}

#[dtf::test]
fn started() {}

dtf::main!();
