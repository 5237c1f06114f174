//! `artifacts` owns the `.fdp` plan format: the schema (manifest, program), the container (magic,
//! version, aligned sections, a checksum per section), the writer and the reader.
//!
//! `parts` adds plans shipped in parts and weight snapshots for live updates; `calibration` is the
//! statistics file `fdrt calibrate` writes for `fdc compile --calibration` (GPTQ).
//!
//! The plan is the only thing `fdc` and `fdrt` share, so this crate names `ir::types` vocabulary and
//! nothing else of the workspace. Tests beside the code cover round trips and every corruption case.

pub mod calibration;
pub mod code_abi;
pub mod codec;
mod container;
mod error;
pub mod parts;
pub mod schema;
pub mod units;

pub use container::{
    cast_f32, cast_u16, PlanFile, PlanSummary, PlanWriter, SectionInfo, SectionKind,
    FORMAT_VERSION, MAGIC, OLDEST_FORMAT_VERSION, SECTION_ALIGNMENT,
};
pub use error::PlanError;
