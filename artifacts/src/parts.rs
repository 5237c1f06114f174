//! `parts` owns plans shipped in parts: weight part files (`.fdw`), the parts table a plan
//! records about them, weight snapshots for live updates, and the strict file names of both.
//!
//! A plan in parts is `NAME.fdp` (manifest, program, code, tokenizer, and a `parts` section
//! instead of weight sections) plus `NAME.part0.fdw`, `NAME.part1.fdw`, ... A part file is a
//! container of the same format as a plan (header, aligned sections, a blake3 per section) that
//! holds a `part` section (a [`PartHeader`]) and then weight sections exactly as a single-file
//! plan has them: same names, same bytes. The plan's [`PartsTable`] records each part's file
//! name, length and table checksum, so a part that is missing, swapped or damaged is named at
//! load.
//!
//! A weight snapshot (new values for the same structure, for a live update) is a set of part
//! files named `NAME.tp{rank}.{snapshot_id}.part{N}.fdw` with no plan file: each part's header
//! carries the snapshot id, the rank, the part count and the [`WeightInfo`] of every weight it
//! holds, so the runtime can check the structure against the plan it serves.
//!
//! Weights are split between parts in plan order, never inside a weight: a part holds at most
//! `part_size` bytes of weight sections, or one weight when that weight alone is larger.

use crate::schema::{WeightInfo, WeightLayout};
use crate::{codec, PlanError, PlanWriter, SectionKind, SECTION_ALIGNMENT};
use ir_types::DType;
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Name of the codec section, in a plan in parts, that holds its [`PartsTable`].
pub const PARTS_SECTION: &str = "parts";
/// Name of the codec section, first in every part file, that holds its [`PartHeader`].
pub const PART_SECTION: &str = "part";
/// File extension of part files.
pub const PART_EXTENSION: &str = "fdw";
/// Longest snapshot id accepted, in bytes.
pub const MAX_SNAPSHOT_ID_LEN: usize = 128;

/// What a plan in parts records about its part files, in part order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartsTable {
    pub parts: Vec<PartEntry>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartEntry {
    /// File name beside the plan (no directory).
    pub file: String,
    /// Length of the part file in bytes.
    pub bytes: u64,
    /// blake3 of the part's section table, lower-case hex: it holds every section's checksum,
    /// so it identifies the part's whole content.
    pub checksum: String,
}

/// Which weight snapshot a part belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotTag {
    pub id: String,
    /// Tensor-parallel rank the weights are for (0 on a single device).
    pub rank: u32,
}

/// The `part` section of a part file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartHeader {
    /// The plan's model name.
    pub model: String,
    /// `None` for the parts of a plan, `Some` for a weight snapshot.
    pub snapshot: Option<SnapshotTag>,
    pub index: u32,
    pub count: u32,
    /// The weights this part holds, in order, each as a `weight:<name>` section.
    pub weights: Vec<WeightInfo>,
}

// ---- sizes and splitting -----------------------------------------------------------------------

/// Bytes of the section holding `info`, as the compiler writes it and the runtime checks it;
/// `None` for a storage type or shape whose size cannot be computed.
pub fn weight_section_len(info: &WeightInfo) -> Option<u64> {
    // The tile layout permutes the codes of panels of 8 rows: the same bytes.
    let layout = match info.layout {
        WeightLayout::QuantTiles => WeightLayout::Panels { panel: 8 },
        other => other,
    };
    let elements = match layout {
        WeightLayout::RowMajor | WeightLayout::QuantTiles => {
            info.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d))?
        }
        // Panels round N up to whole panels.
        WeightLayout::Panels { panel } => {
            let (rows, cols) = panel_matrix(info)?;
            let panel = u64::from(panel).max(1);
            rows.div_ceil(panel).checked_mul(panel)?.checked_mul(cols)?
        }
    };
    if let Some(q) = &info.quant {
        // Codes, then f16 scales at `scales_offset`, then (asymmetric) f16 minimums at
        // `mins_offset`, one of each per panel row and group.
        let (WeightLayout::Panels { panel }, Some((rows, cols))) = (layout, panel_matrix(info))
        else {
            return None;
        };
        let panel = u64::from(panel).max(1);
        let groups = cols.checked_div(q.group)?;
        let values = rows
            .div_ceil(panel)
            .checked_mul(panel)?
            .checked_mul(groups)?;
        let mins = if q.asymmetric {
            values.checked_mul(2)?
        } else {
            0
        };
        return q.mins_offset.checked_add(mins);
    }
    match info.dtype {
        DType::F32 | DType::BF16 | DType::F16 => {
            elements.checked_mul(info.dtype.size_bytes() as u64)
        }
        _ => None,
    }
}

/// The `[rows, cols]` matrix a weight in panels is: a matrix, or quantized stacked experts
/// `[E, R, K]` as one `[E * R, K]` matrix.
fn panel_matrix(info: &WeightInfo) -> Option<(u64, u64)> {
    match info.shape[..] {
        [rows, cols] => Some((rows, cols)),
        [experts, rows, cols] if info.quant.is_some() => Some((experts.checked_mul(rows)?, cols)),
        _ => None,
    }
}

/// Splits weights with section lengths `lens` (in plan order) into consecutive parts of at most
/// `part_size` bytes each, counting every section at its aligned size; a weight larger than
/// `part_size` gets a part of its own. At least one part, even for no weights.
pub fn split_into_parts(lens: &[u64], part_size: u64) -> Vec<Range<usize>> {
    let mut parts = vec![];
    let mut start = 0;
    let mut bytes = 0u64;
    for (i, &len) in lens.iter().enumerate() {
        let aligned = len.div_ceil(SECTION_ALIGNMENT) * SECTION_ALIGNMENT;
        if i > start && bytes + aligned > part_size {
            parts.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += aligned;
    }
    parts.push(start..lens.len());
    parts
}

// ---- file names --------------------------------------------------------------------------------

/// `NAME.part{index}.fdw`, the name of a plan's part file.
pub fn plan_part_file(name: &str, index: usize) -> String {
    format!("{name}.part{index}.{PART_EXTENSION}")
}

/// `NAME.tp{rank}.{snapshot_id}.part{index}.fdw`, the name of a snapshot's part file. The dot
/// between rank and id is what keeps `tp1.234` and `tp12.34` apart.
pub fn snapshot_part_file(name: &str, tag: &SnapshotTag, index: usize) -> String {
    format!(
        "{name}.tp{}.{}.part{index}.{PART_EXTENSION}",
        tag.rank, tag.id
    )
}

/// A snapshot part file name, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotPartName {
    pub name: String,
    pub tag: SnapshotTag,
    pub index: u32,
}

/// Why a file name is not a snapshot part name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{file:?} is not a snapshot part name NAME.tp{{rank}}.{{snapshot_id}}.part{{N}}.fdw: {reason}"
)]
pub struct PartNameError {
    pub file: String,
    pub reason: String,
}

/// Checks a snapshot id: 1 to 128 ASCII letters, digits, `-` or `_`. No dot, so that it is one
/// field of a part file name; no slash, so that it names no other directory.
pub fn check_snapshot_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_SNAPSHOT_ID_LEN {
        return Err(format!(
            "snapshot id {id:?} must have 1 to {MAX_SNAPSHOT_ID_LEN} characters"
        ));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "snapshot id {id:?} contains {bad:?}; use letters, digits, '-' and '_'"
        ));
    }
    Ok(())
}

/// A decimal number in its one canonical spelling (no sign, no leading zero, fits `u32`), so
/// that every part has exactly one name.
fn canonical_number(text: &str) -> Option<u32> {
    let canonical = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    canonical.then(|| text.parse().ok()).flatten()
}

/// Parses `NAME.tp{rank}.{snapshot_id}.part{N}.fdw` strictly, field by field from the end:
/// `.fdw`, `.part{N}`, `.{snapshot_id}` (no dot inside), `.tp{rank}`; what is left is `NAME`.
pub fn parse_snapshot_part_file(file: &str) -> Result<SnapshotPartName, PartNameError> {
    let fail = |reason: &str| PartNameError {
        file: file.to_owned(),
        reason: reason.to_owned(),
    };
    let stem = file
        .strip_suffix(&format!(".{PART_EXTENSION}"))
        .ok_or_else(|| fail("it does not end in .fdw"))?;
    let (rest, part) = stem
        .rsplit_once('.')
        .ok_or_else(|| fail("it has no .part{N} field"))?;
    let index = part
        .strip_prefix("part")
        .and_then(canonical_number)
        .ok_or_else(|| fail("the field before .fdw is not part{N}"))?;
    let (rest, id) = rest
        .rsplit_once('.')
        .ok_or_else(|| fail("it has no snapshot id field"))?;
    check_snapshot_id(id).map_err(|reason| fail(&reason))?;
    let (name, rank) = rest
        .rsplit_once('.')
        .ok_or_else(|| fail("it has no .tp{rank} field before the snapshot id"))?;
    let rank = rank
        .strip_prefix("tp")
        .and_then(canonical_number)
        .ok_or_else(|| {
            fail("the field before the snapshot id is not tp{rank} (rank and id are separated by a dot)")
        })?;
    if name.is_empty() {
        return Err(fail("the name is empty"));
    }
    Ok(SnapshotPartName {
        name: name.to_owned(),
        tag: SnapshotTag {
            id: id.to_owned(),
            rank,
        },
        index,
    })
}

// ---- writing -----------------------------------------------------------------------------------

/// Writes weight sections into a planned sequence of part files: each part is written to a
/// temporary file and renamed into place when its last weight is in (see [`PlanWriter`]).
pub struct PartsWriter {
    parts: Vec<(PathBuf, PartHeader)>,
    current: Option<PlanWriter>,
    /// Part being written and weights written into it.
    index: usize,
    written_in_part: usize,
    entries: Vec<PartEntry>,
}

impl PartsWriter {
    /// `parts` lists each part's path and header; weights must then be added in the order the
    /// headers list them.
    pub fn new(parts: Vec<(PathBuf, PartHeader)>) -> PartsWriter {
        PartsWriter {
            parts,
            current: None,
            index: 0,
            written_in_part: 0,
            entries: vec![],
        }
    }

    /// The part paths and headers for `weights` of `model` split at `part_size`, named by
    /// `file_name(index)` inside `dir`.
    pub fn plan(
        model: &str,
        snapshot: Option<SnapshotTag>,
        weights: &[WeightInfo],
        part_size: u64,
        dir: &Path,
        file_name: impl Fn(usize) -> String,
    ) -> Result<Vec<(PathBuf, PartHeader)>, PlanError> {
        let lens = weights
            .iter()
            .map(|w| {
                weight_section_len(w).ok_or_else(|| PlanError::Encode {
                    message: format!("weight {} has no computable size", w.name),
                })
            })
            .collect::<Result<Vec<u64>, PlanError>>()?;
        let ranges = split_into_parts(&lens, part_size);
        let count = ranges.len() as u32;
        Ok(ranges
            .into_iter()
            .enumerate()
            .map(|(index, range)| {
                let header = PartHeader {
                    model: model.to_owned(),
                    snapshot: snapshot.clone(),
                    index: index as u32,
                    count,
                    weights: weights[range].to_vec(),
                };
                (dir.join(file_name(index)), header)
            })
            .collect())
    }

    /// Adds the section of weight `name`, which must be the next one the headers list, with
    /// exactly the length its [`WeightInfo`] implies.
    pub fn add_weight(&mut self, name: &str, bytes: &[u8]) -> Result<(), PlanError> {
        let mismatch = |message: String| Err(PlanError::Encode { message });
        while self
            .parts
            .get(self.index)
            .is_some_and(|(_, h)| self.written_in_part == h.weights.len())
        {
            self.finish_part()?;
        }
        let Some((path, header)) = self.parts.get(self.index) else {
            return mismatch(format!("weight {name} is past the last part"));
        };
        let Some(info) = header.weights.get(self.written_in_part) else {
            return mismatch(format!("weight {name} does not fit the planned parts"));
        };
        if info.name != name {
            return mismatch(format!(
                "weight {name} added where part {} expects {}",
                header.index, info.name
            ));
        }
        if weight_section_len(info) != Some(bytes.len() as u64) {
            return mismatch(format!(
                "weight {name} has {} bytes, its shape {:?} {} needs {:?}",
                bytes.len(),
                info.shape,
                info.dtype,
                weight_section_len(info)
            ));
        }
        if self.current.is_none() {
            let mut writer = PlanWriter::create(path)?;
            writer.add_section(PART_SECTION, SectionKind::Other, &codec::encode(header)?)?;
            self.current = Some(writer);
        }
        if let Some(writer) = self.current.as_mut() {
            writer.add_section(
                &crate::schema::section::weight(name),
                SectionKind::Weights,
                bytes,
            )?;
        }
        self.written_in_part += 1;
        Ok(())
    }

    /// Finishes the parts still open (including parts with no weights) and returns the table.
    pub fn finish(mut self) -> Result<PartsTable, PlanError> {
        while self.index < self.parts.len() {
            let (_, header) = &self.parts[self.index];
            if self.written_in_part != header.weights.len() {
                return Err(PlanError::Encode {
                    message: format!(
                        "part {} got {} of its {} weights",
                        header.index,
                        self.written_in_part,
                        header.weights.len()
                    ),
                });
            }
            self.finish_part()?;
        }
        Ok(PartsTable {
            parts: self.entries,
        })
    }

    fn finish_part(&mut self) -> Result<(), PlanError> {
        let (path, header) = &self.parts[self.index];
        let writer = match self.current.take() {
            Some(writer) => writer,
            None => {
                let mut writer = PlanWriter::create(path)?;
                writer.add_section(PART_SECTION, SectionKind::Other, &codec::encode(header)?)?;
                writer
            }
        };
        let summary = writer.finish()?;
        self.entries.push(PartEntry {
            file: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            bytes: summary.file_len,
            checksum: summary.checksum,
        });
        self.index += 1;
        self.written_in_part = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(rank: u32, id: &str) -> SnapshotTag {
        SnapshotTag {
            id: id.into(),
            rank,
        }
    }

    #[test]
    fn rank_and_id_are_never_ambiguous() {
        // The glued spelling `tp1234` could be rank 1 / id 234 or rank 12 / id 34: each pair has
        // its own name, and each name parses back to its pair only.
        let pairs = [(1, "234"), (12, "34"), (123, "4"), (0, "1234"), (1234, "0")];
        let mut names = vec![];
        for (rank, id) in pairs {
            let file = snapshot_part_file("m", &tag(rank, id), 0);
            let parsed = parse_snapshot_part_file(&file).unwrap();
            assert_eq!(parsed.tag, tag(rank, id), "{file}");
            assert_eq!((parsed.name.as_str(), parsed.index), ("m", 0), "{file}");
            names.push(file);
        }
        names.sort();
        names.dedup();
        assert_eq!(names.len(), pairs.len(), "{names:?}");
    }

    #[test]
    fn snapshot_part_names_parse_field_by_field() {
        let ok = [
            ("m.tp1.234.part0.fdw", "m", 1, "234", 0),
            ("m.tp12.34.part7.fdw", "m", 12, "34", 7),
            (
                "my.model.tp0.step-100_b.part12.fdw",
                "my.model",
                0,
                "step-100_b",
                12,
            ),
            // An id that looks like a rank field is still just the id.
            ("m.tp3.tp1234.part0.fdw", "m", 3, "tp1234", 0),
        ];
        for (file, name, rank, id, index) in ok {
            let parsed = parse_snapshot_part_file(file).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                parsed,
                SnapshotPartName {
                    name: name.into(),
                    tag: tag(rank, id),
                    index
                },
                "{file}"
            );
        }
    }

    #[test]
    fn bad_snapshot_part_names_say_which_field_is_wrong() {
        let bad = [
            ("m.tp1234.part0.fdw", "tp{rank}"),
            ("tp1234.part0.fdw", "tp{rank}"),
            ("m.tp01.5.part0.fdw", "tp{rank}"),
            ("m.tp.5.part0.fdw", "tp{rank}"),
            ("m.tp1.5.part00.fdw", "part{N}"),
            ("m.tp1.5.part.fdw", "part{N}"),
            ("m.tp1.5.part0.fdp", ".fdw"),
            ("m.tp1..part0.fdw", "1 to 128"),
            ("m.tp1.a b.part0.fdw", "contains ' '"),
            (".tp1.5.part0.fdw", "name is empty"),
            ("m.tp99999999999.5.part0.fdw", "tp{rank}"),
        ];
        for (file, needle) in bad {
            let err = parse_snapshot_part_file(file).expect_err(file);
            assert!(err.to_string().contains(needle), "{file}: {err}");
        }
    }

    #[test]
    fn parts_hold_at_most_part_size_of_aligned_sections() {
        const PAGE: u64 = SECTION_ALIGNMENT;
        // (section lengths, part size, parts as (first, end) weight indices)
        type Case = (&'static [u64], u64, &'static [(usize, usize)]);
        let cases: [Case; 5] = [
            (&[], 10 * PAGE, &[(0, 0)]),
            (&[PAGE, PAGE, PAGE], 2 * PAGE, &[(0, 2), (2, 3)]),
            // One byte over a page counts as two pages.
            (&[PAGE + 1, PAGE], 2 * PAGE, &[(0, 1), (1, 2)]),
            // A weight larger than a part gets a part of its own.
            (&[PAGE, 5 * PAGE, PAGE], 2 * PAGE, &[(0, 1), (1, 2), (2, 3)]),
            (&[1, 1, 1, 1], 4 * PAGE, &[(0, 4)]),
        ];
        for (lens, size, want) in cases {
            let want: Vec<Range<usize>> = want.iter().map(|&(a, b)| a..b).collect();
            assert_eq!(split_into_parts(lens, size), want, "{lens:?} at {size}");
        }
    }

    #[test]
    fn section_lengths_follow_dtype_and_layout() {
        let info = |dtype, shape: Vec<u64>, layout| WeightInfo {
            name: "w".into(),
            dtype,
            shape,
            layout,
            quant: None,
        };
        let panels = WeightLayout::Panels { panel: 16 };
        assert_eq!(
            weight_section_len(&info(DType::F32, vec![3, 5], WeightLayout::RowMajor)),
            Some(60)
        );
        assert_eq!(
            weight_section_len(&info(DType::BF16, vec![17, 4], panels)),
            Some(32 * 4 * 2)
        );
        assert_eq!(weight_section_len(&info(DType::F16, vec![4], panels)), None);
        // Quantized stacked experts [E, R, K] are one [E * R, K] matrix: 3 x 16 rows of 32
        // 4-bit codes with one asymmetric group per row, minimums after the offset.
        let quant = crate::schema::QuantInfo {
            scheme: ir_types::QuantScheme::W4A16,
            codes: ir_types::CodeFormat::Int(4),
            group: 32,
            asymmetric: true,
            scales_offset: 768,
            mins_offset: 896,
            from_checkpoint: false,
        };
        let experts = WeightInfo {
            quant: Some(quant),
            ..info(DType::U8, vec![3, 16, 32], panels)
        };
        assert_eq!(weight_section_len(&experts), Some(896 + 48 * 2));
        // A plain 3-dimensional weight is never in panels.
        assert_eq!(
            weight_section_len(&info(DType::U8, vec![3, 16, 32], panels)),
            None
        );
    }
}
