//! The budget of authenticated connections: per identity, and a share reserved for admins and
//! routers. Sans-IO (the server holds one behind a mutex and gives slots back on drop).
//!
//! A verified certificate proves who is connecting, not that it behaves: a compromised agent's
//! certificate once held every authenticated slot with slow request bodies, and admins and
//! routers were refused until it stopped. Each identity may now hold at most
//! [`AuthLimits::per_identity`] connections, and agents together at most
//! [`AuthLimits::agents`], so the rest is always there for the identities that run the
//! overlay.

use std::collections::HashMap;

/// The bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthLimits {
    /// Authenticated connections in all.
    pub total: usize,
    /// Connections one identity may hold.
    pub per_identity: usize,
    /// Connections all agents together may hold (the rest is kept for admins and routers).
    pub agents: usize,
}

impl Default for AuthLimits {
    fn default() -> Self {
        AuthLimits {
            total: 4096,
            per_identity: 32,
            agents: 3584,
        }
    }
}

/// Why an authenticated connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthRefusal {
    /// This identity already holds its share.
    Identity,
    /// Agents together hold theirs.
    Agents,
    /// Every slot is taken.
    Total,
}

/// Who holds how many authenticated connections.
#[derive(Debug, Default)]
pub struct AuthBudget {
    limits: AuthLimits,
    by_identity: HashMap<String, usize>,
    total: usize,
    agents: usize,
}

impl AuthBudget {
    /// An empty budget.
    pub fn new(limits: AuthLimits) -> AuthBudget {
        AuthBudget {
            limits,
            ..AuthBudget::default()
        }
    }

    /// Takes a slot for `identity` (its SPIFFE id); `agent` says whether it is an agent.
    pub fn admit(&mut self, identity: &str, agent: bool) -> Result<(), AuthRefusal> {
        let held = self.by_identity.get(identity).copied().unwrap_or(0);
        if held >= self.limits.per_identity {
            return Err(AuthRefusal::Identity);
        }
        if agent && self.agents >= self.limits.agents {
            return Err(AuthRefusal::Agents);
        }
        if self.total >= self.limits.total {
            return Err(AuthRefusal::Total);
        }
        *self.by_identity.entry(identity.to_owned()).or_insert(0) += 1;
        self.total += 1;
        if agent {
            self.agents += 1;
        }
        Ok(())
    }

    /// Gives back a slot taken by [`admit`](Self::admit).
    pub fn release(&mut self, identity: &str, agent: bool) {
        if let Some(n) = self.by_identity.get_mut(identity) {
            *n -= 1;
            if *n == 0 {
                self.by_identity.remove(identity);
            }
            self.total -= 1;
            if agent {
                self.agents -= 1;
            }
        }
    }

    /// Slots held now: in all, by agents, and by how many identities.
    pub fn held(&self) -> (usize, usize, usize) {
        (self.total, self.agents, self.by_identity.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SMALL: AuthLimits = AuthLimits {
        total: 10,
        per_identity: 3,
        agents: 6,
    };

    #[test]
    fn one_identity_holds_its_share_and_agents_leave_room_for_admins_and_routers() {
        let mut b = AuthBudget::new(SMALL);
        for _ in 0..3 {
            b.admit("agent/a", true).unwrap();
        }
        assert_eq!(b.admit("agent/a", true), Err(AuthRefusal::Identity));
        for _ in 0..3 {
            b.admit("agent/b", true).unwrap();
        }
        assert_eq!(b.admit("agent/c", true), Err(AuthRefusal::Agents));
        // The reserve is for everyone else.
        for who in ["admin/x", "admin/x", "router/r", "router/r"] {
            b.admit(who, false).unwrap();
        }
        assert_eq!(b.admit("router/s", false), Err(AuthRefusal::Total));
        b.release("agent/a", true);
        b.admit("agent/c", true).unwrap();
        assert_eq!(b.held(), (10, 6, 5));
    }

    proptest! {
        #[test]
        fn bounds_hold_and_everything_given_back_leaves_nothing(
            ops in proptest::collection::vec((0u8..6, any::<bool>()), 1..300)
        ) {
            let mut b = AuthBudget::new(SMALL);
            let mut held: Vec<(String, bool)> = vec![];
            for (who, release) in ops {
                let agent = who < 4;
                let id = format!("{}/{who}", if agent { "agent" } else { "router" });
                if release {
                    if let Some(i) = held.iter().position(|(h, _)| *h == id) {
                        let (h, a) = held.swap_remove(i);
                        b.release(&h, a);
                    }
                } else if b.admit(&id, agent).is_ok() {
                    held.push((id, agent));
                }
                let (total, agents, _) = b.held();
                prop_assert_eq!(total, held.len());
                prop_assert!(total <= SMALL.total && agents <= SMALL.agents);
                for (h, _) in &held {
                    prop_assert!(held.iter().filter(|(x, _)| x == h).count() <= SMALL.per_identity);
                }
            }
            for (h, a) in held.drain(..) {
                b.release(&h, a);
            }
            prop_assert_eq!(b.held(), (0, 0, 0));
        }
    }
}
