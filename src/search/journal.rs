//! A gallery's recent changes to its rows, so that a copy elsewhere (the GPU's) can follow
//! them by appending new rows and marking removed ones instead of copying everything again.

/// One change to a gallery's rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RowChange {
    /// This many rows were added at the end.
    Appended(usize),
    /// The rows at these positions (ascending, as they were before the change) were
    /// removed; the rows after them moved up, keeping their order.
    Removed(Vec<usize>),
}

/// The most row positions the journal keeps: past it a copy is cheaper to rebuild than to
/// replay, so the oldest changes are forgotten.
const MAX_REMOVED_POSITIONS: usize = 1 << 20;
/// The most changes the journal keeps.
const MAX_CHANGES: usize = 1024;

/// Changes numbered from 1 (`stamp` is the number of changes ever made); the journal holds
/// the most recent ones, those after `first`.
#[derive(Clone, Debug, Default)]
pub struct RowJournal {
    changes: Vec<RowChange>,
    /// Stamp before the oldest change kept.
    first: u64,
    stamp: u64,
    removed_positions: usize,
}

impl RowJournal {
    /// The number of changes ever recorded: a copy made now is up to date at this stamp.
    pub fn stamp(&self) -> u64 {
        self.stamp
    }

    pub fn record(&mut self, change: RowChange) {
        if let RowChange::Removed(rows) = &change {
            self.removed_positions += rows.len();
        }
        self.changes.push(change);
        self.stamp += 1;
        if self.changes.len() > MAX_CHANGES || self.removed_positions > MAX_REMOVED_POSITIONS {
            self.forget();
        }
    }

    /// Forgets every change kept (a copy older than now must be rebuilt).
    pub fn forget(&mut self) {
        self.changes.clear();
        self.removed_positions = 0;
        self.first = self.stamp;
    }

    /// The changes after `stamp`, oldest first; None when some of them were forgotten (or
    /// `stamp` is from the future: another gallery's).
    pub fn since(&self, stamp: u64) -> Option<&[RowChange]> {
        if stamp < self.first || stamp > self.stamp {
            return None;
        }
        Some(&self.changes[(stamp - self.first) as usize..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_gives_the_changes_after_a_stamp_until_they_are_forgotten() {
        let mut j = RowJournal::default();
        assert_eq!(j.since(0), Some(&[][..]));
        j.record(RowChange::Appended(3));
        j.record(RowChange::Removed(vec![0, 2]));
        assert_eq!(j.stamp(), 2);
        assert_eq!(j.since(1), Some(&[RowChange::Removed(vec![0, 2])][..]));
        assert_eq!(j.since(0).map(<[RowChange]>::len), Some(2));
        assert_eq!(j.since(3), None);
        j.record(RowChange::Removed(vec![0; MAX_REMOVED_POSITIONS]));
        assert_eq!((j.since(2), j.since(3)), (None, Some(&[][..])));
        for _ in 0..=MAX_CHANGES {
            j.record(RowChange::Appended(1));
        }
        assert_eq!(j.since(3), None);
        assert_eq!(j.since(j.stamp()), Some(&[][..]));
    }
}
