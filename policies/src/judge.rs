//! The judge: the only place that decides whether a certificate may connect ([`admit`]) and
//! whether an admitted identity may open a stream ([`check_stream`]).
//!
//! Routers and the controller used to decide admission each in their own way, and the router
//! looked up a service's hosting apart from the grant; now every shell fills a [`Presented`]
//! from the certificate its handshake verified, asks here, and acts on the answer: a
//! [`StreamPermit`] that carries everything needed to serve the stream, or a [`Deny`] that
//! `umbra_proto::verdict` turns into the one wire answer for that reason.
//!
//! Both functions read the world through small traits ([`Roster`], [`Grants`]) rather than a
//! concrete type, so that a router's compiled [`Index`], the controller's store and a future
//! incremental index all answer the same questions the same way.

use crate::decision::{Deny, Permit};
use crate::index::{Activity, Index};
use crate::model::{
    Action, HostPort, Hosting, Identity, IdentityId, IdentityKind, Service, Timestamp,
};
use crate::name::Name;

/// What a handshake-verified certificate says about its holder, as plain data (the shells
/// parse the certificate; the core never sees X.509).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Presented<'a> {
    /// The identity name in the certificate's SPIFFE id.
    pub name: &'a str,
    /// The identity kind in the certificate's SPIFFE id.
    pub kind: IdentityKind,
    /// The certificate's serial number, lower-case hex as the controller records it.
    pub serial: &'a str,
    /// The identity id, when the certificate carries one. Today's certificates carry only the
    /// SPIFFE id, so shells pass `None` and [`Roster::certificate`] ties the serial to its
    /// owner instead.
    pub identity: Option<&'a IdentityId>,
    /// The end of the certificate's validity. The handshake (rustls) judges the validity
    /// window when the connection starts; [`admitted_until`] says when a live connection must
    /// end.
    pub not_after: Timestamp,
}

/// What the deciding party knows about a certificate serial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertRecord<'a> {
    /// Issued by this controller to `owner`, and not revoked (the controller records every
    /// certificate it issues).
    Issued {
        /// The identity it was issued to.
        owner: &'a IdentityId,
    },
    /// Revoked before its end; it was issued to `owner`.
    Revoked {
        /// The identity it was issued to.
        owner: &'a IdentityId,
    },
    /// Not on the revocation list, and this party keeps no list of issued certificates (a
    /// router holds only revocations). Nothing is known against it.
    NotRevoked,
    /// This party records every certificate it issues, and this one is not among them: another
    /// controller's (or a restored backup's) certificate, not ours.
    NeverIssued,
}

/// Who exists and which certificates are good: what [`admit`] needs.
pub trait Roster {
    /// The identity of this name, of any kind (names are unique across kinds).
    fn identity_named(&self, name: &str) -> Option<&Identity>;
    /// What is known about the certificate with this serial.
    fn certificate(&self, serial: &str) -> CertRecord<'_>;
}

/// Grants and services: what [`check_stream`] needs.
pub trait Grants {
    /// Whether `identity` may perform `action` on `service` at `now`, as [`Index::check`]
    /// decides it (identity activity included).
    fn grant(
        &self,
        action: Action,
        identity: &IdentityId,
        service: &str,
        now: Timestamp,
    ) -> Result<Permit, Deny>;
    /// The service of this name.
    fn service(&self, name: &str) -> Option<&Service>;
}

impl Grants for Index {
    fn grant(
        &self,
        action: Action,
        identity: &IdentityId,
        service: &str,
        now: Timestamp,
    ) -> Result<Permit, Deny> {
        self.check(action, identity, service, now)
    }

    fn service(&self, name: &str) -> Option<&Service> {
        self.state().services.get(name)
    }
}

/// The identity a certificate speaks for, if it may connect at `now` through a door that
/// admits `kind` (`None`: any kind, e.g. renewal).
///
/// The checks, in order: the serial is not revoked ([`Deny::CertRevoked`]); if the roster
/// records issued certificates, this one was issued ([`Deny::UnknownIdentity`] otherwise); an
/// identity of the certificate's name and kind exists, and is the one the certificate was
/// issued to, not an earlier namesake ([`Deny::UnknownIdentity`]); its kind is the door's
/// ([`Deny::WrongKind`]); it is not revoked, disabled or expired.
///
/// "Issued to this very identity" is decided here for every party, with the data each has.
/// The controller's roster knows every certificate it issued, so it refuses certificates it
/// never issued and certificates of a deleted namesake directly. A router's roster holds only
/// the revocation list; that is enough for namesakes, because deleting an identity revokes
/// every live certificate it holds in the same commit, ordered before the delete. What only
/// the controller can refuse is a certificate it has no record of (another controller's, or
/// one issued after the backup it was restored from): routers would need every issued serial,
/// which changes on each renewal, to do the same.
pub fn admit<'r, R: Roster + ?Sized>(
    roster: &'r R,
    presented: &Presented<'_>,
    kind: Option<IdentityKind>,
    now: Timestamp,
) -> Result<&'r Identity, Deny> {
    let owner = match roster.certificate(presented.serial) {
        CertRecord::Revoked { .. } => return Err(Deny::CertRevoked),
        CertRecord::NeverIssued => return Err(Deny::UnknownIdentity),
        CertRecord::Issued { owner } => Some(owner),
        CertRecord::NotRevoked => None,
    };
    let identity = (roster.identity_named(presented.name))
        .filter(|i| i.kind == presented.kind)
        .ok_or(Deny::UnknownIdentity)?;
    let namesake = |o: Option<&IdentityId>| o.is_some_and(|o| *o != identity.id);
    if namesake(owner) || namesake(presented.identity) {
        return Err(Deny::UnknownIdentity);
    }
    if kind.is_some_and(|k| k != identity.kind) {
        return Err(Deny::WrongKind);
    }
    Activity::of(identity).check(now)?;
    Ok(identity)
}

/// When an admitted connection stops being admissible by itself, with the reason it ends:
/// the earlier of the certificate's end and the identity's expiry. No delta announces the
/// passing of time, so shells arm a timer for it.
pub fn admitted_until(identity: &Identity, presented: &Presented<'_>) -> (Timestamp, Deny) {
    match identity.expires_at {
        Some(e) if e < presented.not_after => (e, Deny::IdentityExpired),
        _ => (presented.not_after, Deny::CertExpired),
    }
}

/// What a stream asks for: the service named in its request frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamRequest<'a> {
    /// Connect me to this service.
    Dial(&'a str),
    /// I host this service through the SDK; send me its callers.
    Bind(&'a str),
}

/// Where a permitted stream goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The router dials this address (after its egress checks).
    Address {
        /// The service's address.
        address: HostPort,
        /// Whether the router sends a PROXY protocol v2 header carrying the caller first.
        proxy_protocol: bool,
    },
    /// The stream goes to a connected SDK host that may still bind the service.
    SdkHost,
    /// A bind: the caller is registered as a host of the service.
    Host,
}

/// A stream is allowed: everything the shell needs to serve and audit it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPermit {
    /// The granting policy (the first by name), for logs and audit.
    pub policy: Name,
    /// Where the stream goes.
    pub target: Target,
}

/// Whether `identity` may open the stream it asked for at `now`, and where it goes.
///
/// A dial is permitted exactly when the grants allow it and the service has a hosting; a
/// nonexistent service and an ungranted one give the same [`Deny::NotGranted`].
pub fn check_stream<G: Grants + ?Sized>(
    grants: &G,
    identity: &IdentityId,
    request: StreamRequest<'_>,
    now: Timestamp,
) -> Result<StreamPermit, Deny> {
    let (action, service) = match request {
        StreamRequest::Dial(s) => (Action::Dial, s),
        StreamRequest::Bind(s) => (Action::Bind, s),
    };
    let Permit { policy } = grants.grant(action, identity, service, now)?;
    let target = match action {
        Action::Bind => Target::Host,
        Action::Dial => match grants.service(service) {
            Some(Service {
                hosting: Hosting::Address(address),
                proxy_protocol,
                ..
            }) => Target::Address {
                address: address.clone(),
                proxy_protocol: *proxy_protocol,
            },
            Some(Service {
                hosting: Hosting::Sdk,
                ..
            }) => Target::SdkHost,
            None => return Err(Deny::NoHosting),
        },
    };
    Ok(StreamPermit { policy, target })
}

#[cfg(test)]
mod tests;
