//! # weft-runtime: NVRTC, module loading and launches (not written yet)
//!
//! The only crate that will touch the GPU: it will compile `weft-codegen`'s CUDA C++ with NVRTC
//! (through cudarc, CUBIN for the device in hand, PTX as fallback), cache loaded modules by
//! (source hash, options, device), validate shapes, dtypes, strides and alignment before a
//! launch, and expose the user-facing `Runtime` that loads tuned kernels from the database.
//! A missing GPU, libcuda or libnvrtc will be an error that says what to install, never a
//! panic. Nothing is implemented yet.
