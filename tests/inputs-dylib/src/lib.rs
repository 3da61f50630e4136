//! A Rust `dylib`: a test binary linked to it loads it (and `libstd-*.so`) at start-up.

/// The answer the fixture checks.
pub fn answer() -> u32 {
    42
}
