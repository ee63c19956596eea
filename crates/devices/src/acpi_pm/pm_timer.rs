//! The ACPI PM timer: a free-running 32-bit counter at 3.579545 MHz (FADT TMR_VAL_EXT).

use std::time::{Duration, Instant};

/// Frequency of the ACPI PM timer.
pub const PM_TIMER_HZ: u64 = 3_579_545;

/// The counter, driven by the host's monotonic clock.
pub struct PmTimer {
    start: Instant,
    /// Added to the ticks since `start` (continuity across snapshot/restore).
    offset: u32,
}

/// Timer ticks in `elapsed`.
pub fn ticks_in(elapsed: Duration) -> u64 {
    let ticks = elapsed.as_nanos() * u128::from(PM_TIMER_HZ) / 1_000_000_000;
    // Wraps after ~163,000 years; the low 32 bits are what counts.
    ticks as u64
}

impl PmTimer {
    /// A timer counting from 0 now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            offset: 0,
        }
    }

    /// The current 32-bit count.
    pub fn value(&self) -> u32 {
        (ticks_in(self.start.elapsed()) as u32).wrapping_add(self.offset)
    }

    /// Make the counter continue from `value`.
    pub fn set(&mut self, value: u32) {
        self.offset = value.wrapping_sub(ticks_in(self.start.elapsed()) as u32);
    }
}

impl Default for PmTimer {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_pm_timer_one_second_is_3579545_ticks() {
        assert_eq!(ticks_in(Duration::from_secs(1)), PM_TIMER_HZ);
        assert_eq!(ticks_in(Duration::from_nanos(280)), 1);
    }

    #[test]
    fn test_pm_timer_set_continues_from_value() {
        let mut timer = PmTimer::new();

        timer.set(u32::MAX - 5);
        let value = timer.value();

        // Only forward by however little time passed, wrapping at 32 bits.
        assert!(value.wrapping_sub(u32::MAX - 5) < 1 << 31);
    }
}
