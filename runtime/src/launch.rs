//! Launches through the parameter structs of `weft_codegen::abi`: filled by field name here,
//! passed in the struct's field order ([`Params::args`]), the order codegen declares the entry
//! point's parameters in. [`Args`] collects the device addresses of a launch's buffers and
//! holds cudarc's stream-ordering guards for them until the launch is queued (as cudarc's own
//! argument builder does for slices).

use cudarc::driver::{CudaFunction, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg, SyncOnDrop};
use weft_codegen::abi::{describe, Arg, DevPtr, Entry, Params};

use crate::{driver, Error};

/// The buffers of one launch.
pub(crate) struct Args<'a> {
    stream: &'a CudaStream,
    guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> Args<'a> {
    pub(crate) fn new(stream: &'a CudaStream) -> Self {
        Args { stream, guards: Vec::with_capacity(16) }
    }

    /// The address of a buffer the kernel reads.
    pub(crate) fn r<T>(&mut self, buffer: &'a impl DevicePtr<T>) -> DevPtr {
        let (ptr, guard) = buffer.device_ptr(self.stream);
        self.guards.push(guard);
        ptr
    }

    /// The address of a buffer the kernel writes.
    pub(crate) fn w<T>(&mut self, buffer: &'a mut impl DevicePtrMut<T>) -> DevPtr {
        let (ptr, guard) = buffer.device_ptr_mut(self.stream);
        self.guards.push(guard);
        ptr
    }
}

/// Launches entry `entry` (function `f`) with `params` on `stream`: CTAs of the entry's threads
/// over `extents` (the grid the entry's [`Entry::grid`] makes of them), `shared` bytes of
/// dynamic shared memory.
///
/// # Safety
/// Every address in `params` must come from `args` (or be 0 where the kernel reads nothing)
/// and cover what the kernel indexes for the sizes in `params`.
pub(crate) unsafe fn launch<P: Params>(
    stream: &CudaStream,
    f: &CudaFunction,
    entry: &Entry,
    extents: [usize; 3],
    shared: u32,
    params: P,
    args: Args<'_>,
) -> Result<(), Error> {
    launch_threads(stream, f, entry, extents, entry.threads, shared, params, args)
}

/// [`launch`] with a block size that is the kernel config's rather than the entry's (the
/// attention kernel's, [`weft_codegen::KernelConfig::threads`]).
///
/// # Safety
/// As [`launch`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn launch_threads<P: Params>(
    stream: &CudaStream,
    f: &CudaFunction,
    entry: &Entry,
    extents: [usize; 3],
    threads: u32,
    shared: u32,
    params: P,
    args: Args<'_>,
) -> Result<(), Error> {
    if entry.params != P::NAME {
        return Err(Error::Usage(format!(
            "entry {} takes {}, not {} (a weft bug: please report it)",
            entry.name,
            entry.params,
            P::NAME
        )));
    }
    let grid = entry.grid(extents).map_err(Error::Shape)?;
    let cfg = LaunchConfig { grid_dim: grid, block_dim: (threads, 1, 1), shared_mem_bytes: shared };
    let mut b = stream.launch_builder(f);
    for arg in params.args() {
        match arg {
            Arg::Ptr(v) => b.arg(v),
            Arg::I32(v) => b.arg(v),
            Arg::U32(v) => b.arg(v),
            Arg::F32(v) => b.arg(v),
            Arg::F64(v) => b.arg(v),
        };
    }
    // Safety: the caller's contract; the entry's parameters are the struct's fields, in order.
    unsafe { b.launch(cfg) }.map_err(driver(format!("launching {}", describe(entry))))?;
    // The guards record the buffers' use after the launch is queued.
    drop(args);
    Ok(())
}

/// The loaded entry points of a module, found by their [`Entry`].
pub(crate) struct Module {
    functions: Vec<(Entry, CudaFunction)>,
}

impl Module {
    pub(crate) fn new(entries: &[Entry], functions: Vec<CudaFunction>) -> Module {
        Module { functions: entries.iter().copied().zip(functions).collect() }
    }

    /// Launches `entry` of this module: see [`launch`].
    ///
    /// # Safety
    /// As [`launch`].
    pub(crate) unsafe fn launch<P: Params>(
        &self,
        stream: &CudaStream,
        entry: &Entry,
        extents: [usize; 3],
        shared: u32,
        params: P,
        args: Args<'_>,
    ) -> Result<(), Error> {
        let Some((_, f)) = self.functions.iter().find(|(e, _)| e == entry) else {
            return Err(Error::Usage(format!("entry {} was not loaded (a weft bug: please report it)", entry.name)));
        };
        // Safety: the caller's contract.
        unsafe { launch(stream, f, entry, extents, shared, params, args) }
    }
}
