//! The companion binary the tests run through `CARGO_BIN_EXE_dtf-inputs-fixture`.

fn main() {
    println!("companion {}", std::env::args().nth(1).unwrap_or_default());
}
