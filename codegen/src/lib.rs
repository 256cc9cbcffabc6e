//! # weft-codegen: pattern IR + kernel config -> CUDA C++ (not written yet)
//!
//! This crate will lower a validated `weft_dsl::Pattern` and a kernel configuration (block
//! sizes, warps, pipeline stages, head dim, dtype, GQA ratio) to self-contained CUDA C++ text:
//! FlashAttention-2-style forward kernels with online softmax, tensor-core `mma.sync` through
//! inline PTX and `cp.async` pipelines, iterating the shared sparse index of `weft-patterns`
//! (full blocks without masking, partial blocks and columns with the index's mask predicates
//! inlined as device functions), plus index-building, ring-merge and retrieval-decode kernels.
//!
//! It depends on no GPU and builds and tests on any machine. Nothing is implemented yet:
//! see the project's issue on codegen and runtime.
