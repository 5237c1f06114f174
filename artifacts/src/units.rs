//! Byte sizes as people type them on a command line (`4GiB`, `500MB`, `1048576`), for the flags
//! of both binaries that size memory or files. Written here rather than taken from a crate: six
//! suffixes are all the flags need.

/// Digits (a decimal point allowed) with an optional suffix: `KiB`, `MiB`, `GiB` are powers of
/// 1024, `KB`, `MB`, `GB` powers of 1000, `B` or none is bytes; case is ignored.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let scale: f64 = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        other => {
            return Err(format!(
                "unknown size suffix `{other}` (use KiB, MiB, GiB, KB, MB or GB)"
            ))
        }
    };
    match number.parse::<f64>() {
        Ok(value) if value.is_finite() => Ok((value * scale) as u64),
        _ => Err(format!("`{text}` is not a size (e.g. 4GiB or 500000000)")),
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
            ("1.5KiB", 1536),
            ("500MB", 500_000_000),
            ("2kb", 2000),
            ("7B", 7),
        ] {
            assert_eq!(parse_bytes(text), Ok(want), "{text}");
        }
        for bad in ["", "GiB", "4 GB extra", "4TB", "1.2.3MiB", "-1"] {
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
