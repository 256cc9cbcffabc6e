//! Checks of the CUDA libraries before cudarc uses them. cudarc loads each function the first
//! time it is called and panics when the library lacks it, so a file of the right name but the
//! wrong content (another program's library, a driver too old for the CUDA 13 API) would end
//! the process. Here the library cudarc will load is opened first, its version function is
//! looked up and called, and what is wrong is returned as an error.

use std::ffi::c_int;

use crate::Error;

/// The oldest driver API weft's bindings use (cudarc's `cuda-13000`).
const DRIVER_API: c_int = 13000;
/// The NVRTC major version weft's bindings use.
const NVRTC_MAJOR: c_int = 13;

/// The first of cudarc's file names for `lib` that loads (the one cudarc will use), with it.
fn open(lib: &str) -> Option<(String, libloading::Library)> {
    cudarc::get_lib_name_candidates(lib).into_iter().find_map(|name| {
        // Safety: loading runs the library's initialisers; this is the library cudarc loads.
        unsafe { libloading::Library::new(&name) }.ok().map(|l| (name, l))
    })
}

fn wrong(library: &'static str, help: String) -> Error {
    Error::MissingLibrary { library, help }
}

/// libcuda: present, a real driver library, and new enough for the CUDA 13 API.
pub fn check_driver() -> Result<(), Error> {
    let Some((name, lib)) = open("cuda") else {
        return Err(wrong(
            "libcuda.so.1",
            "no NVIDIA driver on this machine; GPU commands need one (code generation and `weft compile` do \
             not)"
                .into(),
        ));
    };
    type Version = unsafe extern "C" fn(*mut c_int) -> c_int;
    // Safety: the signature of cuDriverGetVersion in every CUDA driver.
    let get: libloading::Symbol<'_, Version> = unsafe { lib.get(b"cuDriverGetVersion\0") }.map_err(|_| {
        wrong(
            "libcuda.so.1",
            format!("{name} has no cuDriverGetVersion: it is not the NVIDIA driver's library (check LD_LIBRARY_PATH)"),
        )
    })?;
    let mut version: c_int = 0;
    // Safety: writes one int; needs no cuInit.
    let status = unsafe { get(&mut version) };
    if status != 0 || version < DRIVER_API {
        return Err(wrong(
            "libcuda.so.1",
            format!(
                "the driver in {name} supports CUDA {}.{} (status {status}); weft needs a driver for CUDA {}.{} \
                 or newer (R580+)",
                version / 1000,
                version % 1000 / 10,
                DRIVER_API / 1000,
                DRIVER_API % 1000 / 10
            ),
        ));
    }
    Ok(())
}

/// libnvrtc: present, NVRTC, and of the major version the bindings use.
pub fn check_nvrtc() -> Result<(), Error> {
    let install = "install the pinned NVRTC wheel (`python3 -m pip install --target .tools/nvrtc \
                   nvidia-cuda-nvrtc==13.0.88`) and add `.tools/nvrtc/nvidia/cu13/lib` to LD_LIBRARY_PATH; \
                   scripts/test.sh does both";
    let Some((name, lib)) = open("nvrtc") else {
        return Err(wrong("libnvrtc.so.13", install.into()));
    };
    type Version = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;
    // Safety: the signature of nvrtcVersion in every NVRTC.
    let get: libloading::Symbol<'_, Version> = unsafe { lib.get(b"nvrtcVersion\0") }
        .map_err(|_| wrong("libnvrtc.so.13", format!("{name} has no nvrtcVersion: it is not NVRTC; {install}")))?;
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // Safety: writes two ints.
    let status = unsafe { get(&mut major, &mut minor) };
    if status != 0 || major != NVRTC_MAJOR {
        return Err(wrong(
            "libnvrtc.so.13",
            format!("{name} is NVRTC {major}.{minor} (status {status}); weft needs {NVRTC_MAJOR}.x: {install}"),
        ));
    }
    Ok(())
}
