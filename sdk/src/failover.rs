//! The order in which a client tries its controllers, as a small state machine with no I/O.
//!
//! A client that knows several controllers tries the one that last answered first, then the
//! others in the operator's order; a controller that failed since it last answered (a refused
//! or timed-out connection, a stream that died under us) goes to the back, so that the next
//! call, or a stream's reconnection, tries a controller not yet known to be down before going
//! back to one that is. Nothing here expires: a failed controller is tried again as soon as
//! everything ahead of it has failed too, and it moves back to the front by answering.

/// The state of one client (and its clones): which controller answered last, which failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rotation {
    len: usize,
    /// The controller that answered last.
    preferred: Option<usize>,
    /// Controllers that failed since they last answered, one bit each (lists hold at most
    /// [`umbra_pki::MAX_CONTROLLERS`] addresses).
    failed: u32,
}

impl Rotation {
    /// A rotation over `len` controllers, none tried yet: the operator's order.
    pub(crate) fn new(len: usize) -> Rotation {
        Rotation {
            len: len.min(32),
            preferred: None,
            failed: 0,
        }
    }

    /// The order in which to try the controllers now: those not known to be down before those
    /// that are, and within each group the one that answered last first, then the operator's
    /// order.
    pub(crate) fn order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len).collect();
        order.sort_by_key(|&i| (self.is_failed(i), self.preferred != Some(i), i));
        order
    }

    /// Controller `i` answered: it is tried first from now on.
    pub(crate) fn succeeded(&mut self, i: usize) {
        if i < self.len {
            self.preferred = Some(i);
            self.failed &= !(1 << i);
        }
    }

    /// Controller `i` could not be reached, or a stream from it died: it goes to the back.
    pub(crate) fn failed(&mut self, i: usize) {
        if i < self.len {
            self.failed |= 1 << i;
        }
    }

    /// The controller that answered last, if any did.
    pub(crate) fn preferred(&self) -> Option<usize> {
        self.preferred
    }

    fn is_failed(&self, i: usize) -> bool {
        self.failed & (1 << i) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_in_the_operators_order() {
        assert_eq!(Rotation::new(3).order(), [0, 1, 2]);
        assert_eq!(Rotation::new(1).order(), [0]);
    }

    #[test]
    fn the_one_that_answered_goes_first_then_the_others_in_order() {
        let mut r = Rotation::new(3);
        r.succeeded(2);
        assert_eq!(r.order(), [2, 0, 1]);
        assert_eq!(r.preferred(), Some(2));
        r.succeeded(1);
        assert_eq!(r.order(), [1, 0, 2]);
    }

    #[test]
    fn failed_ones_go_last_until_they_answer_again() {
        let mut r = Rotation::new(3);
        r.succeeded(0);
        // The stream from 0 died: 1 and 2 are tried before it.
        r.failed(0);
        assert_eq!(r.order(), [1, 2, 0]);
        // 1 cannot be reached either.
        r.failed(1);
        assert_eq!(r.order(), [2, 0, 1]);
        // 2 answers: first, and the failed ones keep their place behind it.
        r.succeeded(2);
        assert_eq!(r.order(), [2, 0, 1]);
        // 0 is back.
        r.succeeded(0);
        assert_eq!(r.order(), [0, 2, 1]);
    }

    #[test]
    fn all_failed_is_the_usual_order_again() {
        let mut r = Rotation::new(2);
        r.failed(0);
        r.failed(1);
        assert_eq!(r.order(), [0, 1]);
        // Out-of-range indexes change nothing.
        r.failed(7);
        r.succeeded(7);
        assert_eq!(r.order(), [0, 1]);
    }
}
