//! Sizes in bytes, with the human spellings operators type (`10GiB`, `512MiB`, `1G`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

const GIB: u64 = 1 << 30;

/// A positive number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ByteSize(u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("size must be greater than 0")]
    Zero,
    #[error(
        "{0:?} is not a size: use bytes or a number with a unit (B, KiB, MiB, GiB, TiB, K, M, G, T)"
    )]
    Syntax(String),
    #[error("{0:?} is too large")]
    Overflow(String),
}

impl ByteSize {
    pub fn new(bytes: u64) -> Result<Self, SizeError> {
        if bytes == 0 {
            Err(SizeError::Zero)
        } else {
            Ok(Self(bytes))
        }
    }

    pub fn bytes(self) -> u64 {
        self.0
    }

    /// Whole GiB, rounded up: what CloudStack's `createVolume size=` takes.
    pub fn gib_rounded_up(self) -> u64 {
        self.0.div_ceil(GIB)
    }

    pub fn from_gib(gib: u64) -> Result<Self, SizeError> {
        gib.checked_mul(GIB)
            .ok_or_else(|| SizeError::Overflow(format!("{gib}GiB")))
            .and_then(Self::new)
    }
}

impl FromStr for ByteSize {
    type Err = SizeError;

    /// Parses `1073741824`, `1GiB`, `1.5 GiB`, `10G` (binary units: CloudStack counts GiB).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = (t[..split].trim(), t[split..].trim());
        let mult: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" | "kb" => 1 << 10,
            "m" | "mib" | "mb" => 1 << 20,
            "g" | "gib" | "gb" => 1 << 30,
            "t" | "tib" | "tb" => 1 << 40,
            _ => return Err(SizeError::Syntax(s.to_owned())),
        };
        let bytes = if let Ok(n) = num.parse::<u64>() {
            n.checked_mul(mult)
                .ok_or_else(|| SizeError::Overflow(s.to_owned()))?
        } else {
            let f: f64 = num.parse().map_err(|_| SizeError::Syntax(s.to_owned()))?;
            let b = (f * mult as f64).ceil();
            if !b.is_finite() || b >= u64::MAX as f64 {
                return Err(SizeError::Overflow(s.to_owned()));
            }
            b as u64
        };
        Self::new(bytes)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(GIB) {
            write!(f, "{}GiB", self.0 / GIB)
        } else {
            write!(f, "{}B", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_human_sizes() {
        assert_eq!("1GiB".parse::<ByteSize>().map(ByteSize::bytes), Ok(GIB));
        assert_eq!(
            "10 GiB".parse::<ByteSize>().map(ByteSize::bytes),
            Ok(10 * GIB)
        );
        assert_eq!(
            "512MiB".parse::<ByteSize>().map(ByteSize::bytes),
            Ok(512 << 20)
        );
        assert_eq!(
            "1.5G".parse::<ByteSize>().map(ByteSize::bytes),
            Ok(GIB + GIB / 2)
        );
        assert_eq!("4096".parse::<ByteSize>().map(ByteSize::bytes), Ok(4096));
    }

    #[test]
    fn rejects_zero_garbage_and_overflow() {
        assert_eq!("0".parse::<ByteSize>(), Err(SizeError::Zero));
        assert!(matches!(
            "ten".parse::<ByteSize>(),
            Err(SizeError::Syntax(_))
        ));
        assert!(matches!(
            "5 parsecs".parse::<ByteSize>(),
            Err(SizeError::Syntax(_))
        ));
        assert!(matches!(
            "99999999999T".parse::<ByteSize>(),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn rounds_up_to_whole_gib() {
        assert_eq!(ByteSize(1).gib_rounded_up(), 1);
        assert_eq!(ByteSize(GIB).gib_rounded_up(), 1);
        assert_eq!(ByteSize(GIB + 1).gib_rounded_up(), 2);
    }
}
