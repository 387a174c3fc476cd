//! The index's table of identities: per id, whether the identity may act and the sorted Dial
//! and Bind policies that select it, all in one block, so that a lookup reads the table entry
//! and that block and nothing else on the identity side.

use super::keyed::KeyedRows;
use super::rows::slot;
use crate::decision::Deny;
use crate::model::{Action, Identity, IdentityId, Timestamp};

/// The part of an identity that decides whether it may act at all. It is kept with the
/// identity and checked at lookup time, so that time passing needs nothing and disabling or
/// revoking needs no recompilation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Activity {
    disabled: bool,
    revoked: bool,
    expires_at: Option<Timestamp>,
}

const DISABLED: u32 = 1;
const REVOKED: u32 = 2;
const EXPIRES: u32 = 4;

/// How many words an encoded [`Activity`] takes.
const ACTIVITY_WORDS: usize = 3;

impl Activity {
    pub(crate) fn of(identity: &Identity) -> Self {
        Activity {
            disabled: identity.disabled,
            revoked: identity.revoked,
            expires_at: identity.expires_at,
        }
    }

    /// Revocation is reported first (it is final), then disabling, then expiry.
    pub(crate) fn check(self, now: Timestamp) -> Result<(), Deny> {
        if self.revoked {
            Err(Deny::IdentityRevoked)
        } else if self.disabled {
            Err(Deny::IdentityDisabled)
        } else if self.expires_at.is_some_and(|e| now >= e) {
            Err(Deny::IdentityExpired)
        } else {
            Ok(())
        }
    }

    fn encode(self) -> [u32; ACTIVITY_WORDS] {
        let flag = |set: bool, bit: u32| if set { bit } else { 0 };
        let expires = self.expires_at.map_or(0, |t| t.0);
        [
            flag(self.disabled, DISABLED)
                | flag(self.revoked, REVOKED)
                | flag(self.expires_at.is_some(), EXPIRES),
            expires as u32,
            (expires >> 32) as u32,
        ]
    }

    fn decode(words: [u32; ACTIVITY_WORDS]) -> Self {
        let [flags, low, high] = words;
        Activity {
            disabled: flags & DISABLED != 0,
            revoked: flags & REVOKED != 0,
            expires_at: (flags & EXPIRES != 0)
                .then(|| Timestamp(u64::from(high) << 32 | u64::from(low))),
        }
    }
}

/// What the index knows about one identity.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IdentityEntry<'a> {
    /// Whether it may act.
    pub(crate) activity: Activity,
    /// The Dial policies that select it, sorted.
    pub(crate) dial: &'a [u32],
    /// The Bind policies that select it, sorted.
    pub(crate) bind: &'a [u32],
}

impl<'a> IdentityEntry<'a> {
    /// The policies of `action` that select the identity, sorted.
    pub(crate) fn policies(&self, action: Action) -> &'a [u32] {
        match action {
            Action::Dial => self.dial,
            Action::Bind => self.bind,
        }
    }
}

/// Identities by id: `[activity.., number of Dial policies, Dial policies.., Bind policies..]`.
#[derive(Debug, Clone)]
pub(crate) struct Identities(KeyedRows);

impl Identities {
    /// The table of these identities (by the id they are stored under), each with the sorted
    /// Dial and Bind policies that select it.
    pub(crate) fn new<'a>(
        identities: impl ExactSizeIterator<Item = (&'a IdentityId, &'a Identity, Vec<u32>, Vec<u32>)>,
    ) -> Self {
        Identities(KeyedRows::new(identities.map(
            |(id, identity, dial, bind)| {
                let mut block = Activity::of(identity).encode().to_vec();
                block.push(slot(dial.len()));
                block.extend(dial);
                block.extend(bind);
                (id.as_str(), block)
            },
        )))
    }

    /// The identity with this id.
    pub(crate) fn get(&self, id: &str) -> Option<IdentityEntry<'_>> {
        self.0.get(id).map(decode)
    }

    /// The identity in `slot` (its position in id order).
    pub(crate) fn at(&self, slot: u32) -> IdentityEntry<'_> {
        decode(self.0.at(slot))
    }

    /// A copy in which the identity `id` has this activity; `None` if there is no such id.
    pub(crate) fn with_activity(&self, id: &str, activity: Activity) -> Option<Identities> {
        let mut copy = self.clone();
        let block = copy.0.get_mut(id)?;
        block[..ACTIVITY_WORDS].copy_from_slice(&activity.encode());
        Some(copy)
    }

    /// Heap bytes held, for capacity planning.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.0.heap_bytes()
    }
}

/// Reads a block written by [`Identities::new`], which always starts with the activity and the
/// number of Dial policies.
fn decode(block: &[u32]) -> IdentityEntry<'_> {
    let (activity, rest) = block.split_at(ACTIVITY_WORDS);
    let (dial, bind) = rest[1..].split_at(rest[0] as usize);
    IdentityEntry {
        activity: Activity::decode([activity[0], activity[1], activity[2]]),
        dial,
        bind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_round_trips_through_its_encoding() {
        for disabled in [false, true] {
            for revoked in [false, true] {
                for expires_at in [None, Some(Timestamp(0)), Some(Timestamp(u64::MAX - 7))] {
                    let a = Activity {
                        disabled,
                        revoked,
                        expires_at,
                    };
                    assert_eq!(Activity::decode(a.encode()), a);
                }
            }
        }
    }
}
