//! Which 4 KiB pages of a memory file a diff snapshot holds.

use serde::{Deserialize, Serialize};

use crate::error::{Result, SnapshotError};

/// One run of consecutive pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    /// The first page, counted in 4 KiB pages from the start of the memory file.
    pub first: u64,
    /// How many pages; never zero.
    pub count: u64,
}

/// The set of memory-file pages a diff snapshot wrote, as sorted, non-overlapping,
/// non-adjacent runs. Dirty pages cluster, so runs stay far smaller than a bitmap of a
/// large guest; the caller stores this as a state section next to the diff's memory file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageMap {
    runs: Vec<PageRun>,
}

impl PageMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a map from runs, refusing unsorted, overlapping, empty or overflowing ones, so a
    /// map read from a damaged state file cannot make a merge write out of place.
    pub fn from_runs(runs: Vec<PageRun>) -> Result<Self> {
        let map = Self { runs };
        map.validate()?;
        Ok(map)
    }

    /// Checks the invariants [`PageMap::from_runs`] promises; deserialised maps skip
    /// `from_runs`, so consumers call this.
    pub fn validate(&self) -> Result<()> {
        let mut next_free = 0u64;
        for (i, run) in self.runs.iter().enumerate() {
            let bad = |reason: &str| SnapshotError::InvalidPageMap {
                reason: format!("run {i}: {reason}"),
            };
            if run.count == 0 {
                return Err(bad("empty"));
            }
            if i > 0 && run.first < next_free {
                return Err(bad("not sorted or overlapping"));
            }
            next_free = run
                .first
                .checked_add(run.count)
                .filter(|end| end.checked_mul(crate::PAGE_SIZE).is_some())
                .ok_or_else(|| bad("beyond the largest possible file"))?;
        }
        Ok(())
    }

    /// Adds `page`; pages must be added in increasing order (as a bitmap scan yields them).
    pub(crate) fn push_page(&mut self, page: u64) {
        match self.runs.last_mut() {
            Some(last) if last.first + last.count == page => last.count += 1,
            _ => self.runs.push(PageRun {
                first: page,
                count: 1,
            }),
        }
    }

    /// The runs, in increasing page order.
    pub fn runs(&self) -> &[PageRun] {
        &self.runs
    }

    /// Whether `page` is in the map.
    pub fn contains(&self, page: u64) -> bool {
        let end = |r: &PageRun| r.first.saturating_add(r.count);
        let idx = self.runs.partition_point(|r| end(r) <= page);
        self.runs
            .get(idx)
            .is_some_and(|r| r.first <= page && page < end(r))
    }

    /// How many pages the map holds.
    pub fn page_count(&self) -> u64 {
        self.runs
            .iter()
            .fold(0u64, |n, r| n.saturating_add(r.count))
    }

    /// One past the last page, i.e. the memory file must be at least this many pages long.
    pub fn end_page(&self) -> u64 {
        self.runs
            .last()
            .map_or(0, |r| r.first.saturating_add(r.count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_push_page_coalesces_adjacent_pages() {
        // Arrange
        let mut map = PageMap::new();

        // Act
        for page in [1, 2, 3, 7, 8, 10] {
            map.push_page(page);
        }

        // Assert
        let runs: Vec<(u64, u64)> = map.runs().iter().map(|r| (r.first, r.count)).collect();
        assert_eq!(runs, vec![(1, 3), (7, 2), (10, 1)]);
        assert_eq!(map.page_count(), 6);
        assert!(map.contains(8) && !map.contains(9) && !map.contains(0));
    }

    #[test]
    fn test_from_runs_overlapping_is_refused() {
        // Arrange
        let runs = vec![
            PageRun { first: 0, count: 4 },
            PageRun { first: 3, count: 1 },
        ];

        // Act
        let result = PageMap::from_runs(runs);

        // Assert
        assert!(matches!(result, Err(SnapshotError::InvalidPageMap { .. })));
    }

    #[test]
    fn test_from_runs_overflowing_is_refused() {
        // Arrange
        let runs = vec![PageRun {
            first: u64::MAX / 4096,
            count: 2,
        }];

        // Act
        let result = PageMap::from_runs(runs);

        // Assert
        assert!(matches!(result, Err(SnapshotError::InvalidPageMap { .. })));
    }

    #[test]
    fn test_page_map_round_trips_through_serde() {
        // Arrange
        let map = PageMap::from_runs(vec![PageRun { first: 5, count: 2 }]).expect("valid runs");

        // Act
        let json = serde_json::to_string(&map).expect("encodes");
        let back: PageMap = serde_json::from_str(&json).expect("decodes");

        // Assert
        assert_eq!(back, map);
    }
}
