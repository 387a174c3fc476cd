//! When a certificate is renewed: one rule for every process that renews its own (SDK contexts,
//! and so tunnelers and gateways; routers; the command line's admin certificate).
//!
//! Renewal is due once less than a third of the certificate's *nominal* validity remains. The
//! nominal validity is what the controller meant to grant: our CA backdates `notBefore` by
//! [`ISSUE_BACKDATE_SECS`] for clock skew, and counting that would make a short certificate
//! renew at once. Pure: the caller passes `now` and sleeps, retries and floors on its own.

use crate::Timestamp;

/// How far the CA backdates `notBefore` for clock skew; not part of the lifetime the
/// controller meant to grant.
pub const ISSUE_BACKDATE_SECS: u64 = 300;

/// When a certificate should be renewed, as seen at some `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RenewAt {
    /// Renewal is due (or overdue): renew now.
    Now,
    /// Renewal becomes due at this time.
    At(Timestamp),
}

/// The time renewal becomes due for a certificate valid from `not_before` to `not_after`:
/// `not_after` less a third of the nominal validity. A certificate shorter than the backdate
/// did not come from our CA and is taken as it is.
pub fn deadline(not_before: Timestamp, not_after: Timestamp) -> Timestamp {
    let total = not_after.0.saturating_sub(not_before.0);
    let nominal = if total > ISSUE_BACKDATE_SECS {
        total - ISSUE_BACKDATE_SECS
    } else {
        total
    };
    Timestamp(not_after.0 - nominal / 3)
}

/// Whether renewal is due at `now`, and if not, when it will be.
pub fn due(not_before: Timestamp, not_after: Timestamp, now: Timestamp) -> RenewAt {
    let at = deadline(not_before, not_after);
    if now >= at {
        RenewAt::Now
    } else {
        RenewAt::At(at)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const DAY: u64 = 86_400;

    #[test]
    fn a_day_certificate_renews_sixteen_hours_after_issue() {
        let issued = 1_000_000;
        let (nb, na) = (Timestamp(issued - 300), Timestamp(issued + DAY));
        assert_eq!(deadline(nb, na), Timestamp(issued + 16 * 3600));
        assert_eq!(
            due(nb, na, Timestamp(issued)),
            RenewAt::At(Timestamp(issued + 16 * 3600))
        );
        assert_eq!(due(nb, na, Timestamp(issued + 16 * 3600)), RenewAt::Now);
        // Six seconds (plus the backdate): after four, not at once.
        let short = Timestamp(issued + 6);
        assert_eq!(deadline(nb, short), Timestamp(issued + 4));
        // Shorter than the backdate: not from our CA, taken as it is.
        let foreign = deadline(Timestamp(issued), Timestamp(issued + 300));
        assert_eq!(foreign, Timestamp(issued + 200));
        // Expired, or a validity of zero: due.
        assert_eq!(
            due(Timestamp(issued), Timestamp(issued), Timestamp(issued)),
            RenewAt::Now
        );
    }

    proptest! {
        #[test]
        fn the_deadline_leaves_a_third_and_is_monotone(
            issued in 0u64..4_000_000_000,
            nominal in 0u64..400 * DAY,
            now in 0u64..5_000_000_000,
            later in 0u64..DAY,
        ) {
            let (nb, na) = (
                Timestamp(issued.saturating_sub(ISSUE_BACKDATE_SECS)),
                Timestamp(issued + nominal),
            );
            let at = deadline(nb, na);
            // Inside the validity, never before two thirds of what was granted has passed
            // (a certificate whose backdate was cut by the epoch renews no later).
            prop_assert!(nb <= at && at <= na);
            prop_assert!(na.0 - at.0 <= nominal / 3 + 1 || nominal <= ISSUE_BACKDATE_SECS);
            if issued >= ISSUE_BACKDATE_SECS {
                prop_assert_eq!(na.0 - at.0, nominal / 3);
            }
            // Due exactly from the deadline on, and once due, due for good.
            let d = due(nb, na, Timestamp(now));
            prop_assert_eq!(d == RenewAt::Now, now >= at.0);
            if d == RenewAt::Now {
                prop_assert_eq!(due(nb, na, Timestamp(now + later)), RenewAt::Now);
            } else {
                prop_assert_eq!(d, RenewAt::At(at));
            }
        }
    }
}
