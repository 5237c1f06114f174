//! Peak resident memory of loading a plan, measured in-process from `/proc/self/status`:
//! the high-water mark (VmHWM) is reset through `/proc/self/clear_refs` (Linux 4.0 and later)
//! just before the load, so it reports the peak of the load alone.
//!
//! Loading a plan in parts must add at most one part plus [`LOAD_CONSTANT_BYTES`]: the plan file
//! itself (manifest, program, code, tokenizer), each part's header page and section table, and
//! allocator slack. A single-file plan adds its whole size (verifying it reads every page).

#![allow(dead_code)]

use runtime::LoadedPlan;
use std::path::Path;

/// What a load may add beyond its largest part.
pub const LOAD_CONSTANT_BYTES: u64 = 8 << 20;

/// A `/proc/self/status` field in bytes (`VmRSS`, `VmHWM`).
pub fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
        })
        .unwrap_or_else(|| panic!("/proc/self/status has no {field}"))
        * 1024
}

/// Resets the peak (VmHWM) to the current resident size.
pub fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5")
        .expect("resetting VmHWM via /proc/self/clear_refs");
}

/// Resident memory before a load, and the peak during it, in bytes.
#[derive(Clone, Copy, Debug)]
pub struct LoadMemory {
    pub before: u64,
    pub peak: u64,
    /// Wall time of the load.
    pub seconds: f64,
}

impl LoadMemory {
    /// What the load added at its peak.
    pub fn added(&self) -> u64 {
        self.peak.saturating_sub(self.before)
    }
}

/// Loads `plan` (verifying every checksum) and reports the resident memory it took at peak.
pub fn measure_load(plan: &Path) -> LoadMemory {
    reset_peak();
    let before = status_bytes("VmRSS");
    let start = std::time::Instant::now();
    let loaded =
        LoadedPlan::load(plan).unwrap_or_else(|e| panic!("loading {}: {e}", plan.display()));
    let seconds = start.elapsed().as_secs_f64();
    let peak = status_bytes("VmHWM");
    drop(loaded);
    LoadMemory {
        before,
        peak,
        seconds,
    }
}

/// The largest part file of the plan in parts `plan`.
pub fn largest_part(plan: &Path) -> u64 {
    let file = artifacts::PlanFile::open(plan).expect("plan opens");
    let table: artifacts::parts::PartsTable = artifacts::codec::decode(
        artifacts::parts::PARTS_SECTION,
        file.require_section(artifacts::parts::PARTS_SECTION)
            .expect("a parts table"),
    )
    .expect("parts table decodes");
    table.parts.iter().map(|p| p.bytes).max().unwrap_or(0)
}

/// Total bytes of a plan and its part files.
pub fn shipped_bytes(plan: &Path) -> u64 {
    let dir = plan.parent().unwrap_or(Path::new("."));
    let stem = plan.file_stem().unwrap().to_string_lossy().to_string();
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name == format!("{stem}.fdp")
                || (name.starts_with(&format!("{stem}.part")) && name.ends_with(".fdw"))
        })
        .map(|e| e.metadata().unwrap().len())
        .sum()
}
