//! `code` owns the executable mapping of a plan's code section: it copies the machine code `fdc`
//! generated ahead of time into fresh memory, flips that memory to read+execute, and hands out
//! typed entry points (the function types of [`artifacts::code_abi`]).
//!
//! The memory is writable only while it is being filled and executable only afterwards, never both
//! at once. Nothing is linked or patched: the code section is position-independent and has no
//! relocations, so loading is a copy and a protection change.

use std::mem::size_of;

use artifacts::code_abi::ENTRY_ALIGN;
use memmap2::{Mmap, MmapMut};

/// Why code could not be mapped or an entry point not produced.
#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    #[error("cannot map {len} bytes of code: {source}")]
    Map {
        len: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("code entry offset {offset} is outside the {len}-byte code section")]
    OutOfBounds { offset: usize, len: usize },
    #[error("code entry offset {offset} is not a multiple of {ENTRY_ALIGN}")]
    Misaligned { offset: usize },
    #[error("entry type is {size} bytes, not a function pointer")]
    NotAFunctionPointer { size: usize },
    #[error("the code section does not match its checksum (blake3 {found}, the plan records {expected}): the plan file changed or is damaged; nothing was mapped executable")]
    ChecksumMismatch { expected: String, found: String },
}

/// A plan's code section, mapped read+execute.
pub struct CodeImage {
    /// `None` for an empty code section: there is nothing to map.
    mapping: Option<Mmap>,
}

impl CodeImage {
    /// Copies `bytes` (a plan's code section) into fresh anonymous memory, then makes it
    /// read+exec (never writable and executable at once).
    pub fn load(bytes: &[u8]) -> Result<CodeImage, CodeError> {
        CodeImage::map_checked_copy(bytes, |_| Ok(()))
    }

    /// Like [`CodeImage::load`], but checks the private copy against `expected` (the section's
    /// blake3 from the plan's table) before making it executable. The plan file was verified
    /// when opened; checking the copy as well means the bytes that become executable are
    /// exactly the ones hashed, even if the file were changed in place after verification.
    pub fn load_checked(bytes: &[u8], expected: &[u8; 32]) -> Result<CodeImage, CodeError> {
        CodeImage::map_checked_copy(bytes, |copy| {
            let found = blake3::hash(copy);
            // `blake3::Hash` equality is constant-time; nothing here is secret, it is simply
            // the comparison the type offers.
            if found == blake3::Hash::from_bytes(*expected) {
                return Ok(());
            }
            Err(CodeError::ChecksumMismatch {
                expected: blake3::Hash::from_bytes(*expected).to_hex().to_string(),
                found: found.to_hex().to_string(),
            })
        })
    }

    /// Copies `bytes` into fresh writable memory, runs `check` on the copy, and only then makes
    /// it read+exec.
    fn map_checked_copy(
        bytes: &[u8],
        check: impl FnOnce(&[u8]) -> Result<(), CodeError>,
    ) -> Result<CodeImage, CodeError> {
        if bytes.is_empty() {
            check(bytes)?;
            return Ok(CodeImage { mapping: None });
        }
        let map_error = |source| CodeError::Map {
            len: bytes.len(),
            source,
        };
        let mut writable = MmapMut::map_anon(bytes.len()).map_err(map_error)?;
        writable.copy_from_slice(bytes);
        check(&writable)?;
        // Changing the protection of the pages the CPU will fetch from is the only
        // synchronization x86-64 needs between writing code and running it.
        let executable = writable.make_exec().map_err(map_error)?;
        Ok(CodeImage {
            mapping: Some(executable),
        })
    }

    /// Size of the code section in bytes.
    pub fn len(&self) -> usize {
        self.mapping.as_ref().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The function starting `offset` bytes into the code section, as a value of the function
    /// pointer type `F`.
    ///
    /// The offset must lie inside the section and be a multiple of [`ENTRY_ALIGN`]; `F` must be
    /// pointer-sized. The pointer stays valid as long as this image lives.
    ///
    /// # Safety
    /// `offset` must be the entry of a function of type `F` generated for this ABI (one of the
    /// [`artifacts::code_abi`] types), and the caller must not call it after dropping `self`.
    pub unsafe fn entry<F: Copy>(&self, offset: usize) -> Result<F, CodeError> {
        let size = size_of::<F>();
        if size != size_of::<*const u8>() {
            return Err(CodeError::NotAFunctionPointer { size });
        }
        let len = self.len();
        let base = match &self.mapping {
            Some(mapping) if offset < len => mapping.as_ptr(),
            _ => return Err(CodeError::OutOfBounds { offset, len }),
        };
        if !offset.is_multiple_of(ENTRY_ALIGN) {
            return Err(CodeError::Misaligned { offset });
        }
        // SAFETY: `offset < len`, so the address is inside the mapping.
        let address = unsafe { base.add(offset) };
        // SAFETY: `F` is pointer-sized (checked above) and, by the caller's promise, a function
        // pointer type whose code starts at `address`.
        Ok(unsafe { std::mem::transmute_copy::<*const u8, F>(&address) })
    }
}

impl std::fmt::Debug for CodeImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodeImage")
            .field("len", &self.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// x86-64 for `mov eax, imm32; ret`: a function returning `value`.
    fn returns(value: u32) -> Vec<u8> {
        let mut code = vec![0xB8];
        code.extend_from_slice(&value.to_le_bytes());
        code.push(0xC3);
        code
    }

    /// A section with one small function at each multiple of `ENTRY_ALIGN`, padded with `int3`.
    fn section(values: &[u32]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for &value in values {
            let mut function = returns(value);
            function.resize(ENTRY_ALIGN, 0xCC);
            bytes.extend_from_slice(&function);
        }
        bytes
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn loaded_functions_run_and_return_their_values() {
        let values = [7, 42, 0xDEAD_BEEF];
        let image = CodeImage::load(&section(&values)).expect("load");
        assert_eq!(image.len(), values.len() * ENTRY_ALIGN);
        for (index, &value) in values.iter().enumerate() {
            // SAFETY: each slot of the section holds a `extern "C" fn() -> u32`.
            let function: extern "C" fn() -> u32 =
                unsafe { image.entry(index * ENTRY_ALIGN) }.expect("entry");
            assert_eq!(function(), value, "function {index}");
        }
    }

    #[test]
    fn bad_offsets_and_types_are_refused() {
        let image = CodeImage::load(&section(&[1, 2])).expect("load");
        let len = 2 * ENTRY_ALIGN;
        type Entry = extern "C" fn() -> u32;
        #[derive(Debug)]
        enum Refusal {
            OutOfBounds,
            Misaligned,
        }
        let cases = [
            (len, Refusal::OutOfBounds),
            (len + ENTRY_ALIGN, Refusal::OutOfBounds),
            (usize::MAX, Refusal::OutOfBounds),
            (1, Refusal::Misaligned),
            (ENTRY_ALIGN + 16, Refusal::Misaligned),
        ];
        for (offset, expected) in cases {
            // SAFETY: every case is refused before any pointer is formed.
            let result = unsafe { image.entry::<Entry>(offset) };
            let refused_as_expected = match expected {
                Refusal::OutOfBounds => matches!(result, Err(CodeError::OutOfBounds { .. })),
                Refusal::Misaligned => matches!(result, Err(CodeError::Misaligned { .. })),
            };
            assert!(
                refused_as_expected,
                "offset {offset}: expected {expected:?}, got {result:?}"
            );
        }
        // SAFETY: refused for its size before any pointer is formed.
        let wide = unsafe { image.entry::<[usize; 2]>(0) };
        assert!(matches!(wide, Err(CodeError::NotAFunctionPointer { size }) if size == 16));
    }

    #[test]
    fn an_empty_section_maps_nothing_and_has_no_entries() {
        let image = CodeImage::load(&[]).expect("load");
        assert!(image.is_empty());
        // SAFETY: refused before any pointer is formed.
        let result = unsafe { image.entry::<extern "C" fn()>(0) };
        assert!(matches!(
            result,
            Err(CodeError::OutOfBounds { offset: 0, len: 0 })
        ));
    }

    #[test]
    fn code_that_does_not_match_its_checksum_is_never_mapped() {
        let bytes = section(&[3, 5, 9]);
        let right = *blake3::hash(&bytes).as_bytes();
        let image = CodeImage::load_checked(&bytes, &right).expect("matching code loads");
        assert_eq!(image.mapping.as_deref(), Some(&bytes[..]));
        let mut changed = bytes.clone();
        changed[1] ^= 1;
        for (label, code, expected) in [
            ("one bit changed", &changed[..], right),
            ("empty section", &[][..], right),
            ("another checksum", &bytes[..], [0u8; 32]),
        ] {
            let result = CodeImage::load_checked(code, &expected);
            assert!(
                matches!(result, Err(CodeError::ChecksumMismatch { .. })),
                "{label}: {result:?}"
            );
        }
        let empty = *blake3::hash(&[]).as_bytes();
        assert!(CodeImage::load_checked(&[], &empty)
            .expect("empty")
            .is_empty());
    }

    #[test]
    fn the_mapping_holds_the_bytes_given() {
        let bytes = section(&[3, 5, 9]);
        let image = CodeImage::load(&bytes).expect("load");
        let mapped = image.mapping.as_deref().expect("mapping");
        assert_eq!(mapped, &bytes[..]);
    }
}
