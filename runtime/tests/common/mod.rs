//! What the NVRTC compile tests and the GPU tests share.

/// The Hopper path's tiles under test, as (block_m, block_n, stages, producer): every tile it
/// takes, 128 x 64 also with a 3-stage pipeline, and both 128-row tiles also with the producer
/// schedule (`KernelConfig::producer`). CI compiles them all; the GPU suite runs them all.
pub const WGMMA_TILES: [(usize, usize, u32, bool); 6] = [
    (64, 64, 2, false),
    (128, 64, 2, false),
    (128, 64, 3, false),
    (128, 128, 2, false),
    (128, 64, 2, true),
    (128, 128, 2, true),
];
