//! The decoders of a plan's structured sections on arbitrary bytes: the manifest of every
//! format version the reader accepts (`schema::decode_manifest`), the program, the parts table
//! and a part file's header. The first input byte picks the format version.

#![no_main]

use artifacts::parts::{PartHeader, PartsTable, PARTS_SECTION, PART_SECTION};
use artifacts::schema::{self, section, Program};
use artifacts::{FORMAT_VERSION, OLDEST_FORMAT_VERSION};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    let versions = FORMAT_VERSION - OLDEST_FORMAT_VERSION + 1;
    let version = OLDEST_FORMAT_VERSION + u32::from(pick) % versions;
    let _ = schema::decode_manifest(bytes, version);
    let _ = artifacts::codec::decode::<Program>(section::PROGRAM, bytes);
    let _ = artifacts::codec::decode::<PartsTable>(PARTS_SECTION, bytes);
    let _ = artifacts::codec::decode::<PartHeader>(PART_SECTION, bytes);
});
