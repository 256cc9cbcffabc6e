//! Page-locked host memory mapped into the device's address space: kernels read and write it
//! over the bus through [`MappedHost::device_ptr`]. A paged KV cache larger than the GPU's
//! memory lives there (see the `paged` module).

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaStream};
use weft_codegen::abi::DevPtr;

use crate::{driver, Error};

/// A pinned, device-mapped host allocation. The host never reads it through Rust references:
/// only kernels (and copies) on `stream` touch it, so dropping it waits for the stream first.
pub(crate) struct MappedHost {
    host: *mut c_void,
    dev: DevPtr,
    stream: Arc<CudaStream>,
}

// Safety: the allocation is owned by this value and only reached through device addresses by
// work on `stream`; the raw pointer is never dereferenced on the host.
unsafe impl Send for MappedHost {}
// Safety: as for Send; `&MappedHost` hands out only the device address.
unsafe impl Sync for MappedHost {}

impl MappedHost {
    /// `bytes` of pinned host memory (uninitialised) mapped for the device of `stream`.
    pub(crate) fn new(stream: &Arc<CudaStream>, bytes: usize, what: &str) -> Result<Self, Error> {
        stream.context().bind_to_thread().map_err(driver(what))?;
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        let help = format!(
            "{what}: pinning {:.1} GiB of host memory (the machine's memory, or the locked-memory limit, `ulimit -l`, may be too small)",
            bytes as f64 / (1u64 << 30) as f64
        );
        // Safety: a plain allocation of `bytes` (at least 1); the pointer is checked below.
        let host = unsafe { result::malloc_host(bytes.max(1), flags) }.map_err(driver(help))?;
        let mut dev: sys::CUdeviceptr = 0;
        // Safety: `host` was allocated with CU_MEMHOSTALLOC_DEVICEMAP just now; `dev` is a
        // valid out pointer.
        let mapped = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, host, 0) }.result();
        if let Err(e) = mapped {
            // Safety: `host` came from malloc_host and nothing else holds it.
            let _ = unsafe { result::free_host(host) };
            return Err(driver(format!("{what}: mapping pinned host memory for the device"))(e));
        }
        Ok(MappedHost { host, dev, stream: stream.clone() })
    }

    /// The device's address of the allocation.
    pub(crate) fn device_ptr(&self) -> DevPtr {
        self.dev
    }
}

impl Drop for MappedHost {
    fn drop(&mut self) {
        // Work queued on the stream may still read or write the memory.
        let _ = self.stream.synchronize();
        // Safety: `host` came from malloc_host; no queued work uses it any more.
        let _ = unsafe { result::free_host(self.host) };
    }
}
