//! `codec` turns serde values (the manifest, the program) into section bytes and back, with
//! bincode 2 `config::standard()` (little-endian, varint integers).
//!
//! Decoding reads bytes that came from a file, so it is capped at [`DECODE_LIMIT`] bytes of
//! decoded data: a corrupt length prefix then fails cleanly instead of asking for a huge
//! allocation. Bulk data (weights, code) belongs in raw sections, not in codec sections.

use crate::PlanError;

/// Most bytes a codec section may decode to. Metadata sections are far smaller; the cap only
/// exists so a corrupt length prefix cannot request gigabytes before the read fails.
pub const DECODE_LIMIT: usize = 1 << 30;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// Serializes `value` into the bytes of a codec section.
pub fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, PlanError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| PlanError::Encode {
        message: e.to_string(),
    })
}

/// Deserializes the bytes of section `section`; every byte must be consumed, so a section written
/// for a different type is reported rather than half-read.
pub fn decode<T: serde::de::DeserializeOwned>(section: &str, bytes: &[u8]) -> Result<T, PlanError> {
    let decode_error = |message: String| PlanError::Decode {
        section: section.to_owned(),
        message,
    };
    let (value, read) = bincode::serde::decode_from_slice::<T, _>(bytes, config())
        .map_err(|e| decode_error(e.to_string()))?;
    if read != bytes.len() {
        return Err(decode_error(format!(
            "{} trailing bytes after the value",
            bytes.len() - read
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        name: String,
        dims: Vec<u64>,
        scale: f32,
        extra: BTreeMap<String, i32>,
        tag: Option<u8>,
    }

    fn sample() -> Sample {
        Sample {
            name: "llama".into(),
            dims: vec![1, 4096, 32_000],
            scale: 0.125,
            extra: BTreeMap::from([("a".into(), -1), ("b".into(), 7)]),
            tag: Some(3),
        }
    }

    #[test]
    fn round_trip_gives_back_the_value() {
        let bytes = encode(&sample()).unwrap();
        let back: Sample = decode("manifest", &bytes).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn encoding_is_deterministic() {
        assert_eq!(encode(&sample()).unwrap(), encode(&sample()).unwrap());
    }

    #[test]
    fn bad_bytes_give_a_decode_error_naming_the_section() {
        let good = encode(&sample()).unwrap();
        let mut trailing = good.clone();
        trailing.push(0);
        // A string length prefix of u64::MAX: must fail on the limit, not try to allocate.
        let huge_length = vec![253, 255, 255, 255, 255, 255, 255, 255, 255];
        let cases: [(&str, Vec<u8>, &str); 4] = [
            ("empty", vec![], "unexpected"),
            ("truncated", good[..good.len() - 2].to_vec(), "unexpected"),
            ("trailing", trailing, "1 trailing bytes"),
            ("huge length", huge_length, "limit"),
        ];
        for (label, bytes, needle) in cases {
            let err = decode::<Sample>("program", &bytes).unwrap_err();
            assert!(
                matches!(&err, PlanError::Decode { section, .. } if section == "program"),
                "{label}: {err:?}"
            );
            let message = err.to_string();
            assert!(message.contains("'program'"), "{label}: {message}");
            assert!(
                message.to_lowercase().contains(needle),
                "{label}: {message} lacks {needle:?}"
            );
        }
    }
}
