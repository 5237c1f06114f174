//! Byte sizes as people type them on a command line (`4GiB`, `500MB`, `1048576`), for the flags
//! of both binaries that size memory or files (`--part-size`, `--kv-cache-memory`,
//! `--kv-memory`). Hand-written: six units do not justify a dependency.

/// A positive whole number of bytes with an optional unit: `KiB`, `MiB`, `GiB` are powers of
/// 1024, `KB`, `MB`, `GB` powers of 1000, `B` or none is bytes; case is ignored. Overflow and
/// zero are errors.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit; use B, KB, MB, GB, KiB, MiB or GiB"
            ))
        }
    };
    match number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
    {
        Some(bytes) if bytes > 0 => Ok(bytes),
        _ => Err(format!(
            "{text:?} must be a positive whole number of bytes, such as 50MB or 4GiB"
        )),
    }
}

/// `bytes` in the largest binary unit that keeps it at least 1, with one decimal.
pub fn format_bytes(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_and_without_suffixes() {
        for (text, want) in [
            ("1048576", 1 << 20),
            ("4GiB", 4 << 30),
            ("4 gib", 4 << 30),
            ("500MB", 500_000_000),
            ("2kb", 2000),
            ("7B", 7),
        ] {
            assert_eq!(parse_bytes(text), Ok(want), "{text}");
        }
        for bad in [
            "",
            "0",
            "GiB",
            "4 GB extra",
            "4TB",
            "1.5MiB",
            "-1",
            "99999999999999999999GB",
        ] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_format_in_binary_units() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(3 << 30), "3.0 GiB");
    }
}
