//! Sizes (`20GiB`, `512M`, `1000000`) and durations (`30s`, `2m`, `1h30m`, `500ms`).

use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a {1} (examples: {2})")]
pub struct UnitError(String, &'static str, &'static str);

/// Bytes: a number with an optional unit; K/M/G/T and KiB/MiB/GiB/TiB are
/// powers of 1024 (as `mke2fs` and `truncate` read them), KB/MB/GB/TB of 1000.
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let err = || UnitError(s.into(), "size", "20GiB, 512M, 1000000");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| err())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "k" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return Err(err()),
    };
    n.checked_mul(mult).ok_or_else(err)
}

/// A duration in Go's syntax (`30s`, `2m`, `1h30m`, `500ms`; a bare number
/// is seconds): [`coral_seed::time::parse_duration`].
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    coral_seed::time::parse_duration(s)
        .map_err(|_| UnitError(s.into(), "duration", "30s, 2m, 500ms, 1h"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("20GiB"), Ok(20 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("3GB"), Ok(3_000_000_000));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("20 parsecs").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(
            parse_size("lots").unwrap_err().to_string(),
            "\"lots\" is not a size (examples: 20GiB, 512M, 1000000)"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("soon").is_err());
    }
}
