//! Same-host KV transfer between GPU instances through CUDA IPC: the blocks go from the prefill
//! instance's KV pool to the decode instance's by device-to-device copies, never through host
//! memory. The decode instance allocates a device region the size of the blocks it asks for
//! (plain `cuMemAlloc`: memory from the stream-ordered allocator cannot be exported this way),
//! writes a random tag in its header and names it in its request by its IPC handle; the prefill
//! instance opens the handle in its own context, checks the tag, and its engine thread copies
//! each block from its pool into the region; the decode instance's engine thread seats them
//! from it. The flow and the guarantees are those of the host shared-memory path
//! (`crate::disagg::shared`), which a decode instance offers beside this one: a prefill
//! instance that cannot open the handle (a CPU instance, a device it cannot reach, the same
//! process) takes the host region or the socket instead.
//!
//! The driver keeps an opened region alive for its importer, so a region is only reused (kept
//! here after its transfer) once the transfer ended with its `Done`, like a host region.

use crate::disagg::kept::{region_sizes, Held, Offer, Pools};
use crate::disagg::wire::hex;
use crate::error::RuntimeError;
use cudarc::driver::{sys, CudaContext};
use std::sync::Arc;

/// Bytes before the first block: the tag, padded so blocks start 64-byte aligned.
const HEADER_BYTES: usize = 64;
const TAG_BYTES: usize = 16;
const HANDLE_BYTES: usize = 64;
/// Device memory a new region must leave free (half of what a KV pool sized by free memory
/// leaves for graphs and scratch).
const MIN_FREE_AFTER: usize = 512 << 20;

/// A GPU instance's device as its KV transfers see it: the engine's context, so regions can be
/// made and opened off the engine thread.
#[derive(Clone)]
pub struct DeviceLink {
    ctx: Arc<CudaContext>,
}

impl std::fmt::Debug for DeviceLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceLink(device {})", self.ctx.ordinal())
    }
}

impl DeviceLink {
    pub(crate) fn new(ctx: Arc<CudaContext>) -> DeviceLink {
        DeviceLink { ctx }
    }

    fn bind(&self) -> Result<(), String> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| format!("binding the device: {e}"))
    }

    /// Whether `ctx` is this link's context (a region is only used by the engine it was
    /// made or opened for).
    pub(crate) fn is(&self, ctx: &CudaContext) -> bool {
        self.ctx.cu_ctx() == ctx.cu_ctx()
    }
}

/// What a decode instance's request says of its device region.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeviceOffer {
    pub pid: u32,
    /// Hex of the allocation's IPC handle.
    pub handle: String,
    /// Hex of the random tag at the region's start.
    pub tag: String,
    /// The region's size, header included.
    pub bytes: u64,
}

/// Device memory of this process (`cuMemAlloc`) or another's opened here (`cuIpcOpenMemHandle`).
struct Allocation {
    link: DeviceLink,
    ptr: sys::CUdeviceptr,
    bytes: usize,
    tag: [u8; TAG_BYTES],
    /// The IPC handle of memory made here; `None` for memory opened here.
    handle: Option<[u8; HANDLE_BYTES]>,
}

// SAFETY: a device pointer and its context; the driver's calls on them are thread-safe, and
// the allocation is only used by one transfer (and its engine thread) at a time.
unsafe impl Send for Allocation {}

impl Drop for Allocation {
    fn drop(&mut self) {
        if self.link.bind().is_err() {
            return;
        }
        // SAFETY: `ptr` was allocated (or opened) in this context and nothing uses it any more:
        // the allocation is only dropped when its region is.
        let freed = unsafe {
            match self.handle {
                Some(_) => sys::cuMemFree_v2(self.ptr),
                None => sys::cuIpcCloseMemHandle(self.ptr),
            }
        };
        if let Err(e) = freed.result() {
            tracing::warn!(error = %e, "KV transfer: releasing a device region");
        }
    }
}

impl Offer for DeviceOffer {
    fn pid(&self) -> u32 {
        self.pid
    }
}

/// Kept device regions: a decode instance's own, and a prefill instance's openings of
/// others'.
static KEPT: Pools<DeviceOffer, Allocation> = Pools::new();

/// A device region with room for a transfer's blocks behind a small header, held by one
/// transfer at a time.
#[derive(Debug)]
pub struct DeviceRegion {
    held: Held<DeviceOffer, Allocation>,
}

fn driver(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> String {
    move |e| format!("{what}: {e}")
}

impl DeviceRegion {
    /// The decode side: a region for `blocks` blocks of `block_bytes` on `link`'s device, one
    /// kept from an earlier transfer when one is large enough, else a new one (room for the
    /// next power of two of blocks). An error where the device has no room (its KV pool took
    /// what was free): the transfer then goes through host memory.
    pub fn create(link: &DeviceLink, blocks: usize, block_bytes: usize) -> Result<Self, String> {
        let (need, room) =
            region_sizes(blocks, block_bytes, HEADER_BYTES).ok_or("the region's size overflows")?;
        let allocation = match KEPT.made.take(None, need..=2 * room) {
            Some(a) if a.link.is(&link.ctx) => a,
            _ => allocate(link, room)?,
        };
        let bytes = allocation.bytes;
        Ok(DeviceRegion {
            held: Held::new(&KEPT, allocation, bytes, None, blocks, block_bytes),
        })
    }

    /// How a request names this region to a prefill instance (`None` for an opened region).
    pub fn offer(&self) -> Option<DeviceOffer> {
        let a = self.held.memory()?;
        Some(DeviceOffer {
            pid: std::process::id(),
            handle: hex(a.handle.as_ref()?),
            tag: hex(&a.tag),
            bytes: a.bytes as u64,
        })
    }

    /// The prefill side: opens the region `offer` names on `link`'s device, if it is one made
    /// by [`DeviceRegion::create`] in another process with room for `blocks` blocks of
    /// `block_bytes` (an opening kept from an earlier transfer when there is one).
    pub fn open(
        link: &DeviceLink,
        offer: &DeviceOffer,
        blocks: usize,
        block_bytes: usize,
    ) -> Result<Self, String> {
        let (need, _) =
            region_sizes(blocks, block_bytes, HEADER_BYTES).ok_or("the region's size overflows")?;
        if offer.bytes < need as u64 {
            return Err(format!(
                "a device region of {} bytes offered for {need}",
                offer.bytes
            ));
        }
        let allocation = match KEPT.opened.take(Some(offer), need..=usize::MAX) {
            Some(a) if a.link.is(&link.ctx) => a,
            _ => open_handle(link, offer)?,
        };
        // Read again at every use: a kept opening of a region its maker has since freed and
        // replaced is refused here rather than written into.
        if hex(&read_tag(&allocation)?) != offer.tag {
            return Err("the handle names another device region".into());
        }
        let bytes = allocation.bytes;
        Ok(DeviceRegion {
            held: Held::new(
                &KEPT,
                allocation,
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

    pub fn block_bytes(&self) -> usize {
        self.held.block_bytes
    }

    /// The device address of block `i` (`i < blocks()`), in the context of `ctx`, which must
    /// be the one the region was made or opened in.
    pub(crate) fn block_ptr(&self, i: usize, ctx: &CudaContext) -> Result<u64, RuntimeError> {
        let a = self
            .held
            .memory()
            .filter(|a| a.link.is(ctx))
            .ok_or_else(|| {
                RuntimeError::KvBlocks("a device region of another device or engine".into())
            })?;
        if i >= self.held.blocks {
            return Err(RuntimeError::KvBlocks(format!(
                "block {i} of a device region of {}",
                self.held.blocks
            )));
        }
        Ok(a.ptr + (HEADER_BYTES + i * self.held.block_bytes) as u64)
    }
}

/// New device memory of `bytes` on `link`'s device, its tag written and its IPC handle taken.
fn allocate(link: &DeviceLink, bytes: usize) -> Result<Allocation, String> {
    link.bind()?;
    // Not out of the room a pool sized by free memory left for graphs and scratch: the
    // transfer goes through host memory instead.
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: out-pointers to locals, with this device's context current.
    unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) }
        .result()
        .map_err(driver("reading the device's free memory"))?;
    if free < bytes.saturating_add(MIN_FREE_AFTER) {
        return Err(format!(
            "a device region of {bytes} bytes would leave less than {MIN_FREE_AFTER} of {free} free"
        ));
    }
    let tag: [u8; TAG_BYTES] = crate::disagg::random_bytes().ok_or("no randomness for a tag")?;
    let mut ptr: sys::CUdeviceptr = 0;
    // SAFETY: an out-pointer to a local; the allocation is owned by the `Allocation` at once.
    unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes) }
        .result()
        .map_err(driver("allocating a device region"))?;
    let mut allocation = Allocation {
        link: link.clone(),
        ptr,
        bytes,
        tag,
        handle: Some([0; HANDLE_BYTES]),
    };
    // SAFETY: `tag` is TAG_BYTES of host memory and the allocation at least HEADER_BYTES.
    unsafe { sys::cuMemcpyHtoD_v2(ptr, tag.as_ptr().cast(), TAG_BYTES) }
        .result()
        .map_err(driver("writing a device region's tag"))?;
    let mut handle = sys::CUipcMemHandle {
        reserved: [0; HANDLE_BYTES],
    };
    // SAFETY: an out-pointer to a local, and the base of an allocation of this context.
    unsafe { sys::cuIpcGetMemHandle(&mut handle, ptr) }
        .result()
        .map_err(driver("exporting a device region"))?;
    allocation.handle = Some(handle.reserved.map(|b| b as u8));
    Ok(allocation)
}

/// Another process's region, opened on `link`'s device.
fn open_handle(link: &DeviceLink, offer: &DeviceOffer) -> Result<Allocation, String> {
    let bytes = usize::try_from(offer.bytes).map_err(|_| "device region too large")?;
    let raw = crate::disagg::wire::unhex(&offer.handle)
        .filter(|h| h.len() == HANDLE_BYTES)
        .ok_or("a malformed device region handle")?;
    let mut handle = sys::CUipcMemHandle {
        reserved: [0; HANDLE_BYTES],
    };
    for (to, from) in handle.reserved.iter_mut().zip(&raw) {
        *to = *from as std::ffi::c_char;
    }
    link.bind()?;
    let mut ptr: sys::CUdeviceptr = 0;
    // SAFETY: an out-pointer to a local; the driver checks the handle (a handle of this
    // process, of another host or of freed memory is refused).
    unsafe {
        sys::cuIpcOpenMemHandle_v2(
            &mut ptr,
            handle,
            sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
        )
    }
    .result()
    .map_err(driver("opening the decode instance's device region"))?;
    let allocation = Allocation {
        link: link.clone(),
        ptr,
        bytes,
        tag: [0; TAG_BYTES],
        handle: None,
    };
    // The size the offer states is the peer's word; the driver's is not: a copy past the real
    // end would fault this instance's context.
    let (mut base, mut size): (sys::CUdeviceptr, usize) = (0, 0);
    // SAFETY: out-pointers to locals, and a pointer the driver just mapped.
    unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr) }
        .result()
        .map_err(driver("sizing the decode instance's device region"))?;
    if base != ptr || size < bytes {
        return Err(format!(
            "a device region of {size} bytes offered as {bytes}"
        ));
    }
    Ok(allocation)
}

/// The tag at the start of an allocation.
fn read_tag(a: &Allocation) -> Result<[u8; TAG_BYTES], String> {
    a.link.bind()?;
    let mut tag = [0u8; TAG_BYTES];
    // SAFETY: TAG_BYTES of host memory, from an allocation of at least HEADER_BYTES (the offer
    // said so, and the driver maps the whole allocation).
    unsafe { sys::cuMemcpyDtoH_v2(tag.as_mut_ptr().cast(), a.ptr, TAG_BYTES) }
        .result()
        .map_err(driver("reading a device region's tag"))?;
    Ok(tag)
}
