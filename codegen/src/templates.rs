//! The CUDA templates kernels are rendered from.

pub(crate) const PRELUDE: &str = include_str!("templates/prelude.cu");
pub(crate) const ATTENTION: &str = include_str!("templates/attention.cu");
pub(crate) const DECODE: &str = include_str!("templates/decode.cu");
pub(crate) const MERGE: &str = include_str!("templates/merge.cu");
pub(crate) const VV_INDEX: &str = include_str!("templates/vv_index.cu");
pub(crate) const VS_INDEX: &str = include_str!("templates/vs_index.cu");
pub(crate) const HOPPER: &str = include_str!("templates/hopper.cu");
pub(crate) const WGMMA: &str = include_str!("templates/wgmma.cu");
