//! Compile-time parsers for the values of `timeout = "..."` and `memory = "..."`.
//!
//! Both take a decimal number (`2`, `1.5`) followed by a unit and return a whole number of the
//! smallest unit (nanoseconds, bytes). They are exact: no floating point is involved, and a value
//! that is not a whole number of the smallest unit is rejected rather than rounded.

/// The units `timeout` accepts, with their length in nanoseconds.
const DURATION_UNITS: &[(&str, u64)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

/// The units `memory` accepts, with their size in bytes. No unit at all means bytes.
const SIZE_UNITS: &[(&str, u64)] = &[
    ("", 1),
    ("B", 1),
    ("KB", 1_000),
    ("KiB", 1 << 10),
    ("MB", 1_000_000),
    ("MiB", 1 << 20),
    ("GB", 1_000_000_000),
    ("GiB", 1 << 30),
    ("TB", 1_000_000_000_000),
    ("TiB", 1 << 40),
];

/// Why a `number unit` text was rejected.
#[derive(Debug, PartialEq, Eq)]
enum QuantityError {
    /// Not a number followed by a known unit.
    Malformed,
    /// A valid number whose value is not a whole number of the smallest unit.
    NotWhole,
    /// A value that does not fit in a `u64` of the smallest unit.
    TooLarge,
}

/// Parses a timeout such as `"500ms"`, `"2s"`, `"1.5m"` or `"1h"` into nanoseconds.
///
/// The error is the reason only, meant to follow `invalid timeout "...": `.
pub(crate) fn duration_nanos(text: &str) -> Result<u64, String> {
    let nanos = quantity(text, DURATION_UNITS).map_err(|error| match error {
        QuantityError::Malformed => {
            r#"expected a number followed by a unit such as "500ms", "2s", "1m""#.to_owned()
        }
        QuantityError::NotWhole => "not a whole number of nanoseconds".to_owned(),
        QuantityError::TooLarge => "too large (the limit is about 584 years)".to_owned(),
    })?;
    if nanos == 0 {
        return Err("a timeout must be greater than zero".to_owned());
    }
    Ok(nanos)
}

/// Parses a memory size such as `"512MiB"`, `"2GB"` or `"1048576"` into bytes.
///
/// `KB`, `MB`, `GB` and `TB` are powers of 1000; `KiB`, `MiB`, `GiB` and `TiB` powers of 1024.
/// The error is the reason only, meant to follow `invalid memory size "...": `.
pub(crate) fn size_bytes(text: &str) -> Result<u64, String> {
    let bytes = quantity(text, SIZE_UNITS).map_err(|error| match error {
        QuantityError::Malformed => concat!(
            r#"expected a number of bytes, optionally followed by a unit such as "512MiB" or "2GB" "#,
            "(units: B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)"
        )
        .to_owned(),
        QuantityError::NotWhole => "not a whole number of bytes".to_owned(),
        QuantityError::TooLarge => "too large to fit in 64 bits".to_owned(),
    })?;
    if bytes == 0 {
        return Err("a memory limit must be greater than zero".to_owned());
    }
    Ok(bytes)
}

/// Splits `text` into a decimal number and a unit from `units`, and returns the number times the
/// unit's multiplier.
fn quantity(text: &str, units: &[(&str, u64)]) -> Result<u64, QuantityError> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let &(_, multiplier) = units
        .iter()
        .find(|(name, _)| *name == unit)
        .ok_or(QuantityError::Malformed)?;
    scale(number, multiplier)
}

/// Computes `number * multiplier` exactly, where `number` is `digits` or `digits.digits`.
fn scale(number: &str, multiplier: u64) -> Result<u64, QuantityError> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let is_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !is_digits(whole) || (number.contains('.') && !is_digits(fraction)) {
        return Err(QuantityError::Malformed);
    }
    // Trailing zeros of the fraction change nothing; dropping them keeps `mantissa` small.
    let fraction = fraction.trim_end_matches('0');

    // `number` == mantissa / 10^fraction.len()
    let mut mantissa: u128 = 0;
    for digit in whole.bytes().chain(fraction.bytes()) {
        mantissa = mantissa
            .checked_mul(10)
            .and_then(|m| m.checked_add(u128::from(digit - b'0')))
            .ok_or(QuantityError::TooLarge)?;
    }
    let divisor = u32::try_from(fraction.len())
        .ok()
        .and_then(|digits| 10_u128.checked_pow(digits))
        .ok_or(QuantityError::NotWhole)?;
    let scaled = mantissa
        .checked_mul(u128::from(multiplier))
        .ok_or(QuantityError::TooLarge)?;
    if scaled % divisor != 0 {
        return Err(QuantityError::NotWhole);
    }
    u64::try_from(scaled / divisor).map_err(|_| QuantityError::TooLarge)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn durations_in_every_unit() {
        assert_eq!(duration_nanos("250ns"), Ok(250));
        assert_eq!(duration_nanos("250us"), Ok(250_000));
        assert_eq!(duration_nanos("500ms"), Ok(500_000_000));
        assert_eq!(duration_nanos("2s"), Ok(2 * SECOND));
        assert_eq!(duration_nanos("1m"), Ok(60 * SECOND));
        assert_eq!(duration_nanos("1h"), Ok(3600 * SECOND));
    }

    #[test]
    fn decimal_durations_are_exact() {
        assert_eq!(duration_nanos("1.5s"), Ok(1_500_000_000));
        assert_eq!(duration_nanos("0.25m"), Ok(15 * SECOND));
        assert_eq!(duration_nanos("0.001s"), Ok(1_000_000));
        assert_eq!(duration_nanos("2.0s"), Ok(2 * SECOND));
        assert_eq!(duration_nanos("007s"), Ok(7 * SECOND));
        assert_eq!(
            duration_nanos("1.50000000000000000000000000000000000000000000s"),
            Ok(1_500_000_000)
        );
    }

    #[test]
    fn malformed_durations_are_rejected() {
        for text in [
            "",
            "5 parsecs",
            "-1s",
            "5",
            "s",
            "1.s",
            ".5s",
            "1..5s",
            "1.2.3s",
            "5 s",
            " 5s",
            "5s ",
            "5S",
            "5sec",
            "1e3ms",
            "+5s",
            "5µs",
        ] {
            let error = duration_nanos(text).expect_err(text);
            assert!(error.starts_with("expected a number"), "{text:?}: {error}");
        }
    }

    #[test]
    fn zero_fractional_and_huge_durations_are_rejected() {
        assert_eq!(
            duration_nanos("0s"),
            Err("a timeout must be greater than zero".to_owned())
        );
        assert_eq!(
            duration_nanos("0.0ms"),
            Err("a timeout must be greater than zero".to_owned())
        );
        assert_eq!(
            duration_nanos("1.5ns"),
            Err("not a whole number of nanoseconds".to_owned())
        );
        assert!(duration_nanos("1000000h").is_ok());
        assert!(
            duration_nanos("10000000h")
                .unwrap_err()
                .starts_with("too large")
        );
        assert!(
            duration_nanos("99999999999999999999999999999999999999999h")
                .unwrap_err()
                .starts_with("too large")
        );
    }

    #[test]
    fn sizes_in_every_unit() {
        assert_eq!(size_bytes("1048576"), Ok(1 << 20));
        assert_eq!(size_bytes("100B"), Ok(100));
        assert_eq!(size_bytes("1KB"), Ok(1_000));
        assert_eq!(size_bytes("1KiB"), Ok(1_024));
        assert_eq!(size_bytes("512MB"), Ok(512_000_000));
        assert_eq!(size_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(size_bytes("2GB"), Ok(2_000_000_000));
        assert_eq!(size_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(size_bytes("3TB"), Ok(3_000_000_000_000));
        assert_eq!(size_bytes("3TiB"), Ok(3 << 40));
        assert_eq!(size_bytes("1.5GiB"), Ok(3 << 29));
        assert_eq!(size_bytes("0.5KB"), Ok(500));
    }

    #[test]
    fn bad_sizes_are_rejected() {
        for text in [
            "",
            "12 parsecs",
            "-1MiB",
            "1 MiB",
            "1mib",
            "1M",
            "1.MiB",
            "MiB",
            "1k",
        ] {
            let error = size_bytes(text).expect_err(text);
            assert!(
                error.starts_with("expected a number of bytes"),
                "{text:?}: {error}"
            );
        }
        assert_eq!(
            size_bytes("0"),
            Err("a memory limit must be greater than zero".to_owned())
        );
        assert_eq!(
            size_bytes("1.5B"),
            Err("not a whole number of bytes".to_owned())
        );
        assert_eq!(size_bytes("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(
            size_bytes("18446744073709551616"),
            Err("too large to fit in 64 bits".to_owned())
        );
        assert_eq!(
            size_bytes("17179869184GiB"),
            Err("too large to fit in 64 bits".to_owned())
        );
    }
}
