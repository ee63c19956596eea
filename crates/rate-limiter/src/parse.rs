//! The CLI syntax for rates shared by devices: `10M`, `512K`, `1G`, plain numbers.

use thiserror::Error;

/// A rate string that could not be read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    /// Nothing given.
    #[error("Empty rate: give a number such as 1048576, 512K or 10M")]
    Empty,
    /// Not a number with an optional K/M/G suffix.
    #[error("Invalid rate '{0}': give a number with an optional K, M or G suffix (binary units)")]
    Invalid(String),
    /// Too large for 64 bits.
    #[error("Rate '{0}' is too large")]
    Overflow(String),
}

/// Reads `N`, `NK`, `NM`, `NG` (binary units, case-insensitive; a trailing `i`/`iB`/`B` is
/// accepted) into a number.
pub fn parse_rate(s: &str) -> Result<u64, ParseError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(ParseError::Empty);
    }
    let lower = t.to_ascii_lowercase();
    let stripped = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .or_else(|| lower.strip_suffix('i'))
        .unwrap_or(&lower);
    let (digits, mult): (&str, u64) = match stripped.chars().last() {
        Some('k') => (&stripped[..stripped.len() - 1], 1 << 10),
        Some('m') => (&stripped[..stripped.len() - 1], 1 << 20),
        Some('g') => (&stripped[..stripped.len() - 1], 1 << 30),
        _ => (stripped, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::Invalid(s.to_string()));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| ParseError::Overflow(s.to_string()))?;
    n.checked_mul(mult)
        .ok_or_else(|| ParseError::Overflow(s.to_string()))
}
