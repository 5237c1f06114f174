//! `weights`: where a running plan's weights live, and loading them with bounded host memory.
//!
//! A [`WeightStore`] maps every weight of the manifest to a section of a mapped file: the plan
//! itself (a single-file plan), its part files (a plan in parts), or the part files of a weight
//! snapshot (after a live update). Kernels read the mapped pages; nothing is copied.
//!
//! Bounded memory: part files are opened one at a time. Opening one verifies every section's
//! checksum, which reads that part and so makes its pages resident; the loader then drops those
//! pages from the process ([`PlanFile::release_resident`]) before it opens the next part, so the
//! resident memory a load adds peaks at one part plus the parts' headers and tables. Kernels
//! fault the pages back in from the page cache when they first read them. Like plans, part files
//! must never be modified in place while they are served (write a new snapshot id instead).
//!
//! Order of preference at load (`LoadedPlan::load`): a plan with a parts table loads its parts;
//! otherwise the weights are sections of the plan file, as in every format version 2 plan.

use crate::error::RuntimeError;
use artifacts::parts::{
    parse_snapshot_part_file, snapshot_part_file, PartHeader, PartsTable, SnapshotTag, PART_SECTION,
};
use artifacts::schema::{section, Manifest, WeightInfo, WeightLayout as PlanLayout};
use artifacts::{codec, PlanFile};
use ir_types::DType;
use kernels::cpu::{PackedLayout, WeightLayout};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The files holding a plan's weights, and which section of which file each weight is.
pub struct WeightStore {
    files: Vec<Arc<PlanFile>>,
    /// By weight index: the file (index into `files`) and the section name.
    sections: Vec<(usize, String)>,
    /// Where the weights came from, for logs and the admin endpoint.
    origin: String,
}

impl WeightStore {
    /// The weight sections of a single-file plan.
    pub fn in_plan(file: Arc<PlanFile>, manifest: &Manifest) -> Result<WeightStore, RuntimeError> {
        let origin = file.path().display().to_string();
        let store = WeightStore {
            files: vec![file],
            sections: manifest
                .weights
                .iter()
                .map(|w| (0, section::weight(&w.name)))
                .collect(),
            origin,
        };
        store.check(manifest)?;
        Ok(store)
    }

    /// The part files a plan's parts table lists, beside the plan at `plan_path`, each checked
    /// against the table (length, checksum, then every section) one at a time.
    pub fn load_parts(
        plan_path: &Path,
        table: &PartsTable,
        manifest: &Manifest,
    ) -> Result<WeightStore, RuntimeError> {
        let dir = plan_path.parent().unwrap_or(Path::new("."));
        let count = table.parts.len();
        let mut loader = PartLoader::new(manifest, None, count);
        for (index, entry) in table.parts.iter().enumerate() {
            // The table comes from the file: a name must not lead out of the plan's directory.
            if Path::new(&entry.file).file_name() != Some(std::ffi::OsStr::new(&entry.file)) {
                return Err(part_error(
                    &entry.file,
                    "the parts table names a path, not a file beside the plan",
                ));
            }
            let path = dir.join(&entry.file);
            let expected = format!(
                "part {index} of {count}, {} bytes, table checksum {}",
                entry.bytes, entry.checksum
            );
            if !path.exists() {
                return Err(RuntimeError::MissingPart {
                    part: path.display().to_string(),
                    expected,
                });
            }
            let file = PlanFile::open_unverified(&path).map_err(|e| part_file_error(&path, e))?;
            if file.file_len() != entry.bytes || file.checksum() != entry.checksum {
                return Err(part_error(
                    &path.display().to_string(),
                    &format!(
                        "it has {} bytes and table checksum {}, the plan expects {expected}: re-copy the plan's part files together",
                        file.file_len(),
                        file.checksum()
                    ),
                ));
            }
            loader.add(file, index)?;
        }
        loader.finish(plan_path.display().to_string())
    }

    /// The parts of weight snapshot `tag` in `dir` (`NAME.tp{rank}.{id}.part{N}.fdw`), checked
    /// against the structure of `manifest`: same weights, names, shapes, types and layouts.
    pub fn load_snapshot(
        dir: &Path,
        tag: &SnapshotTag,
        manifest: &Manifest,
    ) -> Result<WeightStore, RuntimeError> {
        artifacts::parts::check_snapshot_id(&tag.id).map_err(RuntimeError::Snapshot)?;
        let listing = std::fs::read_dir(dir).map_err(|e| {
            RuntimeError::Snapshot(format!(
                "cannot list snapshot directory {}: {e}",
                dir.display()
            ))
        })?;
        // By name, then part index: file names of this snapshot and rank only.
        let mut found: BTreeMap<String, BTreeMap<u32, PathBuf>> = BTreeMap::new();
        for entry in listing.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            // Other files (other snapshots, other ranks, anything else) are not this update's.
            let Ok(parsed) = parse_snapshot_part_file(&file_name) else {
                continue;
            };
            if parsed.tag == *tag {
                found
                    .entry(parsed.name)
                    .or_default()
                    .insert(parsed.index, entry.path());
            }
        }
        let mut names = found.into_iter();
        let (Some((name, parts)), None) = (names.next(), names.next()) else {
            return Err(RuntimeError::Snapshot(format!(
                "{} must hold the part files of exactly one plan for snapshot {:?} rank {} (NAME.tp{}.{}.part{{N}}.fdw)",
                dir.display(),
                tag.id,
                tag.rank,
                tag.rank,
                tag.id
            )));
        };
        let first = parts.get(&0).ok_or_else(|| RuntimeError::MissingPart {
            part: dir
                .join(snapshot_part_file(&name, tag, 0))
                .display()
                .to_string(),
            expected: format!("part 0 of snapshot {:?} rank {}", tag.id, tag.rank),
        })?;
        let count = read_header(first)?.count as usize;
        if let Some((&extra, path)) = parts.iter().find(|(&i, _)| i as usize >= count) {
            return Err(part_error(
                &path.display().to_string(),
                &format!("part index {extra} is past the snapshot's {count} parts"),
            ));
        }
        let mut loader = PartLoader::new(manifest, Some(tag.clone()), count);
        for index in 0..count {
            let path = parts
                .get(&(index as u32))
                .ok_or_else(|| RuntimeError::MissingPart {
                    part: dir
                        .join(snapshot_part_file(&name, tag, index))
                        .display()
                        .to_string(),
                    expected: format!(
                        "part {index} of {count} of snapshot {:?} rank {}",
                        tag.id, tag.rank
                    ),
                })?;
            let file = PlanFile::open_unverified(path).map_err(|e| part_file_error(path, e))?;
            loader.add(file, index)?;
        }
        loader.finish(format!(
            "snapshot {:?} rank {} in {}",
            tag.id,
            tag.rank,
            dir.display()
        ))
    }

    /// The section bytes of weight `index`; present and sized (checked at load).
    pub fn bytes(&self, index: usize) -> &[u8] {
        self.sections
            .get(index)
            .and_then(|(file, name)| self.files.get(*file)?.section(name))
            .unwrap_or(&[])
    }

    /// Drops every weight file's resident pages from this process (they stay in the page cache
    /// and fault back in when read again): for a reader that has copied the weights elsewhere.
    pub fn release_resident(&self) -> Result<(), RuntimeError> {
        for file in &self.files {
            file.release_resident()?;
        }
        Ok(())
    }

    /// Where the weights came from: the plan file, or the snapshot.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Number of files the weights are spread over.
    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    /// Every weight is present with the length its shape, type and layout imply, aligned for
    /// its type.
    fn check(&self, manifest: &Manifest) -> Result<(), RuntimeError> {
        let bad = |msg: String| Err(RuntimeError::InvalidPlan(msg));
        for (i, w) in manifest.weights.iter().enumerate() {
            let Some(bytes) = self
                .sections
                .get(i)
                .and_then(|(file, name)| self.files.get(*file)?.section(name))
            else {
                return bad(format!("weight {} has no section", w.name));
            };
            if let Err(msg) = kernel_layout(w) {
                return bad(format!("weight {}: {msg}", w.name));
            }
            // Quantized: codes, scales and minimums checked against the format.
            match crate::plan::quant_view(w, bytes) {
                Err(msg) => return bad(format!("weight {}: {msg}", w.name)),
                Ok(Some(_)) => continue,
                Ok(None) => {}
            }
            let needed = artifacts::parts::weight_section_len(w);
            if needed != Some(bytes.len() as u64) {
                return bad(format!(
                    "weight {} has {} bytes, {:?} {} needs {}",
                    w.name,
                    bytes.len(),
                    w.shape,
                    w.dtype,
                    needed.map_or("an impossible size".to_string(), |n| n.to_string())
                ));
            }
            let aligned = match w.dtype {
                DType::F32 => artifacts::cast_f32(bytes).is_ok(),
                DType::BF16 | DType::F16 => artifacts::cast_u16(bytes).is_ok(),
                other => {
                    return bad(format!(
                        "weight {} has unsupported storage type {other}",
                        w.name
                    ))
                }
            };
            if !aligned {
                return bad(format!("weight {} is misaligned", w.name));
            }
        }
        Ok(())
    }
}

/// Collects verified parts in order and checks them against the manifest as they come.
struct PartLoader<'a> {
    manifest: &'a Manifest,
    snapshot: Option<SnapshotTag>,
    count: usize,
    files: Vec<Arc<PlanFile>>,
    sections: Vec<(usize, String)>,
}

impl<'a> PartLoader<'a> {
    fn new(manifest: &'a Manifest, snapshot: Option<SnapshotTag>, count: usize) -> Self {
        PartLoader {
            manifest,
            snapshot,
            count,
            files: vec![],
            sections: vec![],
        }
    }

    /// Verifies part `index` (every section's checksum), releases its pages, and checks that
    /// its header continues the manifest's weights where the previous part stopped.
    fn add(&mut self, file: PlanFile, index: usize) -> Result<(), RuntimeError> {
        let name = file.path().display().to_string();
        file.verify_all()
            .map_err(|e| part_file_error(file.path(), e))?;
        // Best effort: failing to drop pages costs memory, not correctness.
        let _ = file.release_resident();
        let header = decode_header(&file)?;
        let wrong = |what: String| Err(part_error(&name, &what));
        if header.index as usize != index || header.count as usize != self.count {
            return wrong(format!(
                "its header says part {} of {}, expected part {index} of {}",
                header.index, header.count, self.count
            ));
        }
        if header.snapshot != self.snapshot {
            return wrong(match &self.snapshot {
                None => "it belongs to a weight snapshot, not to this plan".into(),
                Some(tag) => format!(
                    "its header says snapshot {:?}, expected snapshot {:?} rank {}",
                    header.snapshot, tag.id, tag.rank
                ),
            });
        }
        let file_index = self.files.len();
        for info in &header.weights {
            let position = self.sections.len();
            let Some(expected) = self.manifest.weights.get(position) else {
                return wrong(format!(
                    "weight {} is beyond the plan's {} weights",
                    info.name,
                    self.manifest.weights.len()
                ));
            };
            if info != expected {
                return wrong(format!(
                    "weight {position} is {}, the plan expects {}: the weights do not have the plan's structure",
                    describe(info),
                    describe(expected)
                ));
            }
            self.sections
                .push((file_index, section::weight(&info.name)));
        }
        self.files.push(Arc::new(file));
        Ok(())
    }

    fn finish(self, origin: String) -> Result<WeightStore, RuntimeError> {
        if self.sections.len() != self.manifest.weights.len() {
            let missing = &self.manifest.weights[self.sections.len()..];
            return Err(RuntimeError::Snapshot(format!(
                "the parts hold {} of the plan's {} weights; the first missing is {}",
                self.sections.len(),
                self.manifest.weights.len(),
                missing.first().map_or("", |w| w.name.as_str())
            )));
        }
        let store = WeightStore {
            files: self.files,
            sections: self.sections,
            origin,
        };
        store.check(self.manifest)?;
        Ok(store)
    }
}

fn describe(info: &WeightInfo) -> String {
    format!(
        "{} {:?} {} {:?}",
        info.name, info.shape, info.dtype, info.layout
    )
}

fn decode_header(file: &PlanFile) -> Result<PartHeader, RuntimeError> {
    let bytes = file
        .require_section(PART_SECTION)
        .map_err(|e| part_file_error(file.path(), e))?;
    codec::decode(PART_SECTION, bytes).map_err(|e| part_file_error(file.path(), e))
}

/// The header of a part, read without verifying the rest of the part.
fn read_header(path: &Path) -> Result<PartHeader, RuntimeError> {
    let file = PlanFile::open_unverified(path).map_err(|e| part_file_error(path, e))?;
    decode_header(&file)
}

fn part_error(part: &str, reason: &str) -> RuntimeError {
    RuntimeError::Part {
        part: part.to_owned(),
        reason: reason.to_owned(),
    }
}

fn part_file_error(path: &Path, source: artifacts::PlanError) -> RuntimeError {
    RuntimeError::PartFile {
        part: path.display().to_string(),
        source,
    }
}

/// The kernels' view of a weight's layout; a panel layout must be a width the kernels read, on
/// a matrix or on quantized stacked experts (`[E, R, K]`, one `[E * R, K]` matrix).
pub(crate) fn kernel_layout(info: &WeightInfo) -> Result<WeightLayout, String> {
    let matrix = info.shape.len() == 2 || (info.shape.len() == 3 && info.quant.is_some());
    match info.layout {
        PlanLayout::RowMajor => Ok(WeightLayout::RowMajor),
        PlanLayout::Panels { .. } if !matrix => Err(format!(
            "panel layout on a {}-dimensional weight",
            info.shape.len()
        )),
        PlanLayout::Panels { panel } => PackedLayout::new(panel as usize)
            .map(WeightLayout::Panels)
            .map_err(|e| e.to_string()),
        // The CPU kernels never read it (a CUDA plan runs on the GPU engine only); checked as
        // the panels of 8 rows whose bytes it permutes.
        PlanLayout::QuantTiles => {
            check_quant_tiles(info)?;
            Ok(WeightLayout::Panels(PackedLayout::CUDA_QUANT))
        }
    }
}

/// A weight in the tile layout is one the CUDA tensor-core matmul reads
/// (`kernels::cuda::tiles_fit`): a quantized matrix in its format and shape.
fn check_quant_tiles(info: &WeightInfo) -> Result<(), String> {
    let fits = match (&info.quant, &info.shape[..]) {
        (Some(q), &[rows, cols]) => {
            let format = kernels::cpu::QuantFormat {
                codes: q.codes,
                group: q.group as usize,
                asymmetric: q.asymmetric,
            };
            info.dtype == DType::U8
                && kernels::cuda::tiles_fit(q.scheme, &format, rows as usize, cols as usize)
        }
        _ => false,
    };
    if fits {
        Ok(())
    } else {
        Err(format!(
            "the tile layout holds 4-bit symmetric W4A16 matrices of whole 16-row tiles with K \
             and the group multiples of {}; this weight is {:?} {:?} ({:?})",
            kernels::cuda::QUANT_TILE_K_MULTIPLE,
            info.shape,
            info.dtype,
            info.quant
                .map(|q| (q.scheme, q.codes, q.group, q.asymmetric))
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use artifacts::schema::QuantInfo;
    use ir_types::{CodeFormat, QuantScheme};

    /// The tile layout is refused for a weight the tile kernels cannot read, and taken for one
    /// they can.
    #[test]
    fn the_tile_layout_holds_only_what_the_tile_kernels_read() {
        let info = |scheme, codes, group, asymmetric, shape: Vec<u64>| WeightInfo {
            name: "w".into(),
            dtype: DType::U8,
            shape,
            layout: PlanLayout::QuantTiles,
            quant: Some(QuantInfo {
                scheme,
                codes,
                group,
                asymmetric,
                scales_offset: 0,
                mins_offset: 0,
                from_checkpoint: false,
            }),
        };
        use CodeFormat::Int;
        use QuantScheme::{W4A16, W4A8, W8A16};
        let fits = info(W4A16, Int(4), 64, false, vec![32, 128]);
        assert!(kernel_layout(&fits).is_ok());
        // Another scheme or code width, minimums, groups of 32, a part tile, stacked experts.
        let refused: [(QuantScheme, CodeFormat, u64, bool, &[u64]); 6] = [
            (W8A16, Int(8), 64, false, &[32, 128]),
            (W4A16, Int(4), 64, true, &[32, 128]),
            (W4A16, Int(4), 32, false, &[32, 128]),
            (W4A16, Int(4), 64, false, &[24, 128]),
            (W4A8, Int(4), 64, false, &[32, 128]),
            (W4A16, Int(4), 64, false, &[2, 32, 128]),
        ];
        for (scheme, codes, group, asymmetric, shape) in refused {
            let bad = info(scheme, codes, group, asymmetric, shape.to_vec());
            let err = kernel_layout(&bad).expect_err("refused");
            assert!(err.contains("tile layout"), "{err}");
        }
    }
}
