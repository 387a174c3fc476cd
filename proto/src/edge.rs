//! Diffs of an identity's edge view, and the sans-IO reader of `GET /v1/edge/watch`.
//!
//! The controller sends a watcher its whole view once, then only what changed
//! ([`EdgeView::diff`]); the watcher rebuilds each whole view with [`EdgeView::apply`]. Both
//! are pure, so `apply(old, diff(old, new)) == new` is property-tested without a network
//! (`proto/tests/edge_diff.rs`). A diff that does not fit the view it is applied to (it removes
//! what is not there, adds what already is) is an error, never a guess: the watcher drops its
//! view and watches again, whole view first, so it never acts on a wrong one.

use std::collections::{BTreeMap, HashSet};

use umbra_policies::Name;

use crate::api::{
    EdgeFrame, EdgeService, EdgeView, EdgeViewDiff, GrantChanges, GrantKey, HostedGrant,
};
use crate::frame::{FrameDecoder, FrameError};

/// The most services, grants and routers together that a view rebuilt from diffs may hold: a
/// bound on what a stream of small diffs can make a watcher keep, far above any real view
/// (a gateway dialled by a million identities through four policies each).
pub const MAX_VIEW_ENTRIES: usize = 1 << 22;

/// Why a diff does not fit the view it was applied to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiffError {
    /// It removes a service the view does not hold (or names it twice).
    #[error("the diff removes service {0}, which the view does not hold")]
    NoSuchService(Name),
    /// It puts one service twice.
    #[error("the diff puts service {0} twice")]
    DuplicatePut(Name),
    /// It changes a service the view holds and carries grants with it (a changed service's
    /// grants change through grant changes only).
    #[error("the diff changes service {0} and carries grants for it")]
    GrantsOnChange(Name),
    /// It changes the grants of a service the view does not hold.
    #[error("the diff changes grants of service {0}, which the view does not hold")]
    GrantsOfMissing(Name),
    /// It removes a grant the service does not have (or names it twice).
    #[error("the diff removes a grant of {service} that is not there ({key:?})")]
    NoSuchGrant {
        /// The hosted service.
        service: Name,
        /// The grant it named.
        key: GrantKey,
    },
    /// It adds a grant the service already has.
    #[error("the diff adds a grant of {service} that is already there ({key:?})")]
    GrantExists {
        /// The hosted service.
        service: Name,
        /// The grant it named.
        key: GrantKey,
    },
    /// The view would hold more than [`MAX_VIEW_ENTRIES`].
    #[error("the view would hold more than {MAX_VIEW_ENTRIES} entries")]
    TooLarge,
}

impl HostedGrant {
    /// The grant's key among its service's grants.
    pub fn key(&self) -> GrantKey {
        GrantKey {
            identity: self.identity.clone(),
            policy: self.policy.clone(),
        }
    }
}

/// The canonical order of a service's grants: by caller name, then policy, then caller id.
fn grant_order(a: &HostedGrant, b: &HostedGrant) -> std::cmp::Ordering {
    (&a.name, &a.policy, &a.identity).cmp(&(&b.name, &b.policy, &b.identity))
}

/// Whether two services differ in anything but their grants.
fn same_but_grants(a: &EdgeService, b: &EdgeService) -> bool {
    a.name == b.name && a.intercepts == b.intercepts && a.dial == b.dial && a.bind == b.bind
}

impl EdgeViewDiff {
    /// Whether it changes nothing (the controller never sends one).
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty()
            && self.put.is_empty()
            && self.grants.is_empty()
            && self.routers.is_none()
    }
}

impl EdgeView {
    /// Puts the view in the one order diffs assume: services by name, each service's grants by
    /// caller name, policy and caller id. The controller sends only canonical views.
    pub fn canonicalize(&mut self) {
        self.services.sort_by(|a, b| a.name.cmp(&b.name));
        for s in &mut self.services {
            s.grants.sort_by(grant_order);
        }
    }

    /// What turns `old` into `new`; empty exactly when they are equal. Both must be canonical
    /// (as every view the controller makes is) with unique service names and grant keys.
    pub fn diff(old: &EdgeView, new: &EdgeView) -> EdgeViewDiff {
        let before: BTreeMap<&Name, &EdgeService> =
            old.services.iter().map(|s| (&s.name, s)).collect();
        let after: BTreeMap<&Name, &EdgeService> =
            new.services.iter().map(|s| (&s.name, s)).collect();
        let mut diff = EdgeViewDiff {
            removed: (before.keys())
                .filter(|n| !after.contains_key(*n))
                .map(|n| (*n).clone())
                .collect(),
            routers: (old.routers != new.routers).then(|| new.routers.clone()),
            ..EdgeViewDiff::default()
        };
        for (name, s) in &after {
            let Some(was) = before.get(name) else {
                diff.put.push((*s).clone());
                continue;
            };
            if !same_but_grants(was, s) {
                diff.put.push(EdgeService {
                    grants: Vec::new(),
                    ..(*s).clone()
                });
            }
            if let Some(changes) = grant_changes(was, s) {
                diff.grants.push(changes);
            }
        }
        diff
    }

    /// Applies a diff made by [`EdgeView::diff`] against this view. On error the view is left
    /// half-changed and must be dropped (the watcher watches again, whole view first).
    pub fn apply(&mut self, diff: &EdgeViewDiff) -> Result<(), DiffError> {
        self.remove_services(&diff.removed)?;
        self.put_services(&diff.put)?;
        for changes in &diff.grants {
            let i = (self.services)
                .binary_search_by(|s| s.name.cmp(&changes.service))
                .map_err(|_| DiffError::GrantsOfMissing(changes.service.clone()))?;
            change_grants(&mut self.services[i], changes)?;
        }
        if let Some(routers) = &diff.routers {
            self.routers = routers.clone();
        }
        let entries = self.routers.len()
            + (self.services.iter())
                .map(|s| 1 + s.grants.len())
                .sum::<usize>();
        if entries > MAX_VIEW_ENTRIES {
            return Err(DiffError::TooLarge);
        }
        Ok(())
    }

    fn remove_services(&mut self, names: &[Name]) -> Result<(), DiffError> {
        if names.is_empty() {
            return Ok(());
        }
        let mut gone: HashSet<&Name> = HashSet::with_capacity(names.len());
        for n in names {
            let held = self.services.binary_search_by(|s| s.name.cmp(n)).is_ok();
            if !held || !gone.insert(n) {
                return Err(DiffError::NoSuchService(n.clone()));
            }
        }
        self.services.retain(|s| !gone.contains(&s.name));
        Ok(())
    }

    fn put_services(&mut self, put: &[EdgeService]) -> Result<(), DiffError> {
        let mut seen: HashSet<&Name> = HashSet::with_capacity(put.len());
        // Added after the loop, so that the binary searches see a sorted list.
        let mut added = Vec::new();
        for s in put {
            if !seen.insert(&s.name) {
                return Err(DiffError::DuplicatePut(s.name.clone()));
            }
            match self.services.binary_search_by(|x| x.name.cmp(&s.name)) {
                Ok(i) => {
                    if !s.grants.is_empty() {
                        return Err(DiffError::GrantsOnChange(s.name.clone()));
                    }
                    let held = &mut self.services[i];
                    held.intercepts = s.intercepts.clone();
                    held.dial = s.dial;
                    held.bind = s.bind;
                }
                Err(_) => {
                    let mut new = s.clone();
                    new.grants.sort_by(grant_order);
                    let mut keys = HashSet::with_capacity(new.grants.len());
                    if let Some(g) = new.grants.iter().find(|g| !keys.insert(g.key())) {
                        return Err(DiffError::GrantExists {
                            service: s.name.clone(),
                            key: g.key(),
                        });
                    }
                    added.push(new);
                }
            }
        }
        if !added.is_empty() {
            self.services.extend(added);
            self.services.sort_by(|a, b| a.name.cmp(&b.name));
        }
        Ok(())
    }
}

/// The grant changes from `was` to `now` (the same service), if any.
fn grant_changes(was: &EdgeService, now: &EdgeService) -> Option<GrantChanges> {
    if was.grants == now.grants {
        return None;
    }
    let before: BTreeMap<GrantKey, &HostedGrant> =
        was.grants.iter().map(|g| (g.key(), g)).collect();
    let after: BTreeMap<GrantKey, &HostedGrant> = now.grants.iter().map(|g| (g.key(), g)).collect();
    let removed: Vec<GrantKey> = (before.iter())
        .filter(|(k, g)| after.get(*k) != Some(*g))
        .map(|(k, _)| k.clone())
        .collect();
    let added: Vec<HostedGrant> = (after.iter())
        .filter(|(k, g)| before.get(*k) != Some(*g))
        .map(|(_, g)| (*g).clone())
        .collect();
    (!removed.is_empty() || !added.is_empty()).then(|| GrantChanges {
        service: now.name.clone(),
        removed,
        added,
    })
}

/// Removes, then adds, one service's grants, keeping them in canonical order. Linear in the
/// service's grants whatever the size of the change, so one dialer joining a gateway with
/// 100,000 grants costs one pass, not one pass per grant.
fn change_grants(service: &mut EdgeService, changes: &GrantChanges) -> Result<(), DiffError> {
    let missing = |key: &GrantKey| DiffError::NoSuchGrant {
        service: service.name.clone(),
        key: key.clone(),
    };
    if !changes.removed.is_empty() {
        let mut gone: HashSet<(&str, &str)> = HashSet::with_capacity(changes.removed.len());
        for k in &changes.removed {
            if !gone.insert((k.identity.as_str(), k.policy.as_str())) {
                return Err(missing(k));
            }
        }
        let mut found: HashSet<(&str, &str)> = HashSet::with_capacity(gone.len());
        let grants = std::mem::take(&mut service.grants);
        let (dropped, kept): (Vec<_>, Vec<_>) = grants
            .into_iter()
            .partition(|g| gone.contains(&(g.identity.as_str(), g.policy.as_str())));
        service.grants = kept;
        for g in &dropped {
            found.insert((g.identity.as_str(), g.policy.as_str()));
        }
        if let Some(k) = (changes.removed.iter())
            .find(|k| !found.contains(&(k.identity.as_str(), k.policy.as_str())))
        {
            return Err(missing(k));
        }
    }
    if !changes.added.is_empty() {
        let mut keys: HashSet<GrantKey> = service.grants.iter().map(HostedGrant::key).collect();
        for g in &changes.added {
            if !keys.insert(g.key()) {
                return Err(DiffError::GrantExists {
                    service: service.name.clone(),
                    key: g.key(),
                });
            }
        }
        service.grants.extend(changes.added.iter().cloned());
        service.grants.sort_by(grant_order);
    }
    Ok(())
}

/// Why a watch cannot go on: the caller ends it and watches again (whole view first).
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// A frame could not be read.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A diff came before any whole view.
    #[error("a diff before any whole view")]
    NoBase,
    /// A diff does not fit the view.
    #[error("the controller's diff does not fit the view: {0}")]
    Diff(#[from] DiffError),
}

/// Reads `GET /v1/edge/watch` from bytes in any split: each frame, whole view or diff, yields
/// the whole view it leads to. Sans-IO; the SDK's `EdgeWatch` and the tunneler drive it. After
/// an error it holds no view and yields nothing more: the watch must be opened again.
#[derive(Debug)]
pub struct EdgeWatchDecoder {
    frames: FrameDecoder,
    view: Option<EdgeView>,
    failed: bool,
}

impl EdgeWatchDecoder {
    /// A decoder that refuses frames longer than `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        EdgeWatchDecoder {
            frames: FrameDecoder::new(max_frame),
            view: None,
            failed: false,
        }
    }

    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if !self.failed {
            self.frames.push(bytes);
        }
    }

    /// The whole view after the next complete frame, if one has arrived.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<&EdgeView>, WatchError> {
        if self.failed {
            return Ok(None);
        }
        match self.step() {
            Ok(true) => Ok(self.view.as_ref()),
            Ok(false) => Ok(None),
            Err(e) => {
                self.failed = true;
                self.view = None;
                self.frames = FrameDecoder::new(0);
                Err(e)
            }
        }
    }

    fn step(&mut self) -> Result<bool, WatchError> {
        let Some(frame) = self.frames.next::<EdgeFrame>()? else {
            return Ok(false);
        };
        match frame {
            EdgeFrame::View(v) => self.view = Some(v),
            EdgeFrame::Diff(d) => self.view.as_mut().ok_or(WatchError::NoBase)?.apply(&d)?,
        }
        Ok(true)
    }
}
