//! CUDA-event timing of calls queued on a stream: the median loop of the tuner, the decode
//! tuner and the benchmarks, written once.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaStream;

use crate::{driver, Error};

/// Times `call` on `stream` with CUDA events around each call: `warmup` calls untimed, then up
/// to `reps` timed ones, whose milliseconds come back in order. `call` gets the call's number
/// (warm-ups included). After each timed call, `stop` sees the times so far and may end the
/// loop early (the tuner's elimination). A failing call ends the loop with its error.
pub fn time_calls<E: From<Error>>(
    stream: &CudaStream,
    warmup: usize,
    reps: usize,
    mut call: impl FnMut(usize) -> Result<(), E>,
    mut stop: impl FnMut(&[f64]) -> bool,
) -> Result<Vec<f64>, E> {
    let event = || stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver("recording a CUDA event"));
    let mut times = Vec::with_capacity(reps);
    for i in 0..warmup + reps {
        let start = event()?;
        call(i)?;
        let end = event()?;
        end.synchronize().map_err(driver("waiting for a timed call"))?;
        if i >= warmup {
            times.push(f64::from(start.elapsed_ms(&end).map_err(driver("reading CUDA event times"))?));
            if stop(&times) {
                break;
            }
        }
    }
    Ok(times)
}

/// The median of `times` (the upper one of an even count); `None` when empty.
pub fn median(times: &[f64]) -> Option<f64> {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied()
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_takes_the_middle_and_the_upper_of_two() {
        assert_eq!(super::median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(super::median(&[4.0, 1.0]), Some(4.0));
        assert_eq!(super::median(&[]), None);
    }
}
