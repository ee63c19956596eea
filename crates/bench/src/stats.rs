//! Median, minimum and maximum of repeated measurements.

use serde::Serialize;

/// Summary of one metric over all iterations of one VMM.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// Median (mean of the two middle values for an even count).
    pub median: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Number of samples.
    pub n: usize,
}

impl Summary {
    /// Summarise `samples`; `None` when there are none (or any is not a number).
    pub fn of(samples: &[f64]) -> Option<Self> {
        if samples.is_empty() || samples.iter().any(|v| v.is_nan()) {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_summary_odd_count_middle_value() {
        // Arrange
        let samples = [5.0, 1.0, 3.0];

        // Act
        let s = Summary::of(&samples).expect("summary");

        // Assert
        assert_eq!(
            s,
            Summary {
                median: 3.0,
                min: 1.0,
                max: 5.0,
                n: 3
            }
        );
    }

    #[test]
    fn test_summary_even_count_mean_of_middle() {
        // Arrange
        let samples = [4.0, 1.0, 2.0, 10.0];

        // Act
        let s = Summary::of(&samples).expect("summary");

        // Assert
        assert_eq!(s.median, 3.0);
        assert_eq!((s.min, s.max, s.n), (1.0, 10.0, 4));
    }

    #[test]
    fn test_summary_empty_none() {
        // Arrange
        let samples: [f64; 0] = [];

        // Act
        let s = Summary::of(&samples);

        // Assert
        assert!(s.is_none());
    }
}
