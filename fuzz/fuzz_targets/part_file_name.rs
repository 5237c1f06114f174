//! The strict parser of weight snapshot file names (`NAME.tp{rank}.{snapshot_id}.part{N}.fdw`)
//! and the snapshot id check, on arbitrary text: a name either parses back to the file name it
//! came from or is refused.

#![no_main]

use artifacts::parts::{check_snapshot_id, parse_snapshot_part_file, snapshot_part_file};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = check_snapshot_id(text);
    if let Ok(parsed) = parse_snapshot_part_file(text) {
        let index = parsed.index as usize;
        assert_eq!(snapshot_part_file(&parsed.name, &parsed.tag, index), text);
    }
});
