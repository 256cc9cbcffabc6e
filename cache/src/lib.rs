//! # weft-cache: the kernel database (not written yet)
//!
//! This crate will wrap a sled database with trees for compiled kernels (CUBIN/PTX, source
//! hash, options), tuning records keyed by GPU, driver, NVRTC and codegen versions, pattern
//! hash, head and shape bucket, and per-head search results. Values will be versioned and
//! serde-encoded; entries from another GPU or toolchain will never be loaded; a locked or
//! corrupt database will be an error that names the path and says how to recover. Nothing is
//! implemented yet.
