//! Same-host KV transfer through shared memory: when a decode and a prefill instance run on one
//! machine, the blocks skip the socket. The decode instance creates an anonymous memory file
//! (`memfd`) the size of the blocks it asks for, reserves its pages, seals its size, and names
//! it in its request by its process id and descriptor; the prefill instance opens it through
//! `/proc/PID/fd/FD`, checks it is that region (a random tag the decode instance wrote in its
//! header, the seals, the size), and its engine thread copies each block straight from the KV
//! pool into it; the decode instance's engine thread seats them straight from it. One copy on
//! each side, no checksum (memory is not a lossy channel) and no socket; the control messages
//! still travel on the transfer connection. When the region cannot be opened (another host,
//! another PID namespace, no `/proc`) the prefill instance sends the blocks over the socket, and
//! the decode instance reads their frames straight into the same region: a receive buffer whose
//! pages are already touched.
//!
//! Why a sealed memfd and not a named file in `/dev/shm`: nothing is left behind when a process
//! dies, no name can be guessed or pointed elsewhere, and the seals mean the decode instance
//! cannot shrink the file under the prefill instance's mapping (a write past a shrunk file's end
//! would kill the prefill instance with SIGBUS). The pages are reserved with `fallocate` when the
//! region is made, so a full memory cgroup refuses the region then, not in the middle of a copy.
//!
//! Hand-written over `libc` because it is a few system calls (memfd_create, fallocate, the seal
//! fcntls) that no well-kept crate wraps together with the `/proc` open this needs.

use super::kept::{region_sizes, Held, Offer, Pools};
use super::wire::hex;
use memmap2::MmapMut;
use std::fs::File;

/// Bytes before the first block: the region's tag, padded so blocks start 64-byte aligned.
const HEADER_BYTES: usize = 64;
const TAG_BYTES: usize = 16;

/// What a decode instance's request says of its region.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SharedOffer {
    pub pid: u32,
    pub fd: i32,
    /// Hex of the random tag at the region's start.
    pub tag: String,
    /// The region's size, header included (at least what the blocks asked for need).
    pub bytes: u64,
}

/// A memory file and its mapping.
#[derive(Debug)]
struct Mapping {
    // Field order: the mapping goes before the file closes (either order is sound; this is the
    // natural one).
    map: MmapMut,
    file: File,
    tag: [u8; TAG_BYTES],
}

impl Offer for SharedOffer {
    fn pid(&self) -> u32 {
        self.pid
    }
}

/// Kept regions: a decode instance's own, free for its next transfer, and a prefill
/// instance's mappings of others', by the offer that named them.
static KEPT: Pools<SharedOffer, Mapping> = Pools::new();

/// A mapped shared-memory region with room for a transfer's blocks behind a small header,
/// held by one transfer at a time.
#[derive(Debug)]
pub struct SharedRegion {
    held: Held<SharedOffer, Mapping>,
}

impl SharedRegion {
    /// The decode side: a region for `blocks` blocks of `block_bytes`, one kept from an earlier
    /// transfer when one is large enough, else a new one (room for the next power of two of
    /// blocks, so that it fits later prompts too). `None` where shared memory cannot be had here
    /// (not Linux, memory refused): the transfer then goes over the socket.
    pub fn create(blocks: usize, block_bytes: usize) -> Option<SharedRegion> {
        let (need, room) = region_sizes(blocks, block_bytes, HEADER_BYTES)?;
        // Not one far larger than this transfer needs: a prefill instance maps only what it is
        // asked to fill, but the offer names the whole region.
        let mapping = match KEPT.made.take(None, need..=2 * room) {
            Some(mapping) => mapping,
            None => make(room)
                .map_err(|e| tracing::debug!(error = %e, "KV transfer: no shared memory region"))
                .ok()?,
        };
        let bytes = mapping.map.len();
        Some(SharedRegion {
            held: Held::new(&KEPT, mapping, bytes, None, blocks, block_bytes),
        })
    }

    /// How a request names this region to a prefill instance.
    pub fn offer(&self) -> Option<SharedOffer> {
        use std::os::fd::AsRawFd;
        let mapping = self.held.memory()?;
        Some(SharedOffer {
            pid: std::process::id(),
            fd: mapping.file.as_raw_fd(),
            tag: hex(&mapping.tag),
            bytes: mapping.map.len() as u64,
        })
    }

    /// The prefill side: opens the region `offer` names, if it is one made by
    /// [`SharedRegion::create`] on this host with room for `blocks` blocks of `block_bytes`
    /// (a mapping kept from an earlier transfer when there is one).
    pub fn open(offer: &SharedOffer, blocks: usize, block_bytes: usize) -> Result<Self, String> {
        let (need, _) =
            region_sizes(blocks, block_bytes, HEADER_BYTES).ok_or("the region's size overflows")?;
        if offer.bytes < need as u64 {
            return Err(format!(
                "a region of {} bytes offered for {need}",
                offer.bytes
            ));
        }
        let mapping = match KEPT.opened.take(Some(offer), need..=usize::MAX) {
            Some(mapping) => mapping,
            None => {
                let bytes = usize::try_from(offer.bytes).map_err(|_| "region too large")?;
                let file = sys::open_sealed(offer.pid, offer.fd, bytes)?;
                // Only what this transfer fills is mapped, whatever size the offer names.
                // SAFETY: a sealed memory file (checked above): it cannot shrink under the
                // mapping.
                let map = unsafe {
                    memmap2::MmapOptions::new()
                        .len(need)
                        .populate()
                        .map_mut(&file)
                }
                .map_err(|e| format!("mapping: {e}"))?;
                let tag: [u8; TAG_BYTES] = map[..TAG_BYTES]
                    .try_into()
                    .map_err(|_| "a region without its tag")?;
                Mapping { map, file, tag }
            }
        };
        if hex(&mapping.tag) != offer.tag {
            return Err("the descriptor names another region (not the same host?)".into());
        }
        let bytes = mapping.map.len();
        Ok(SharedRegion {
            held: Held::new(
                &KEPT,
                mapping,
                bytes,
                Some(offer.clone()),
                blocks,
                block_bytes,
            ),
        })
    }

    /// Lets the region be reused once dropped ([`Held::keep`]: only once the transfer ended
    /// with its `Done`).
    pub fn keep(&mut self) {
        self.held.keep();
    }

    /// Blocks the transfer asked room for.
    pub fn blocks(&self) -> usize {
        self.held.blocks
    }

    /// Block `i` of the region (`i < blocks()`).
    pub fn block(&self, i: usize) -> &[u8] {
        let (start, len) = (
            HEADER_BYTES + i * self.held.block_bytes,
            self.held.block_bytes,
        );
        match self.held.memory() {
            Some(m) => &m.map[start..start + len],
            None => &[],
        }
    }

    /// Block `i` of the region, to write (`i < blocks()`).
    pub fn block_mut(&mut self, i: usize) -> &mut [u8] {
        let (start, len) = (
            HEADER_BYTES + i * self.held.block_bytes,
            self.held.block_bytes,
        );
        match self.held.memory_mut() {
            Some(m) => &mut m.map[start..start + len],
            None => &mut [],
        }
    }
}

/// A new region of `bytes`, its tag written.
fn make(bytes: usize) -> Result<Mapping, String> {
    let file = sys::create_sealed(bytes)?;
    // SAFETY: the file is ours alone until its descriptor is named to a prefill instance,
    // which only writes blocks into it; see the module doc for why its size cannot change.
    let mut map = unsafe { memmap2::MmapOptions::new().populate().map_mut(&file) }
        .map_err(|e| format!("mapping: {e}"))?;
    let tag: [u8; TAG_BYTES] = super::random_bytes().ok_or("no randomness for a tag")?;
    map[..TAG_BYTES].copy_from_slice(&tag);
    Ok(Mapping { map, file, tag })
}

#[cfg(target_os = "linux")]
mod sys {
    use std::fs::File;
    use std::os::fd::{AsRawFd, FromRawFd};

    const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

    fn last_error(what: &str) -> String {
        format!("{what}: {}", std::io::Error::last_os_error())
    }

    /// A memory file of `bytes`, its pages reserved, its size sealed.
    pub fn create_sealed(bytes: usize) -> Result<File, String> {
        // SAFETY: a NUL-terminated name; the descriptor returned is owned by the File at once.
        let fd = unsafe {
            libc::memfd_create(
                c"fdrt-kv".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(last_error("memfd_create"));
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        let len = libc::off_t::try_from(bytes).map_err(|_| "region too large".to_string())?;
        // SAFETY: plain system calls on our own descriptor.
        let reserved = unsafe { libc::posix_fallocate(fd, 0, len) };
        if reserved != 0 {
            return Err(format!(
                "reserving {bytes} bytes of shared memory: {}",
                std::io::Error::from_raw_os_error(reserved)
            ));
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, SEALS) } != 0 {
            return Err(last_error("sealing the region"));
        }
        Ok(file)
    }

    /// Another process's sealed memory file of exactly `bytes`.
    pub fn open_sealed(pid: u32, fd: i32, bytes: usize) -> Result<File, String> {
        if fd < 0 {
            return Err(format!("descriptor {fd}"));
        }
        let path = format!("/proc/{pid}/fd/{fd}");
        use std::os::unix::fs::OpenOptionsExt;
        // Non-blocking and never a controlling terminal: the descriptor is the peer's word until
        // the checks below (a device or a FIFO must not block or act on being opened).
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&path)
            .map_err(|e| format!("opening {path}: {e}"))?;
        let meta = file.metadata().map_err(|e| format!("{path}: {e}"))?;
        if !meta.is_file() || meta.len() != bytes as u64 {
            return Err(format!(
                "{path} is not a region of {bytes} bytes ({} bytes)",
                meta.len()
            ));
        }
        // SAFETY: a query on a descriptor we own.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & SEALS != SEALS {
            return Err(format!("{path} is not a sealed region"));
        }
        Ok(file)
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    use std::fs::File;

    pub fn create_sealed(_bytes: usize) -> Result<File, String> {
        Err("shared-memory KV transfer needs Linux".into())
    }

    pub fn open_sealed(_pid: u32, _fd: i32, _bytes: usize) -> Result<File, String> {
        Err("shared-memory KV transfer needs Linux".into())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_region_made_here_opens_by_its_offer_and_carries_blocks() {
        let mut made = SharedRegion::create(3, 100).expect("a region");
        let offer = made.offer().expect("an offer");
        let mut opened = SharedRegion::open(&offer, 3, 100).expect("opened");
        opened.block_mut(2).fill(7);
        opened.block_mut(0)[99] = 1;
        assert!(made.block(2).iter().all(|&b| b == 7));
        assert_eq!(made.block(0)[99], 1);
        assert_eq!(made.block(1), &[0; 100][..]);
        made.block_mut(1)[0] = 3;
        assert_eq!(opened.block(1)[0], 3);
    }

    #[test]
    fn offers_that_do_not_match_their_region_are_refused() {
        let made = SharedRegion::create(2, 64).expect("a region");
        let offer = made.offer().expect("an offer");
        // Too small, another tag, a descriptor that is no region, a process that is not there.
        assert!(SharedRegion::open(&offer, 3, 64).is_err());
        let other_tag = SharedOffer {
            tag: "00".repeat(TAG_BYTES),
            ..offer.clone()
        };
        assert!(SharedRegion::open(&other_tag, 2, 64).is_err());
        let plain = tempfile_of(offer.bytes as usize);
        use std::os::fd::AsRawFd;
        let not_sealed = SharedOffer {
            fd: plain.as_raw_fd(),
            ..offer.clone()
        };
        let err = SharedRegion::open(&not_sealed, 2, 64).expect_err("unsealed");
        assert!(err.contains("not a sealed region"), "{err}");
        let gone = SharedOffer {
            pid: u32::MAX,
            ..offer.clone()
        };
        assert!(SharedRegion::open(&gone, 2, 64).is_err());
        let negative = SharedOffer { fd: -1, ..offer };
        assert!(SharedRegion::open(&negative, 2, 64).is_err());
    }

    /// An ordinary (unsealed) memory file of `bytes`.
    fn tempfile_of(bytes: usize) -> File {
        // SAFETY: a NUL-terminated name; the descriptor is owned by the File at once.
        let fd = unsafe { libc::memfd_create(c"plain".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        use std::os::fd::FromRawFd;
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(bytes as u64).expect("size");
        file
    }

    #[test]
    fn a_region_kept_after_its_transfer_serves_the_next_one() {
        // Smaller than any other test's region, so none of them takes it meanwhile.
        let mut first = SharedRegion::create(1, 16).expect("a region");
        let offer = first.offer().expect("an offer");
        first.keep();
        drop(first);
        let second = SharedRegion::create(1, 16).expect("a region");
        assert_eq!(second.offer(), Some(offer.clone()), "the same region again");
        // Not kept: the next one is new.
        drop(second);
        let third = SharedRegion::create(1, 16).expect("a region");
        assert_ne!(third.offer().map(|o| o.tag), Some(offer.tag));
    }
}
