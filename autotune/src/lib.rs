//! # weft-autotune: config search and per-head pattern search (not written yet)
//!
//! This crate will hold the kernel config spaces and their static resource pruning, parallel
//! NVRTC compilation, GPU timing with CUDA events (warm-up, medians, L2-rotated inputs, early
//! elimination), verification of every winner against `weft-patterns`' reference before it is
//! stored, and the offline search of which pattern each head of a model should use. Nothing
//! is implemented yet.
