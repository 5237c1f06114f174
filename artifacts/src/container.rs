//! `container` owns the `.fdp` file layout: the fixed header, the 4096-aligned sections, the
//! section table, the streaming `PlanWriter` and the mmap-backed `PlanFile` reader.
//!
//! Layout (every integer little-endian, every offset absolute from the start of the file):
//!
//! ```text
//! 0      header (104 bytes), then zero padding to 4096
//!          0  magic            [u8; 8]   b"\x89FDPLAN\n"
//!          8  format_version   u32       FORMAT_VERSION
//!         12  flags            u32       0; no flags are defined in version 1
//!         16  file_len         u64       length of the whole file
//!         24  table_offset     u64       multiple of 4096
//!         32  table_len        u64       table_offset + table_len == file_len
//!         40  table_blake3     [u8; 32]  blake3 of the table bytes
//!         72  header_blake3    [u8; 32]  blake3 of header bytes 0..72
//! 4096   section data in the order added, each at a multiple of its alignment (a power of two,
//!        at least 4096; fdc writes 4096), zero padding between
//! ...    section table (at a multiple of 4096, last in the file)
//!          entry_count u32, then per entry, in ascending offset order:
//!          name_len u32, name [u8; name_len] (UTF-8), kind u8, offset u64, len u64,
//!          alignment u64, blake3 [u8; 32]
//! ```
//!
//! Every byte is covered by a check: the header by its own hash, sections and table by theirs,
//! padding by having to be zero. Magic and version sit at fixed offsets in every format version,
//! so any reader can tell a plan from a foreign file and report a version mismatch.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::PlanError;

// `cast_f32`/`cast_u16` reinterpret the little-endian bytes of a plan in place.
#[cfg(target_endian = "big")]
compile_error!("fdc plans store numbers little-endian and are read in place: big-endian targets are not supported");

/// First eight bytes of every plan. The high-bit first byte and the trailing newline catch
/// transfers that strip the eighth bit or rewrite line endings.
pub const MAGIC: [u8; 8] = *b"\x89FDPLAN\n";

/// Version of the format (layout, and the schema of the sections) this crate writes. Bump it on
/// any change to either.
///
/// History: 2, single-file plans. 3, plans may ship their weights in part files: a `parts`
/// section replaces the weight sections, and part files (`.fdw`) use this same container (see
/// `parts`); the layout and every other section are unchanged, so version 2 plans still load.
/// 4, quantized weights: an optional `quant` section holds each quantized weight's
/// `QuantInfo` (the manifest itself is unchanged, so versions 2 and 3 still load).
/// 5, multi-head latent attention and group-limited expert routing: a `MlaAttention` launch and
/// a `SigmoidGrouped` routing, both appended to their enums, so version 4 programs still decode.
/// 6, CUDA targets: `Target::Cuda` appended to the target enum, and a CUDA plan's code section
/// holds its module (`code_abi::CUDA_CUBIN`, `code_abi::CUDA_PTX`); older plans are unchanged.
/// 7, RoPE fused into attention: an `AttentionRope` launch appended to the launch enum, so
/// version 6 programs still decode.
/// 8, A8 and FP8 on CUDA: the quantized CUDA matmuls take each row's activation scale, so the
/// runtime refuses CUDA plans of version 7 and older that have quantized weights (their modules'
/// matmuls take other arguments); every other plan reads unchanged.
pub const FORMAT_VERSION: u32 = 8;

/// Oldest format version `PlanFile::open` still reads; older files are refused with a message
/// to recompile. Version 2 files read as version 3 files without parts.
pub const OLDEST_FORMAT_VERSION: u32 = 2;

/// Every section (and the table) starts at a multiple of this, so that data viewed through the
/// page-aligned mmap is 4096-aligned in memory too.
pub const SECTION_ALIGNMENT: u64 = 4096;

/// Bytes of header fields; the rest of the first page is zero padding.
const HEADER_LEN: usize = 104;
/// Bytes the header hash covers: every field before the hash itself.
const HEADER_HASHED_LEN: usize = 72;
/// Smallest possible table entry: a one-byte name.
const MIN_ENTRY_LEN: usize = 4 + 1 + 1 + 8 + 8 + 8 + 32;
const MAX_SECTION_NAME_LEN: usize = 1024;
/// Called with each section's byte range once its checksum is computed.
type Hashed<'a> = &'a (dyn Fn(std::ops::Range<usize>) + Sync);

/// Below this many section bytes, spawning threads costs more than hashing on one.
const PARALLEL_VERIFY_MIN_BYTES: u64 = 64 << 20;
static ZEROS: [u8; SECTION_ALIGNMENT as usize] = [0; SECTION_ALIGNMENT as usize];

/// What a section holds; stored in the table as one byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SectionKind {
    Manifest = 0,
    Program = 1,
    Code = 2,
    Weights = 3,
    Tokenizer = 4,
    Other = 5,
}

impl SectionKind {
    /// Every kind, in byte order.
    pub const ALL: [SectionKind; 6] = [
        SectionKind::Manifest,
        SectionKind::Program,
        SectionKind::Code,
        SectionKind::Weights,
        SectionKind::Tokenizer,
        SectionKind::Other,
    ];

    /// The byte stored in the section table.
    pub fn to_u8(self) -> u8 {
        self as u8
    }

    /// The kind stored as `byte`, or `None` for a byte no kind uses.
    pub fn from_u8(byte: u8) -> Option<SectionKind> {
        SectionKind::ALL
            .into_iter()
            .find(|kind| kind.to_u8() == byte)
    }

    /// Lower-case name, as `fdc inspect` prints it.
    pub fn name(self) -> &'static str {
        match self {
            SectionKind::Manifest => "manifest",
            SectionKind::Program => "program",
            SectionKind::Code => "code",
            SectionKind::Weights => "weights",
            SectionKind::Tokenizer => "tokenizer",
            SectionKind::Other => "other",
        }
    }
}

impl std::fmt::Display for SectionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One section as `PlanFile::sections` describes it, for `fdc inspect`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectionInfo {
    pub name: String,
    pub kind: SectionKind,
    /// Absolute offset in the file; a multiple of `alignment`.
    pub offset: u64,
    pub len: u64,
    pub alignment: u64,
    /// blake3 of the section bytes, lower-case hex.
    pub checksum: String,
}

/// What `PlanWriter::finish` wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanSummary {
    pub path: PathBuf,
    pub file_len: u64,
    pub section_count: usize,
    /// blake3 of the section table, lower-case hex. The table holds every section's name, kind,
    /// placement and checksum, so this identifies the plan's whole content.
    pub checksum: String,
}

/// A section table entry, as written and as read.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SectionEntry {
    name: String,
    kind: SectionKind,
    offset: u64,
    len: u64,
    alignment: u64,
    checksum: [u8; 32],
}

/// The header fields after magic and version.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Header {
    /// What the file says; always `FORMAT_VERSION` when writing.
    format_version: u32,
    file_len: u64,
    table_offset: u64,
    table_len: u64,
    table_checksum: [u8; 32],
}

impl Header {
    // Written by hand rather than with bincode: magic and version must stay at fixed offsets that
    // any future reader can parse without knowing the rest of this version's layout, so that it
    // can report a version mismatch instead of a decode error.
    fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut bytes = [0u8; HEADER_LEN];
        let fields: [&[u8]; 7] = [
            &MAGIC,
            &FORMAT_VERSION.to_le_bytes(),
            &0u32.to_le_bytes(),
            &self.file_len.to_le_bytes(),
            &self.table_offset.to_le_bytes(),
            &self.table_len.to_le_bytes(),
            &self.table_checksum,
        ];
        let mut at = 0;
        for field in fields {
            bytes[at..at + field.len()].copy_from_slice(field);
            at += field.len();
        }
        let header_checksum = blake3::hash(&bytes[..HEADER_HASHED_LEN]);
        bytes[HEADER_HASHED_LEN..].copy_from_slice(header_checksum.as_bytes());
        bytes
    }

    /// Parses and checks the header of `file`, in the order that gives the most useful error:
    /// foreign file, version, truncation inside the header, header checksum, then the fields.
    fn parse(file: &[u8], path: &Path) -> Result<Header, PlanError> {
        let actual = file.len() as u64;
        let not_a_plan = || PlanError::NotAPlan {
            path: path.to_owned(),
        };
        let truncated = |expected: usize| PlanError::Truncated {
            expected: expected as u64,
            actual,
        };
        if file.len() < MAGIC.len() {
            // A non-empty prefix of the magic is a plan cut short; anything else is foreign.
            return Err(if !file.is_empty() && MAGIC.starts_with(file) {
                truncated(HEADER_LEN)
            } else {
                not_a_plan()
            });
        }
        let mut reader = ByteReader::new(file);
        if reader.take(MAGIC.len()) != Some(&MAGIC[..]) {
            return Err(not_a_plan());
        }
        let version = reader.u32().ok_or_else(|| truncated(HEADER_LEN))?;
        if version > FORMAT_VERSION {
            return Err(PlanError::NewerVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        if version < OLDEST_FORMAT_VERSION {
            return Err(PlanError::OlderVersion {
                found: version,
                supported: OLDEST_FORMAT_VERSION,
            });
        }
        let hashed = file
            .get(..HEADER_HASHED_LEN)
            .ok_or_else(|| truncated(HEADER_LEN))?;
        let Some((flags, mut header, header_checksum)) = Header::read_fields(&mut reader) else {
            return Err(truncated(HEADER_LEN));
        };
        header.format_version = version;
        if blake3::hash(hashed) != blake3::Hash::from_bytes(header_checksum) {
            return Err(header_corrupt("header checksum does not match".into()));
        }
        if flags != 0 {
            return Err(header_corrupt(format!(
                "flags {flags:#x} are not defined in format version {FORMAT_VERSION}"
            )));
        }
        let Header {
            file_len,
            table_offset,
            table_len,
            ..
        } = header;
        if actual < file_len {
            return Err(PlanError::Truncated {
                expected: file_len,
                actual,
            });
        }
        if actual > file_len {
            return Err(header_corrupt(format!(
                "header records {file_len} bytes but the file has {actual}"
            )));
        }
        if table_offset < SECTION_ALIGNMENT
            || table_offset % SECTION_ALIGNMENT != 0
            || table_offset.checked_add(table_len) != Some(file_len)
        {
            return Err(table_corrupt(format!(
                "table at offset {table_offset} with {table_len} bytes does not fill the end of a {file_len}-byte file"
            )));
        }
        Ok(header)
    }

    /// The fields after the version: flags, the `Header`, and the header's own checksum.
    fn read_fields(reader: &mut ByteReader<'_>) -> Option<(u32, Header, [u8; 32])> {
        let flags = reader.u32()?;
        // Field initializers run in the order written, which is the order on disk.
        let header = Header {
            format_version: FORMAT_VERSION,
            file_len: reader.u64()?,
            table_offset: reader.u64()?,
            table_len: reader.u64()?,
            table_checksum: reader.array32()?,
        };
        Some((flags, header, reader.array32()?))
    }
}

fn header_corrupt(reason: String) -> PlanError {
    PlanError::HeaderCorrupt { reason }
}

fn table_corrupt(reason: String) -> PlanError {
    PlanError::TableCorrupt { reason }
}

/// Why `name` cannot be a section name, if it cannot. Control characters are refused so that
/// `fdc inspect` output and error messages stay one readable line.
fn section_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_SECTION_NAME_LEN {
        Some("it is longer than 1024 bytes")
    } else if name.chars().any(char::is_control) {
        Some("it contains a control character")
    } else {
        None
    }
}

fn encode_table(entries: &[SectionEntry]) -> Result<Vec<u8>, PlanError> {
    let count = u32::try_from(entries.len()).map_err(|_| PlanError::Encode {
        message: format!(
            "{} sections exceed the table's limit of {}",
            entries.len(),
            u32::MAX
        ),
    })?;
    let mut table = Vec::with_capacity(4 + entries.len() * (MIN_ENTRY_LEN + 32));
    table.extend_from_slice(&count.to_le_bytes());
    for entry in entries {
        // Names were checked to be at most MAX_SECTION_NAME_LEN bytes.
        table.extend_from_slice(&(entry.name.len() as u32).to_le_bytes());
        table.extend_from_slice(entry.name.as_bytes());
        table.push(entry.kind.to_u8());
        table.extend_from_slice(&entry.offset.to_le_bytes());
        table.extend_from_slice(&entry.len.to_le_bytes());
        table.extend_from_slice(&entry.alignment.to_le_bytes());
        table.extend_from_slice(&entry.checksum);
    }
    Ok(table)
}

/// Parses the table bytes into entries; checks only what the bytes themselves say (lengths,
/// UTF-8, names, kinds), not where the entries point.
fn decode_table(table: &[u8]) -> Result<Vec<SectionEntry>, PlanError> {
    let mut reader = ByteReader::new(table);
    let count = reader
        .u32()
        .ok_or_else(|| table_corrupt("table is too short to hold its entry count".into()))?;
    // The count comes from the file: never reserve more than the table could possibly hold.
    let mut entries = Vec::with_capacity((count as usize).min(table.len() / MIN_ENTRY_LEN));
    for index in 0..count {
        let ends_inside = || table_corrupt(format!("table ends inside entry {index} of {count}"));
        let name_len = reader.u32().ok_or_else(ends_inside)?;
        let name_bytes = usize::try_from(name_len)
            .ok()
            .and_then(|len| reader.take(len))
            .ok_or_else(ends_inside)?;
        let name = std::str::from_utf8(name_bytes)
            .map_err(|_| table_corrupt(format!("entry {index} has a name that is not UTF-8")))?;
        if let Some(problem) = section_name_problem(name) {
            return Err(table_corrupt(format!(
                "entry {index} has an invalid name {name:?}: {problem}"
            )));
        }
        let kind_byte = reader.u8().ok_or_else(ends_inside)?;
        let kind = SectionKind::from_u8(kind_byte).ok_or_else(|| {
            table_corrupt(format!(
                "section '{name}' has kind {kind_byte}, which format version {FORMAT_VERSION} does not define"
            ))
        })?;
        let (Some(offset), Some(len), Some(alignment), Some(checksum)) =
            (reader.u64(), reader.u64(), reader.u64(), reader.array32())
        else {
            return Err(ends_inside());
        };
        entries.push(SectionEntry {
            name: name.to_owned(),
            kind,
            offset,
            len,
            alignment,
            checksum,
        });
    }
    if reader.remaining() != 0 {
        return Err(table_corrupt(format!(
            "{} bytes follow the last entry",
            reader.remaining()
        )));
    }
    Ok(entries)
}

/// Bounds-checked little-endian reads over bytes from a file; every read returns `None` rather
/// than panicking when the bytes run out.
struct ByteReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> ByteReader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        ByteReader { bytes, at: 0 }
    }

    fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.at)
    }

    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(len)?;
        let taken = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(taken)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[byte]| byte)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }

    fn array32(&mut self) -> Option<[u8; 32]> {
        self.array()
    }
}

/// Streams a plan to `<path>.tmp` and renames it to `path` in `finish`, so a failed or abandoned
/// compile never leaves a half-written plan at `path`. Section bytes are written as they are
/// added and only their table entries are kept, so a multi-GB plan is never held in memory.
///
/// The output depends only on the sections added, in order: no timestamps, no randomness.
pub struct PlanWriter {
    path: PathBuf,
    tmp_path: PathBuf,
    /// `None` once finished or after a failed write, which leaves the file unusable.
    out: Option<BufWriter<File>>,
    /// Bytes written so far, i.e. where the next byte goes.
    position: u64,
    entries: Vec<SectionEntry>,
    names: HashSet<String>,
    finished: bool,
}

impl PlanWriter {
    /// Starts a plan that `finish` will place at `path`, writing meanwhile to `<path>.tmp`
    /// (replaced if it exists, e.g. left by a crashed compile).
    pub fn create(path: impl AsRef<Path>) -> Result<PlanWriter, PlanError> {
        let path = path.as_ref().to_owned();
        let mut tmp_name = path.clone().into_os_string();
        tmp_name.push(".tmp");
        let tmp_path = PathBuf::from(tmp_name);
        let file = File::create(&tmp_path).map_err(PlanError::io(&tmp_path))?;
        let mut writer = PlanWriter {
            path,
            tmp_path,
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            position: 0,
            entries: Vec::new(),
            names: HashSet::new(),
            finished: false,
        };
        // The header page is written as zeros now and filled in by `finish`.
        writer.write(&ZEROS)?;
        Ok(writer)
    }

    /// Writes `bytes` out as section `name` at the next multiple of `SECTION_ALIGNMENT` and
    /// records its blake3. A refused name leaves the writer usable; a failed write does not.
    pub fn add_section(
        &mut self,
        name: &str,
        kind: SectionKind,
        bytes: &[u8],
    ) -> Result<(), PlanError> {
        if let Some(reason) = section_name_problem(name) {
            return Err(PlanError::InvalidSectionName {
                name: name.to_owned(),
                reason,
            });
        }
        if self.names.contains(name) {
            return Err(PlanError::DuplicateSection {
                name: name.to_owned(),
            });
        }
        self.pad_to_alignment()?;
        let offset = self.position;
        self.write(bytes)?;
        self.names.insert(name.to_owned());
        self.entries.push(SectionEntry {
            name: name.to_owned(),
            kind,
            offset,
            len: bytes.len() as u64,
            alignment: SECTION_ALIGNMENT,
            checksum: *blake3::hash(bytes).as_bytes(),
        });
        Ok(())
    }

    /// Writes the table, fills in the header, syncs, and renames the file into place.
    pub fn finish(mut self) -> Result<PlanSummary, PlanError> {
        self.pad_to_alignment()?;
        let table_offset = self.position;
        let table = encode_table(&self.entries)?;
        self.write(&table)?;
        let table_checksum = blake3::hash(&table);
        let header = Header {
            format_version: FORMAT_VERSION,
            file_len: self.position,
            table_offset,
            table_len: table.len() as u64,
            table_checksum: *table_checksum.as_bytes(),
        };
        let out = self.out.take().ok_or_else(|| self.closed())?;
        let tmp_io = |source| PlanError::Io {
            path: self.tmp_path.clone(),
            source,
        };
        let mut file = out.into_inner().map_err(|e| tmp_io(e.into_error()))?;
        file.seek(SeekFrom::Start(0))
            .and_then(|_| file.write_all(&header.to_bytes()))
            .and_then(|_| file.sync_all())
            .map_err(tmp_io)?;
        // Closed before the rename: some platforms refuse to rename an open file.
        drop(file);
        std::fs::rename(&self.tmp_path, &self.path).map_err(PlanError::io(&self.path))?;
        self.finished = true;
        sync_parent_dir(&self.path);
        Ok(PlanSummary {
            path: self.path.clone(),
            file_len: header.file_len,
            section_count: self.entries.len(),
            checksum: table_checksum.to_hex().to_string(),
        })
    }

    fn closed(&self) -> PlanError {
        PlanError::Io {
            path: self.tmp_path.clone(),
            source: std::io::Error::other("an earlier write to this plan failed"),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), PlanError> {
        let Some(out) = self.out.as_mut() else {
            return Err(self.closed());
        };
        if let Err(source) = out.write_all(bytes) {
            // The file no longer matches `position`: refuse every later write.
            self.out = None;
            return Err(PlanError::Io {
                path: self.tmp_path.clone(),
                source,
            });
        }
        self.position += bytes.len() as u64;
        Ok(())
    }

    fn pad_to_alignment(&mut self) -> Result<(), PlanError> {
        let padding = (SECTION_ALIGNMENT - self.position % SECTION_ALIGNMENT) % SECTION_ALIGNMENT;
        self.write(&ZEROS[..padding as usize])
    }
}

impl Drop for PlanWriter {
    fn drop(&mut self) {
        if !self.finished {
            // Closed first: some platforms refuse to remove an open file. Nothing useful can be
            // done about a failed removal of a temporary file while dropping.
            self.out = None;
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

/// Makes the rename durable. Best effort: the plan's bytes are already synced, and some
/// filesystems refuse to sync a directory.
fn sync_parent_dir(path: &Path) {
    #[cfg(unix)]
    {
        let parent = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        if let Ok(dir) = File::open(parent) {
            let _ = dir.sync_all();
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// A section of a checked plan, with its bytes' place in the file.
struct Section {
    entry: SectionEntry,
    data: Range<usize>,
}

/// Where everything lies in a plan whose header, table and section bounds have been checked.
/// Kept apart from the mapping so that the checks run over any byte slice.
struct Layout {
    sections: Vec<Section>,
    by_name: HashMap<String, usize>,
    table: Range<usize>,
    format_version: u32,
    table_checksum: [u8; 32],
}

impl Layout {
    /// Checks the header, the table (checksum and contents) and where every section lies.
    fn parse(file: &[u8], path: &Path) -> Result<Layout, PlanError> {
        let header = Header::parse(file, path)?;
        // `Header::parse` checked table_offset + table_len == file_len == file.len().
        let outside = || table_corrupt("section table lies outside the file".into());
        let table =
            to_range(header.table_offset, header.table_len, file.len()).ok_or_else(outside)?;
        let table_bytes = file.get(table.clone()).ok_or_else(outside)?;
        if blake3::hash(table_bytes) != blake3::Hash::from_bytes(header.table_checksum) {
            return Err(table_corrupt("table checksum does not match".into()));
        }
        let entries = decode_table(table_bytes)?;
        let (sections, by_name) = place_sections(entries, header.table_offset, file.len())?;
        Ok(Layout {
            sections,
            by_name,
            table,
            format_version: header.format_version,
            table_checksum: header.table_checksum,
        })
    }

    /// Checks every section against its blake3, then that all padding is zero.
    #[cfg(test)]
    fn verify(&self, file: &[u8]) -> Result<(), PlanError> {
        self.verify_with(file, PARALLEL_VERIFY_MIN_BYTES, &|_| {})
    }

    /// `verify`, hashing on several threads from `parallel_min_bytes` of section data on, and
    /// calling `hashed(range)` with each section's bytes once they are hashed.
    fn verify_with(
        &self,
        file: &[u8],
        parallel_min_bytes: u64,
        hashed: Hashed,
    ) -> Result<(), PlanError> {
        if let Some(bad) = self.first_failing_section(file, parallel_min_bytes, hashed) {
            return Err(PlanError::ChecksumMismatch {
                section: self.sections[bad].entry.name.clone(),
            });
        }
        self.check_padding(file)
    }

    fn section_matches(file: &[u8], section: &Section, hashed: Hashed) -> bool {
        let matches = file.get(section.data.clone()).is_some_and(|bytes| {
            blake3::hash(bytes) == blake3::Hash::from_bytes(section.entry.checksum)
        });
        hashed(section.data.clone());
        matches
    }

    /// Index of the first section (in file order) whose bytes fail their checksum.
    fn first_failing_section(
        &self,
        file: &[u8],
        parallel_min_bytes: u64,
        hashed: Hashed,
    ) -> Option<usize> {
        let total: u64 = self.sections.iter().map(|s| s.entry.len).sum();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(self.sections.len());
        if total < parallel_min_bytes || threads <= 1 {
            return self
                .sections
                .iter()
                .position(|s| !Layout::section_matches(file, s, hashed));
        }
        // Sections are handed out one at a time so that a few huge ones do not leave the other
        // threads idle; the lowest failing index is kept so the error does not depend on timing.
        let next = AtomicUsize::new(0);
        let first_failing = AtomicUsize::new(usize::MAX);
        let work = || loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            let Some(section) = self.sections.get(index) else {
                break;
            };
            if !Layout::section_matches(file, section, hashed) {
                first_failing.fetch_min(index, Ordering::Relaxed);
            }
        };
        std::thread::scope(|scope| {
            for _ in 1..threads {
                // A thread that cannot be spawned only costs parallelism: this one does the work.
                let _ = std::thread::Builder::new().spawn_scoped(scope, work);
            }
            work();
        });
        match first_failing.into_inner() {
            usize::MAX => None,
            index => Some(index),
        }
    }

    /// Every byte that is not header, section or table must be zero, as the writer left it.
    fn check_padding(&self, file: &[u8]) -> Result<(), PlanError> {
        let regions = self
            .sections
            .iter()
            .map(|s| s.data.clone())
            .chain(std::iter::once(self.table.clone()));
        let mut cursor = HEADER_LEN;
        for region in regions {
            let gap = file.get(cursor..region.start).unwrap_or_default();
            if let Some(at) = gap.iter().position(|&byte| byte != 0) {
                return Err(PlanError::CorruptPadding {
                    offset: (cursor + at) as u64,
                });
            }
            cursor = cursor.max(region.end);
        }
        Ok(())
    }
}

/// A plan mapped read-only into memory.
///
/// Alignment guarantee: every slice `section` or `require_section` returns starts at an address
/// that is a multiple of 4096 (the mapping is page-aligned and every section offset is a multiple
/// of `SECTION_ALIGNMENT`), so weight bytes can be viewed in place with `cast_f32`/`cast_u16`.
pub struct PlanFile {
    path: PathBuf,
    map: memmap2::Mmap,
    layout: Layout,
}

impl PlanFile {
    /// Maps and checks a plan, including the checksum of every section.
    pub fn open(path: impl AsRef<Path>) -> Result<PlanFile, PlanError> {
        let plan = PlanFile::open_unverified(path)?;
        plan.verify_all()?;
        Ok(plan)
    }

    /// Maps and checks a plan's header, table and section bounds, but not the section
    /// checksums: for tools that only list sections or read a few small ones.
    pub fn open_unverified(path: impl AsRef<Path>) -> Result<PlanFile, PlanError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(PlanError::io(path))?;
        // SAFETY: the mapping is only sound while nobody modifies the file. Plans are never
        // modified in place: `PlanWriter` writes a temporary file and renames it over the old
        // plan, which leaves this mapping on the old, unchanged file.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(PlanError::io(path))?;
        let layout = Layout::parse(&map, path)?;
        Ok(PlanFile {
            path: path.to_owned(),
            map,
            layout,
        })
    }

    /// Checks every section against its blake3, then that all padding is zero. Large plans are
    /// hashed on several threads.
    /// Each section's pages are dropped from this process once hashed (see
    /// [`PlanFile::release_resident`]), so that verifying a plan larger than memory does not
    /// count it all as this process's memory at once.
    pub fn verify_all(&self) -> Result<(), PlanError> {
        self.layout
            .verify_with(&self.map, PARALLEL_VERIFY_MIN_BYTES, &|range| {
                self.release_range(range)
            })
    }

    /// Drops the resident pages of `range` of the mapping, best effort (see `release_resident`).
    fn release_range(&self, range: std::ops::Range<usize>) {
        #[cfg(unix)]
        if range.start < range.end && range.end <= self.map.len() {
            // SAFETY: as in `release_resident`: a read-only mapping of a file never modified in
            // place, so every page reads back with the same bytes. Sections start on page
            // boundaries; a range's last partial page holds only its own bytes and padding.
            let _ = unsafe {
                self.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    range.start,
                    range.len(),
                )
            };
        }
    }

    /// The bytes of section `name`, 4096-aligned in memory.
    pub fn section(&self, name: &str) -> Option<&[u8]> {
        let index = *self.layout.by_name.get(name)?;
        self.map.get(self.layout.sections.get(index)?.data.clone())
    }

    /// The blake3 that the section table records for section `name`, which `open` checked the
    /// bytes against: for readers that copy a section and want to check the copy itself.
    pub fn section_checksum(&self, name: &str) -> Option<[u8; 32]> {
        let index = *self.layout.by_name.get(name)?;
        Some(self.layout.sections.get(index)?.entry.checksum)
    }

    /// Like `section`, but a missing section is an error that names it.
    pub fn require_section(&self, name: &str) -> Result<&[u8], PlanError> {
        self.section(name).ok_or_else(|| PlanError::MissingSection {
            name: name.to_owned(),
        })
    }

    /// Every section in file order.
    pub fn sections(&self) -> impl Iterator<Item = SectionInfo> + '_ {
        self.layout.sections.iter().map(|section| {
            let entry = &section.entry;
            SectionInfo {
                name: entry.name.clone(),
                kind: entry.kind,
                offset: entry.offset,
                len: entry.len,
                alignment: entry.alignment,
                checksum: blake3::Hash::from_bytes(entry.checksum)
                    .to_hex()
                    .to_string(),
            }
        })
    }

    /// The format version the file was written in (`OLDEST_FORMAT_VERSION..=FORMAT_VERSION`).
    pub fn format_version(&self) -> u32 {
        self.layout.format_version
    }

    /// blake3 of the section table, lower-case hex, as `PlanSummary::checksum` reported it when
    /// the file was written: it holds every section's checksum, so it identifies the content.
    pub fn checksum(&self) -> String {
        blake3::Hash::from_bytes(self.layout.table_checksum)
            .to_hex()
            .to_string()
    }

    /// Drops the mapping's resident pages from this process (they stay in the page cache and
    /// fault back in on the next read), so that verifying a large file does not leave it all
    /// counted as this process's memory. Part loading calls it after each part.
    pub fn release_resident(&self) -> Result<(), PlanError> {
        #[cfg(unix)]
        {
            // SAFETY: the mapping is read-only and backed by a file that is never modified in
            // place (see `open_unverified`), so after MADV_DONTNEED every page reads back with
            // the same bytes from the file; no slice into the mapping observes a change.
            unsafe {
                self.map
                    .unchecked_advise(memmap2::UncheckedAdvice::DontNeed)
            }
            .map_err(PlanError::io(&self.path))?;
        }
        Ok(())
    }

    /// Length of the whole plan file in bytes.
    pub fn file_len(&self) -> u64 {
        self.map.len() as u64
    }

    /// The path the plan was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// `offset..offset + len` as a range into a `file_len`-byte file, if it fits.
fn to_range(offset: u64, len: u64, file_len: usize) -> Option<Range<usize>> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    (end <= file_len).then_some(start..end)
}

/// Checks where the entries point: inside the data area (after the header page, before the
/// table), at a multiple of their alignment, in ascending order without overlap, names unique.
fn place_sections(
    entries: Vec<SectionEntry>,
    table_offset: u64,
    file_len: usize,
) -> Result<(Vec<Section>, HashMap<String, usize>), PlanError> {
    let mut sections: Vec<Section> = Vec::with_capacity(entries.len());
    let mut by_name = HashMap::with_capacity(entries.len());
    let mut previous_end = SECTION_ALIGNMENT;
    for entry in entries {
        let name = &entry.name;
        if by_name.contains_key(name) {
            return Err(PlanError::DuplicateSection { name: name.clone() });
        }
        let out_of_bounds = || PlanError::SectionOutOfBounds {
            name: name.clone(),
            offset: entry.offset,
            len: entry.len,
        };
        let end = entry
            .offset
            .checked_add(entry.len)
            .ok_or_else(out_of_bounds)?;
        if entry.offset < SECTION_ALIGNMENT || end > table_offset {
            return Err(out_of_bounds());
        }
        if !entry.alignment.is_power_of_two() || entry.alignment < SECTION_ALIGNMENT {
            return Err(table_corrupt(format!(
                "section '{name}' has alignment {}, not a power of two of at least {SECTION_ALIGNMENT}",
                entry.alignment
            )));
        }
        if entry.offset % entry.alignment != 0 {
            return Err(table_corrupt(format!(
                "section '{name}' at offset {} is not aligned to {}",
                entry.offset, entry.alignment
            )));
        }
        if entry.offset < previous_end {
            return Err(table_corrupt(format!(
                "section '{name}' at offset {} overlaps or precedes the section before it",
                entry.offset
            )));
        }
        let data = to_range(entry.offset, entry.len, file_len).ok_or_else(out_of_bounds)?;
        previous_end = end;
        by_name.insert(name.clone(), sections.len());
        sections.push(Section { entry, data });
    }
    Ok((sections, by_name))
}

/// Views `bytes` as `f32`s in place; `bytes` must be 4-byte aligned (any plan section is) and a
/// whole number of values.
pub fn cast_f32(bytes: &[u8]) -> Result<&[f32], PlanError> {
    check_castable(
        bytes,
        "f32",
        std::mem::size_of::<f32>(),
        std::mem::align_of::<f32>(),
    )?;
    if bytes.is_empty() {
        return Ok(&[]);
    }
    // SAFETY: alignment and length were checked above, every bit pattern is a valid f32, and the
    // result borrows `bytes`, so the memory outlives it and is not mutated meanwhile.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), bytes.len() / 4) })
}

/// Views `bytes` as `u16`s (f16/bf16 bit patterns) in place; `bytes` must be 2-byte aligned (any
/// plan section is) and a whole number of values.
pub fn cast_u16(bytes: &[u8]) -> Result<&[u16], PlanError> {
    check_castable(
        bytes,
        "u16",
        std::mem::size_of::<u16>(),
        std::mem::align_of::<u16>(),
    )?;
    if bytes.is_empty() {
        return Ok(&[]);
    }
    // SAFETY: as in `cast_f32`; every bit pattern is a valid u16.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<u16>(), bytes.len() / 2) })
}

fn check_castable(
    bytes: &[u8],
    type_name: &str,
    size: usize,
    align: usize,
) -> Result<(), PlanError> {
    if bytes.len() % size != 0 {
        return Err(PlanError::Misaligned {
            what: format!(
                "{} bytes are not a whole number of {size}-byte {type_name} values",
                bytes.len()
            ),
        });
    }
    // An empty slice may have a dangling, unaligned pointer; it views as an empty slice anyway.
    let misalignment = bytes.as_ptr() as usize % align;
    if !bytes.is_empty() && misalignment != 0 {
        return Err(PlanError::Misaligned {
            what: format!(
                "{type_name} data must be {align}-byte aligned but starts {misalignment} bytes past a boundary; slice sections at multiples of {size}"
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// A directory of its own for each test, removed when the test ends.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(label: &str) -> TempDir {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("artifacts-test-{}-{label}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn file(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const WEIGHTS: &str = "weights.model.layers.3.mlp.up_proj.weight";

    /// Bytes that differ from section to section and from zero padding.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    /// Sizes cover empty, tiny, exactly one page, one byte over a page, and several pages.
    fn sample_sections() -> Vec<(&'static str, SectionKind, Vec<u8>)> {
        vec![
            ("manifest", SectionKind::Manifest, pattern(37, 1)),
            ("program", SectionKind::Program, pattern(4096, 2)),
            ("code.cpu", SectionKind::Code, vec![]),
            (WEIGHTS, SectionKind::Weights, pattern(10_000, 3)),
            ("tokenizer", SectionKind::Tokenizer, pattern(4097, 4)),
            ("notes", SectionKind::Other, pattern(1, 5)),
        ]
    }

    fn write_plan(path: &Path, sections: &[(&str, SectionKind, Vec<u8>)]) -> PlanSummary {
        let mut writer = PlanWriter::create(path).unwrap();
        for (name, kind, bytes) in sections {
            writer.add_section(name, *kind, bytes).unwrap();
        }
        writer.finish().unwrap()
    }

    #[test]
    fn round_trip_gives_back_every_section_aligned() {
        let dir = TempDir::new("round-trip");
        let path = dir.file("plan.fdp");
        let sections = sample_sections();
        let summary = write_plan(&path, &sections);
        assert!(!dir.file("plan.fdp.tmp").exists());

        let plan = PlanFile::open(&path).unwrap();
        assert_eq!(summary.file_len, plan.file_len());
        assert_eq!(summary.file_len, std::fs::metadata(&path).unwrap().len());
        assert_eq!(summary.section_count, sections.len());
        assert_eq!(plan.path(), path);

        let infos: Vec<SectionInfo> = plan.sections().collect();
        assert_eq!(infos.len(), sections.len());
        for ((name, kind, bytes), info) in sections.iter().zip(&infos) {
            let read = plan.section(name).unwrap();
            assert_eq!(read, &bytes[..], "{name}");
            assert_eq!(plan.require_section(name).unwrap(), &bytes[..]);
            assert_eq!(
                read.as_ptr() as usize % 4096,
                0,
                "{name} is not 4096-aligned in memory"
            );
            assert_eq!(info.name, *name);
            assert_eq!(info.kind, *kind);
            assert_eq!(info.offset % SECTION_ALIGNMENT, 0, "{name}");
            assert_eq!(info.alignment, SECTION_ALIGNMENT);
            assert_eq!(info.len, bytes.len() as u64);
            assert_eq!(info.checksum, blake3::hash(bytes).to_hex().to_string());
        }
    }

    #[test]
    fn weights_can_be_viewed_in_place() {
        let dir = TempDir::new("cast");
        let path = dir.file("plan.fdp");
        let floats: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 3.0).collect();
        let halves: Vec<u16> = (0..999).map(|i| i * 7).collect();
        let float_bytes: Vec<u8> = floats.iter().flat_map(|f| f.to_le_bytes()).collect();
        let half_bytes: Vec<u8> = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
        write_plan(
            &path,
            &[
                ("f32", SectionKind::Weights, float_bytes),
                ("u16", SectionKind::Weights, half_bytes),
            ],
        );
        let plan = PlanFile::open(&path).unwrap();
        assert_eq!(cast_f32(plan.section("f32").unwrap()).unwrap(), &floats[..]);
        assert_eq!(cast_u16(plan.section("u16").unwrap()).unwrap(), &halves[..]);
    }

    struct CastCase {
        label: &'static str,
        /// Casts and returns the number of values.
        view: fn(&[u8]) -> Result<usize, PlanError>,
        /// Byte range of a 4096-aligned buffer, so its alignment is known.
        range: Range<usize>,
        /// The number of values, or a phrase the error must contain.
        expected: Result<usize, &'static str>,
    }

    #[test]
    fn casts_refuse_misaligned_or_ragged_bytes() {
        let dir = TempDir::new("cast-errors");
        let path = dir.file("plan.fdp");
        write_plan(&path, &[("buffer", SectionKind::Other, vec![0; 32])]);
        let plan = PlanFile::open(&path).unwrap();
        let aligned = plan.section("buffer").unwrap();
        let f32s = |b: &[u8]| cast_f32(b).map(<[f32]>::len);
        let u16s = |b: &[u8]| cast_u16(b).map(<[u16]>::len);
        let case = |label, view, range, expected| CastCase {
            label,
            view,
            range,
            expected,
        };
        let cases = [
            case("f32 aligned", f32s, 0..32, Ok(8)),
            case("f32 empty", f32s, 3..3, Ok(0)),
            case("f32 off by one", f32s, 1..9, Err("4-byte aligned")),
            case("f32 ragged", f32s, 0..6, Err("6 bytes")),
            case("u16 aligned", u16s, 2..32, Ok(15)),
            case("u16 empty", u16s, 1..1, Ok(0)),
            case("u16 off by one", u16s, 1..5, Err("2-byte aligned")),
            case("u16 ragged", u16s, 0..3, Err("3 bytes")),
        ];
        for CastCase {
            label,
            view,
            range,
            expected,
        } in cases
        {
            match (view(&aligned[range]), expected) {
                (Ok(len), Ok(expected)) => assert_eq!(len, expected, "{label}"),
                (Err(err @ PlanError::Misaligned { .. }), Err(needle)) => {
                    assert!(err.to_string().contains(needle), "{label}: {err}")
                }
                (other, _) => panic!("{label}: unexpected {other:?}"),
            }
        }
        assert_eq!(cast_f32(&[]).unwrap(), &[] as &[f32]);
    }

    #[test]
    fn same_sections_give_identical_files() {
        let dir = TempDir::new("determinism");
        let first = write_plan(&dir.file("a.fdp"), &sample_sections());
        let second = write_plan(&dir.file("b.fdp"), &sample_sections());
        assert_eq!(first.checksum, second.checksum);
        assert_eq!(
            std::fs::read(dir.file("a.fdp")).unwrap(),
            std::fs::read(dir.file("b.fdp")).unwrap()
        );
    }

    #[test]
    fn empty_plan_round_trips() {
        let dir = TempDir::new("empty");
        let path = dir.file("plan.fdp");
        let summary = write_plan(&path, &[]);
        assert_eq!(summary.file_len, SECTION_ALIGNMENT + 4);
        let plan = PlanFile::open(&path).unwrap();
        assert_eq!(plan.sections().count(), 0);
    }

    #[test]
    fn finishing_replaces_an_existing_plan() {
        let dir = TempDir::new("replace");
        let path = dir.file("plan.fdp");
        std::fs::write(&path, b"an older plan").unwrap();
        write_plan(&path, &sample_sections());
        assert!(PlanFile::open(&path).is_ok());
    }

    /// The exact bytes of a small plan. If this changes, the on-disk format changed: bump
    /// FORMAT_VERSION and update docs/ARCHITECTURE.md.
    #[test]
    fn layout_is_frozen_for_this_format_version() {
        let dir = TempDir::new("layout");
        let path = dir.file("plan.fdp");
        write_plan(
            &path,
            &[
                ("manifest", SectionKind::Manifest, b"{}".to_vec()),
                ("weights.w", SectionKind::Weights, vec![1; 5000]),
            ],
        );
        let bytes = std::fs::read(&path).unwrap();
        let header = Header::parse(&bytes, &path).unwrap();
        let table = &bytes[header.table_offset as usize..];
        let mut dump = format!(
            "header: {:02x?}\nfile_len {} table_offset {} table_len {}\n",
            &bytes[..24],
            header.file_len,
            header.table_offset,
            header.table_len
        );
        for entry in decode_table(table).unwrap() {
            dump += &format!(
                "{} {} offset {} len {} alignment {}\n",
                entry.name, entry.kind, entry.offset, entry.len, entry.alignment
            );
        }
        dump += &format!("table: {:02x?}\n", &table[..4 + 4 + 8 + 1 + 8]);
        dump += &format!("file blake3 {}", blake3::hash(&bytes).to_hex());
        insta::assert_snapshot!(dump, @r"
        header: [89, 46, 44, 50, 4c, 41, 4e, 0a, 08, 00, 00, 00, 00, 00, 00, 00, 8f, 40, 00, 00, 00, 00, 00, 00]
        file_len 16527 table_offset 16384 table_len 143
        manifest manifest offset 4096 len 2 alignment 4096
        weights.w weights offset 8192 len 5000 alignment 4096
        table: [02, 00, 00, 00, 08, 00, 00, 00, 6d, 61, 6e, 69, 66, 65, 73, 74, 00, 00, 10, 00, 00, 00, 00, 00, 00]
        file blake3 748fc7c0f0ef280effc885a96b5148a201007ecdb494c235c9e343a27e389a83
        ");
    }

    #[test]
    fn dropping_a_writer_without_finish_leaves_no_file() {
        let dir = TempDir::new("abandon");
        let path = dir.file("plan.fdp");
        {
            let mut writer = PlanWriter::create(&path).unwrap();
            writer
                .add_section("manifest", SectionKind::Manifest, b"{}")
                .unwrap();
            assert!(dir.file("plan.fdp.tmp").exists());
        }
        assert!(!path.exists());
        assert!(!dir.file("plan.fdp.tmp").exists());
    }

    #[test]
    fn writer_refuses_bad_or_repeated_names() {
        let dir = TempDir::new("names");
        let mut writer = PlanWriter::create(dir.file("plan.fdp")).unwrap();
        writer
            .add_section("manifest", SectionKind::Manifest, b"{}")
            .unwrap();
        let long = "x".repeat(MAX_SECTION_NAME_LEN + 1);
        let cases: [(&str, &str); 4] = [
            ("manifest", "appears twice"),
            ("", "empty"),
            (&long, "longer than 1024"),
            ("tab\there", "control character"),
        ];
        for (name, needle) in cases {
            let err = writer
                .add_section(name, SectionKind::Other, b"x")
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    PlanError::DuplicateSection { .. } | PlanError::InvalidSectionName { .. }
                ),
                "{name:?}: {err:?}"
            );
            assert!(err.to_string().contains(needle), "{name:?}: {err}");
        }
        // A refused section leaves the writer usable.
        writer
            .add_section("notes", SectionKind::Other, b"ok")
            .unwrap();
        let summary = writer.finish().unwrap();
        assert_eq!(summary.section_count, 2);
    }

    #[test]
    fn missing_sections_are_named() {
        let dir = TempDir::new("missing");
        let path = dir.file("plan.fdp");
        write_plan(&path, &sample_sections());
        let plan = PlanFile::open(&path).unwrap();
        assert!(plan.section("program.gpu").is_none());
        let err = plan.require_section("program.gpu").unwrap_err();
        assert!(matches!(&err, PlanError::MissingSection { name } if name == "program.gpu"));
        assert!(err.to_string().contains("'program.gpu'"), "{err}");
    }

    #[test]
    fn io_errors_name_the_path() {
        let dir = TempDir::new("io");
        let missing = dir.file("nowhere.fdp");
        let in_missing_dir = dir.file("no-such-dir").join("plan.fdp");
        let open = PlanFile::open(&missing).err().unwrap();
        let create = PlanWriter::create(&in_missing_dir).err().unwrap();
        for (err, needle) in [(open, "nowhere.fdp"), (create, "no-such-dir")] {
            assert!(matches!(err, PlanError::Io { .. }), "{err:?}");
            assert!(err.to_string().contains(needle), "{err}");
        }
    }

    /// Where in a valid plan a damage applies.
    #[derive(Clone, Copy, Debug)]
    enum At {
        Start(u64),
        /// Bytes past the start of the named section.
        Section(&'static str, u64),
        /// Bytes past the start of the table.
        Table(u64),
        /// Bytes before the end of the file.
        End(u64),
    }

    #[derive(Clone, Debug)]
    enum Damage {
        TruncateAt(At),
        Flip(At),
        SetVersion(u32),
        Append(usize),
        Replace(Vec<u8>),
    }

    fn resolve(at: At, plan: &[u8]) -> usize {
        let header = Header::parse(plan, Path::new("plan")).unwrap();
        let entries = decode_table(&plan[header.table_offset as usize..]).unwrap();
        let offset = match at {
            At::Start(offset) => offset,
            At::Section(name, offset) => {
                entries.iter().find(|e| e.name == name).unwrap().offset + offset
            }
            At::Table(offset) => header.table_offset + offset,
            At::End(back) => header.file_len - back,
        };
        offset as usize
    }

    fn damaged(plan: &[u8], damage: &Damage) -> Vec<u8> {
        let mut bytes = plan.to_vec();
        match damage {
            Damage::TruncateAt(at) => bytes.truncate(resolve(*at, plan)),
            Damage::Flip(at) => bytes[resolve(*at, plan)] ^= 0x40,
            Damage::SetVersion(version) => bytes[8..12].copy_from_slice(&version.to_le_bytes()),
            Damage::Append(count) => bytes.extend(std::iter::repeat_n(0u8, *count)),
            Damage::Replace(replacement) => bytes = replacement.clone(),
        }
        bytes
    }

    type Expectation = fn(&PlanError) -> bool;

    #[test]
    fn each_corruption_gives_its_error() {
        let dir = TempDir::new("corruption");
        let good_path = dir.file("good.fdp");
        write_plan(&good_path, &sample_sections());
        let good = std::fs::read(&good_path).unwrap();
        let len = good.len() as u64;
        let newer = FORMAT_VERSION + 1;
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        let text = b"weights: see plan.fdp\n".repeat(300);

        use Damage::*;
        let truncated: Expectation = |e| matches!(e, PlanError::Truncated { .. });
        let checksum: Expectation = |e| matches!(e, PlanError::ChecksumMismatch { .. });
        let header: Expectation = |e| matches!(e, PlanError::HeaderCorrupt { .. });
        let table: Expectation = |e| matches!(e, PlanError::TableCorrupt { .. });
        let padding: Expectation = |e| matches!(e, PlanError::CorruptPadding { .. });
        let foreign: Expectation = |e| matches!(e, PlanError::NotAPlan { .. });
        let newer_version: Expectation = |e| matches!(e, PlanError::NewerVersion { .. });
        let older_version: Expectation = |e| matches!(e, PlanError::OlderVersion { .. });
        let cases: Vec<(&str, Damage, Expectation, Vec<String>)> = vec![
            (
                "cut inside magic",
                TruncateAt(At::Start(5)),
                truncated,
                vec!["file has 5".into()],
            ),
            (
                "cut after version",
                TruncateAt(At::Start(12)),
                truncated,
                vec!["file has 12".into()],
            ),
            (
                "cut inside header",
                TruncateAt(At::Start(50)),
                truncated,
                vec!["expected 104".into()],
            ),
            (
                "cut in header page",
                TruncateAt(At::Start(1000)),
                truncated,
                vec![format!("expected {len} bytes, file has 1000")],
            ),
            (
                "cut inside section",
                TruncateAt(At::Section(WEIGHTS, 100)),
                truncated,
                vec![format!("expected {len}")],
            ),
            (
                "cut inside table",
                TruncateAt(At::Table(10)),
                truncated,
                vec![format!("expected {len}")],
            ),
            (
                "cut last byte",
                TruncateAt(At::End(1)),
                truncated,
                vec![format!("file has {}", len - 1)],
            ),
            (
                "flip in weights",
                Flip(At::Section(WEIGHTS, 5000)),
                checksum,
                vec![format!("'{WEIGHTS}'")],
            ),
            (
                "flip in 1-byte section",
                Flip(At::Section("notes", 0)),
                checksum,
                vec!["'notes'".into()],
            ),
            (
                "flip in magic",
                Flip(At::Start(3)),
                foreign,
                vec!["good.fdp".into()],
            ),
            (
                "flip in flags",
                Flip(At::Start(13)),
                header,
                vec!["header checksum".into()],
            ),
            (
                "flip in file length",
                Flip(At::Start(16)),
                header,
                vec!["header checksum".into()],
            ),
            (
                "flip in table offset",
                Flip(At::Start(25)),
                header,
                vec!["header checksum".into()],
            ),
            (
                "flip in table hash",
                Flip(At::Start(41)),
                header,
                vec!["header checksum".into()],
            ),
            (
                "flip in header hash",
                Flip(At::Start(100)),
                header,
                vec!["header checksum".into()],
            ),
            (
                "flip in header padding",
                Flip(At::Start(2000)),
                padding,
                vec!["offset 2000".into()],
            ),
            (
                "flip in section padding",
                Flip(At::Section("manifest", 40)),
                padding,
                vec!["padding".into()],
            ),
            (
                "flip in table count",
                Flip(At::Table(0)),
                table,
                vec!["table checksum".into()],
            ),
            (
                "flip in table entry",
                Flip(At::Table(20)),
                table,
                vec!["table checksum".into()],
            ),
            (
                "flip in last table byte",
                Flip(At::End(1)),
                table,
                vec!["table checksum".into()],
            ),
            (
                "newer version",
                SetVersion(newer),
                newer_version,
                vec![
                    format!("version {newer}"),
                    format!("supports ({FORMAT_VERSION})"),
                ],
            ),
            (
                "far newer version",
                SetVersion(u32::MAX),
                newer_version,
                vec![u32::MAX.to_string()],
            ),
            (
                "older version",
                SetVersion(0),
                older_version,
                vec!["version 0".into(), format!("({OLDEST_FORMAT_VERSION})")],
            ),
            (
                "trailing bytes",
                Append(3),
                header,
                vec![format!("file has {}", len + 3)],
            ),
            (
                "png file",
                Replace(png),
                foreign,
                vec!["good.fdp".into(), "bad magic".into()],
            ),
            (
                "text file",
                Replace(text),
                foreign,
                vec!["not an fdc plan".into()],
            ),
            (
                "empty file",
                Replace(vec![]),
                foreign,
                vec!["good.fdp".into()],
            ),
            (
                "magic only",
                Replace(MAGIC.to_vec()),
                truncated,
                vec!["file has 8".into()],
            ),
        ];
        let path = dir.file("good.fdp");
        for (label, damage, expected, needles) in cases {
            std::fs::write(&path, damaged(&good, &damage)).unwrap();
            let err = match PlanFile::open(&path) {
                Ok(_) => panic!("{label}: damaged plan opened"),
                Err(err) => err,
            };
            assert!(expected(&err), "{label}: unexpected {err:?}");
            let message = err.to_string();
            assert!(!message.contains('\n'), "{label}: {message}");
            for needle in needles {
                assert!(
                    message.contains(&needle),
                    "{label}: {message:?} lacks {needle:?}"
                );
            }
        }
    }

    #[test]
    fn unverified_open_defers_section_checksums() {
        let dir = TempDir::new("unverified");
        let path = dir.file("plan.fdp");
        write_plan(&path, &sample_sections());
        let good = std::fs::read(&path).unwrap();
        std::fs::write(
            &path,
            damaged(&good, &Damage::Flip(At::Section("program", 7))),
        )
        .unwrap();
        let plan = PlanFile::open_unverified(&path).unwrap();
        let err = plan.verify_all().unwrap_err();
        assert!(matches!(&err, PlanError::ChecksumMismatch { section } if section == "program"));
    }

    /// Rewrites the table of `plan` with `table` and fixes every length and checksum in the
    /// header, so that checks behind the checksums can be reached.
    fn resealed(plan: &[u8], table: &[u8]) -> Vec<u8> {
        let header = Header::parse(plan, Path::new("plan")).unwrap();
        let mut bytes = plan[..header.table_offset as usize].to_vec();
        bytes.extend_from_slice(table);
        let header = Header {
            file_len: bytes.len() as u64,
            table_len: table.len() as u64,
            table_checksum: *blake3::hash(table).as_bytes(),
            ..header
        };
        bytes[..HEADER_LEN].copy_from_slice(&header.to_bytes());
        bytes
    }

    fn table_of(plan: &[u8]) -> Vec<u8> {
        let header = Header::parse(plan, Path::new("plan")).unwrap();
        plan[header.table_offset as usize..].to_vec()
    }

    #[test]
    fn tables_that_pass_their_checksum_are_still_checked() {
        let dir = TempDir::new("resealed");
        let path = dir.file("plan.fdp");
        write_plan(&path, &sample_sections());
        let good = std::fs::read(&path).unwrap();
        let entries = decode_table(&table_of(&good)).unwrap();
        let table_offset = Header::parse(&good, &path).unwrap().table_offset;

        type EditEntries = fn(&mut Vec<SectionEntry>, u64);
        type EditBytes = fn(&mut Vec<u8>);
        enum Edit {
            Entries(EditEntries),
            Bytes(EditBytes),
        }
        let out_of_bounds: Expectation = |e| matches!(e, PlanError::SectionOutOfBounds { .. });
        let table: Expectation = |e| matches!(e, PlanError::TableCorrupt { .. });
        let cases: Vec<(&str, Edit, Expectation, &str)> = vec![
            (
                "duplicate name",
                Edit::Entries(|e, _| e[1].name = e[0].name.clone()),
                |e| matches!(e, PlanError::DuplicateSection { name } if name == "manifest"),
                "'manifest'",
            ),
            (
                "past the table",
                Edit::Entries(|e, table| e[3].len = table),
                out_of_bounds,
                WEIGHTS,
            ),
            (
                "length overflows",
                Edit::Entries(|e, _| e[3].len = u64::MAX),
                out_of_bounds,
                WEIGHTS,
            ),
            (
                "inside the header page",
                Edit::Entries(|e, _| e[0].offset = 0),
                out_of_bounds,
                "'manifest'",
            ),
            (
                "unaligned offset",
                Edit::Entries(|e, _| e[5].offset += 8),
                table,
                "not aligned",
            ),
            (
                "alignment not a power of two",
                Edit::Entries(|e, _| e[0].alignment = 4097),
                table,
                "alignment 4097",
            ),
            (
                "alignment too small",
                Edit::Entries(|e, _| e[0].alignment = 8),
                table,
                "alignment 8",
            ),
            (
                "overlap",
                Edit::Entries(|e, _| e[1].offset = e[0].offset),
                table,
                "overlaps",
            ),
            (
                "out of order",
                Edit::Entries(|e, _| e.swap(0, 1)),
                table,
                "overlaps or precedes",
            ),
            (
                "empty name",
                Edit::Entries(|e, _| e[2].name.clear()),
                table,
                "empty",
            ),
            (
                "control character",
                Edit::Entries(|e, _| e[2].name = "a\nb".into()),
                table,
                "control",
            ),
            (
                "wrong checksum",
                Edit::Entries(|e, _| e[4].checksum[0] ^= 1),
                |e| matches!(e, PlanError::ChecksumMismatch { section } if section == "tokenizer"),
                "'tokenizer'",
            ),
            // Entry 0: count (4) + name_len (4) + "manifest" (8), then the kind byte.
            (
                "unknown kind",
                Edit::Bytes(|t| t[16] = 200),
                table,
                "kind 200",
            ),
            (
                "name not UTF-8",
                Edit::Bytes(|t| t[8] = 0xff),
                table,
                "not UTF-8",
            ),
            (
                "count too high",
                Edit::Bytes(|t| t[0] += 1),
                table,
                "ends inside entry 6",
            ),
            (
                "count huge",
                Edit::Bytes(|t| t[..4].copy_from_slice(&u32::MAX.to_le_bytes())),
                table,
                "ends inside entry",
            ),
            (
                "name length huge",
                Edit::Bytes(|t| t[4..8].copy_from_slice(&u32::MAX.to_le_bytes())),
                table,
                "ends inside entry 0",
            ),
            (
                "trailing bytes",
                Edit::Bytes(|t| t.push(0)),
                table,
                "1 bytes follow",
            ),
            (
                "no count",
                Edit::Bytes(|t| t.truncate(2)),
                table,
                "entry count",
            ),
        ];
        for (label, edit, expected, needle) in cases {
            let table_bytes = match edit {
                Edit::Entries(edit) => {
                    let mut edited = entries.clone();
                    edit(&mut edited, table_offset);
                    encode_table(&edited).unwrap()
                }
                Edit::Bytes(edit) => {
                    let mut edited = table_of(&good);
                    edit(&mut edited);
                    edited
                }
            };
            std::fs::write(&path, resealed(&good, &table_bytes)).unwrap();
            let err = match PlanFile::open(&path) {
                Ok(_) => panic!("{label}: damaged plan opened"),
                Err(err) => err,
            };
            assert!(expected(&err), "{label}: unexpected {err:?}");
            assert!(
                err.to_string().contains(needle),
                "{label}: {err} lacks {needle:?}"
            );
        }
    }

    #[test]
    fn threaded_verification_reports_the_first_bad_section() {
        let dir = TempDir::new("threaded");
        let path = dir.file("plan.fdp");
        let sections: Vec<(String, Vec<u8>)> = (0..8)
            .map(|i| (format!("weights.{i}"), pattern(3000 + 1000 * i, i as u8)))
            .collect();
        let mut writer = PlanWriter::create(&path).unwrap();
        for (name, bytes) in &sections {
            writer
                .add_section(name, SectionKind::Weights, bytes)
                .unwrap();
        }
        writer.finish().unwrap();
        let good = std::fs::read(&path).unwrap();
        let layout = Layout::parse(&good, &path).unwrap();
        let offset_of = |i: usize| layout.sections[i].data.start;
        let cases: [(&str, &[usize], Option<&str>); 3] = [
            ("intact", &[], None),
            ("one bad", &[5], Some("weights.5")),
            ("two bad", &[6, 3], Some("weights.3")),
        ];
        for (label, damaged_sections, expected) in cases {
            let mut bytes = good.clone();
            for &i in damaged_sections {
                bytes[offset_of(i) + 17] ^= 0x10;
            }
            // Threshold 0: always take the threaded path (where the machine has several cores).
            match (layout.verify_with(&bytes, 0, &|_| {}), expected) {
                (Ok(()), None) => {}
                (Err(PlanError::ChecksumMismatch { section }), Some(name)) => {
                    assert_eq!(section, name, "{label}")
                }
                (other, _) => panic!("{label}: unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn kinds_round_trip_through_their_byte() {
        for kind in SectionKind::ALL {
            assert_eq!(SectionKind::from_u8(kind.to_u8()), Some(kind));
            assert_eq!(kind.to_string(), kind.name());
        }
        assert_eq!(SectionKind::from_u8(SectionKind::ALL.len() as u8), None);
    }

    /// xorshift64 (shifts 13, 7, 17): a few lines, no dependency, same sequence on every run, so
    /// a failure reproduces.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, bound: usize) -> usize {
            (self.next() % bound as u64) as usize
        }
    }

    /// `PlanFile::open` minus the file and the mapping, so thousands of cases run in memory.
    fn open_bytes(bytes: &[u8]) -> Result<(), PlanError> {
        Layout::parse(bytes, Path::new("fuzz.fdp"))?.verify(bytes)
    }

    #[test]
    fn random_damage_is_always_an_error_and_never_a_panic() {
        let dir = TempDir::new("fuzz");
        let path = dir.file("plan.fdp");
        write_plan(
            &path,
            &[
                ("manifest", SectionKind::Manifest, pattern(37, 1)),
                ("code", SectionKind::Code, vec![]),
                ("weights.w", SectionKind::Weights, pattern(5000, 2)),
            ],
        );
        let good = std::fs::read(&path).unwrap();
        assert!(open_bytes(&good).is_ok());
        let table_offset = Header::parse(&good, &path).unwrap().table_offset as usize;
        let table_len = good.len() - table_offset;
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for round in 0..2000 {
            let choice = rng.below(5);
            // Flips are aimed at the header and table half the time: uniform positions would
            // mostly land in padding and section data.
            let at = match choice {
                0 => rng.below(HEADER_LEN),
                1 => table_offset + rng.below(table_len),
                _ => rng.below(good.len()),
            };
            let mut bytes = good.clone();
            let label = if choice == 4 {
                bytes.truncate(at);
                format!("round {round}: cut at {at}")
            } else {
                bytes[at] ^= 1 << rng.below(8);
                format!("round {round}: flip at {at}")
            };
            // Every byte of a plan is covered by a check, so any damage must be caught.
            assert!(open_bytes(&bytes).is_err(), "{label} went undetected");
            if round % 100 == 0 {
                std::fs::write(&path, &bytes).unwrap();
                assert!(
                    PlanFile::open(&path).is_err(),
                    "{label} went undetected on disk"
                );
            }

            // The same flip behind fresh checksums reaches the structural checks, where some
            // edits (a renamed section) are legitimately valid: only panics are failures.
            if choice == 1 {
                let _ = open_bytes(&resealed(&good, &bytes[table_offset..]));
            }
        }
    }
}
