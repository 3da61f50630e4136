//! Which target takes the next test, and the slots each target has taken: pure bookkeeping,
//! tested without workers. The coordinator keeps one [`Loads`] for the run, so finding room
//! costs one step per target, not one per request in flight.

/// One target as the choice sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Room {
    /// Slots taken by the requests in flight there.
    pub load: usize,
    /// Slots it takes requests for (its slots and the lookahead; 0 when it takes nothing).
    pub capacity: usize,
    /// It failed the test at hand with an infrastructure failure: tried last.
    pub avoided: bool,
}

impl Room {
    fn has_room(&self) -> bool {
        self.load < self.capacity
    }

    /// Fill ratio in thousandths: lower is emptier.
    fn fill(&self) -> usize {
        self.load * 1000 / self.capacity.max(1)
    }
}

/// The position of the target with room that is emptiest relative to its size, preferring
/// targets not avoided; of equals, the first.
pub fn emptiest(rooms: impl IntoIterator<Item = Room>) -> Option<usize> {
    rooms
        .into_iter()
        .enumerate()
        .filter(|(_, room)| room.has_room())
        .min_by_key(|(_, room)| (room.avoided, room.fill()))
        .map(|(i, _)| i)
}

/// Slots taken on each target by the requests in flight there, kept as requests start and
/// end.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Loads {
    loads: Vec<usize>,
}

impl Loads {
    /// Slots taken on target `target`.
    pub fn get(&self, target: usize) -> usize {
        self.loads.get(target).copied().unwrap_or(0)
    }

    /// A request taking `slots` started on `target`.
    pub fn add(&mut self, target: usize, slots: usize) {
        if self.loads.len() <= target {
            self.loads.resize(target + 1, 0);
        }
        self.loads[target] += slots;
    }

    /// A request taking `slots` on `target` ended.
    pub fn remove(&mut self, target: usize, slots: usize) {
        if let Some(load) = self.loads.get_mut(target) {
            debug_assert!(*load >= slots, "target {target} held {load} < {slots}");
            *load = load.saturating_sub(slots);
        }
    }

    /// Every request ended.
    pub fn clear(&mut self) {
        self.loads.iter_mut().for_each(|l| *l = 0);
    }

    /// Slots taken on all targets.
    pub fn total(&self) -> usize {
        self.loads.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(load: usize, capacity: usize) -> Room {
        Room {
            load,
            capacity,
            avoided: false,
        }
    }

    #[test]
    fn the_emptiest_target_relative_to_its_size_wins_and_full_ones_never_do() {
        assert_eq!(emptiest([room(5, 10), room(1, 4), room(0, 0)]), Some(1));
        // Equal fill: the first.
        assert_eq!(emptiest([room(2, 4), room(1, 2), room(4, 8)]), Some(0));
        assert_eq!(emptiest([room(4, 4), room(0, 0), room(3, 3)]), None);
        assert_eq!(emptiest(std::iter::empty()), None);
        // An avoided target is taken only when nothing else has room.
        let avoided = Room {
            avoided: true,
            ..room(0, 10)
        };
        assert_eq!(emptiest([avoided, room(9, 10)]), Some(1));
        assert_eq!(emptiest([avoided, room(10, 10)]), Some(0));
    }

    #[test]
    fn loads_follow_requests_starting_and_ending() {
        let mut loads = Loads::default();
        assert_eq!(loads.get(3), 0);
        loads.add(3, 2);
        loads.add(0, 1);
        loads.add(3, 1);
        assert_eq!((loads.get(0), loads.get(3), loads.total()), (1, 3, 4));
        loads.remove(3, 2);
        assert_eq!(loads.get(3), 1);
        loads.remove(7, 1); // a target never used: nothing to release
        loads.clear();
        assert_eq!(loads.total(), 0);
        loads.add(1, 1);
        assert_eq!(loads.get(1), 1);
    }
}
