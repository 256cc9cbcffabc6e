//! What the NVRTC compile tests and the GPU tests share.

/// The Hopper schedules under test: plain wgmma, with the producer warpgroup
/// (`KernelConfig::producer`), and the producer's persistent grid (`KernelConfig::persistent`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Schedule {
    Plain,
    Producer,
    Persistent,
}

impl Schedule {
    /// `config` (on the wgmma path) with this schedule.
    pub fn apply(self, config: weft_codegen::KernelConfig) -> weft_codegen::KernelConfig {
        let producer = self != Schedule::Plain;
        weft_codegen::KernelConfig { producer, persistent: self == Schedule::Persistent, ..config }
    }

    /// Whether the schedule takes pattern `p` (the persistent one refuses gathered columns).
    pub fn takes(self, p: &weft_dsl::Pattern) -> bool {
        self != Schedule::Persistent || !weft_codegen::gathers_columns(&p.expr)
    }
}

/// The Hopper path's tiles under test, as (block_m, block_n, stages, schedule): every tile it
/// takes, 128 x 64 also with a 3-stage pipeline, and both 128-row tiles also with the producer
/// schedule, plain and persistent (the latter for patterns without gathered columns:
/// [`Schedule::takes`]). CI compiles them all; the GPU suite runs them all.
pub const WGMMA_TILES: [(usize, usize, u32, Schedule); 8] = [
    (64, 64, 2, Schedule::Plain),
    (128, 64, 2, Schedule::Plain),
    (128, 64, 3, Schedule::Plain),
    (128, 128, 2, Schedule::Plain),
    (128, 64, 2, Schedule::Producer),
    (128, 128, 2, Schedule::Producer),
    (128, 64, 2, Schedule::Persistent),
    (128, 128, 2, Schedule::Persistent),
];
