//! The `.fdp` container reader on arbitrary files: header, section table, section bounds and
//! checksums (`PlanFile::open_unverified`, then every section, then `verify_all`), and the
//! weight part header of part files. Any input must give a plan or an error, never a panic.

#![no_main]

use artifacts::parts::{PartHeader, PART_SECTION};
use artifacts::PlanFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fdc_fuzz::with_file("fdp", data, |path| {
        let Ok(plan) = PlanFile::open_unverified(path) else {
            return;
        };
        let _ = plan.format_version();
        let names: Vec<String> = plan.sections().map(|s| s.name).collect();
        for name in &names {
            let _ = plan.section(name);
        }
        let _ = plan.checksum();
        if plan.verify_all().is_ok() {
            if let Some(bytes) = plan.section(PART_SECTION) {
                let _ = artifacts::codec::decode::<PartHeader>(PART_SECTION, bytes);
            }
        }
    });
});
