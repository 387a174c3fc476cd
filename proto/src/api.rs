//! Request and response bodies of the controller's HTTPS API (enrollment, management, renewal).
//!
//! Shared by the controller and every client so both sides agree on one definition. Requests are
//! `deny_unknown_fields`: a misspelt field is an error, never silently ignored.

use serde::{Deserialize, Serialize};
use umbra_policies::{
    Action, Identity, IdentityKind, Name, Selector, Semantic, Service, ServicePolicy, Timestamp,
};

/// Largest request body the controller reads (an `apply` document can be large).
pub const MAX_REQUEST_BODY: usize = 16 * 1024 * 1024;

/// The error body of every non-2xx response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable code, e.g. `not_found`, `invalid`, `conflict`, `forbidden`.
    pub code: String,
    /// One line for a person.
    pub message: String,
}

/// `POST /v1/enroll`: a one-time token and a CSR; the private key stays with the enrollee.
/// `Debug` leaves the token out.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The enrollment token (compact JWT).
    pub token: String,
    /// The certificate signing request, DER, base64 (standard alphabet).
    pub csr: String,
}

/// What an enrollee needs besides its own key to build its identity file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollResponse {
    /// The identity's certificate (leaf, then intermediate), PEM.
    pub cert_pem: String,
    /// The root CA certificate, PEM.
    pub ca_pem: String,
    /// The identity as the controller knows it.
    pub identity: Identity,
    /// The trust domain of the SPIFFE ids.
    pub trust_domain: String,
}

/// `POST /v1/renew`: a fresh CSR, authenticated by the current certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// The certificate signing request, DER, base64.
    pub csr: String,
}

/// The renewed certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewResponse {
    /// The new certificate (leaf, then intermediate), PEM.
    pub cert_pem: String,
    /// Its expiry.
    pub not_after: Timestamp,
}

/// `POST /v1/identities` and `POST /v1/routers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateIdentityRequest {
    /// The new identity's name.
    pub name: Name,
    /// `agent` or `admin` (routers are created through `/v1/routers`).
    #[serde(default = "default_kind")]
    pub kind: IdentityKind,
    /// Role attributes.
    #[serde(default)]
    pub roles: Vec<Name>,
    /// How long the enrollment token is valid, in seconds (default 30 minutes).
    #[serde(default)]
    pub token_ttl_secs: Option<u64>,
}

fn default_kind() -> IdentityKind {
    IdentityKind::Agent
}

/// A created identity and its one-time enrollment token. `Debug` leaves the token out.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenResponse {
    /// The identity.
    pub identity: Identity,
    /// The enrollment token; it works once.
    pub token: String,
    /// When the token stops working.
    pub token_expires_at: Timestamp,
}

/// `POST /v1/identities/{name}/token`: a new token for an existing identity.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// How long the token is valid, in seconds.
    #[serde(default)]
    pub token_ttl_secs: Option<u64>,
}

/// One issued certificate of an identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertInfo {
    /// Serial number, hex.
    pub serial: String,
    /// When it was issued.
    pub issued_at: Timestamp,
    /// When it expires.
    pub not_after: Timestamp,
    /// Whether it was revoked.
    pub revoked: bool,
}

/// An identity with its enrollment state, as `identity list|show` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityView {
    /// The identity.
    #[serde(flatten)]
    pub identity: Identity,
    /// Whether it has ever enrolled.
    pub enrolled: bool,
    /// Certificates issued to it, newest first (only in `show`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certs: Vec<CertInfo>,
}

/// `POST /v1/services` (create) body is a [`Service`]; the response is the stored value.
pub type ServiceBody = Service;

/// `POST /v1/policies`: grant access.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    /// The policy's name; generated from the selectors when absent.
    #[serde(default)]
    pub name: Option<Name>,
    /// Dial (default) or Bind.
    #[serde(default = "default_action")]
    pub action: Action,
    /// Identity selectors.
    pub identities: Vec<Selector>,
    /// Service selectors.
    pub services: Vec<Selector>,
    /// How selectors combine.
    #[serde(default)]
    pub semantic: Semantic,
    /// What the grant allows at a gateway hosting the service (flat fields on the wire).
    #[serde(flatten)]
    pub limits: umbra_policies::GrantLimits,
}

fn default_action() -> Action {
    Action::Dial
}

/// The stored policy, in responses.
pub type PolicyBody = ServicePolicy;

/// `GET /v1/explain?identity=NAME&service=NAME&action=dial`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExplainResponse {
    /// Whether access is granted now.
    pub allowed: bool,
    /// The policies that grant it.
    pub granting: Vec<Name>,
    /// Why, in one sentence.
    pub reason: String,
    /// The limits of each granting policy that has any (what routers and gateways enforce).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub limits: std::collections::BTreeMap<Name, umbra_policies::GrantLimits>,
}

/// `POST /v1/apply`: make the controller match a document.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyRequest {
    /// The YAML document.
    pub document: String,
    /// Only compute and return the plan.
    #[serde(default)]
    pub dry_run: bool,
}

/// The plan, and whether it was carried out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyResponse {
    /// One line per change, as a diff.
    pub plan: String,
    /// How many changes the plan has.
    pub changes: usize,
    /// Whether they were committed.
    pub applied: bool,
}

/// `GET /v1/export`: the current state as a document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportResponse {
    /// The YAML document.
    pub document: String,
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Monotonic id.
    pub id: u64,
    /// When.
    pub at: Timestamp,
    /// Who (a SPIFFE id, or `controller` for the controller itself).
    pub actor: String,
    /// What, e.g. `identity.create`.
    pub action: String,
    /// On what.
    pub target: String,
    /// Details, as JSON.
    pub detail: serde_json::Value,
}

/// A router as `router list` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterView {
    /// The router identity.
    #[serde(flatten)]
    pub identity: Identity,
    /// Where clients reach it, once it has reported.
    pub advertise: Option<String>,
    /// Whether it has enrolled.
    pub enrolled: bool,
}

/// `GET /v1/edge` (and the first frame of `GET /v1/edge/watch`, see [`EdgeFrame`]): what an
/// identity may use and where the routers are. Only the caller's own services appear; others do
/// not exist for it. The controller sends it canonical ([`EdgeView::canonicalize`]): services
/// sorted by name, each service's grants by caller name, policy and caller id, which is what
/// lets a diff be applied to it without positions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeView {
    /// Routers that have reported an address.
    pub routers: Vec<crate::RouterInfo>,
    /// Services the identity may dial or bind, by name.
    pub services: Vec<EdgeService>,
}

/// One service as an identity sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeService {
    /// The service's name.
    pub name: Name,
    /// Where a tunneler exposes it.
    pub intercepts: Vec<umbra_policies::HostPort>,
    /// Whether the identity may dial it.
    pub dial: bool,
    /// Whether the identity may host it.
    pub bind: bool,
    /// For a service the identity hosts: every grant to dial it, with its limits. Empty for
    /// services it only dials.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<HostedGrant>,
}

/// A grant to dial a service, as its host sees it: who, through which policy, with what limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostedGrant {
    /// The caller's identity id (what the SDK reports for each incoming stream).
    pub identity: umbra_policies::IdentityId,
    /// The caller's name.
    pub name: Name,
    /// The granting policy.
    pub policy: Name,
    /// The grant's limits (flat fields on the wire).
    #[serde(flatten)]
    pub limits: umbra_policies::GrantLimits,
}

/// One frame of `GET /v1/edge/watch`, tagged so that it says what it is: the first frame of a
/// watch is the whole view, every later one a diff against the view the frames before it built.
/// A watcher that cannot apply a diff ends the watch and opens a new one (whole view first), so
/// it never holds a wrong view (see [`crate::edge::EdgeWatchDecoder`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum EdgeFrame {
    /// The whole view: what the watcher holds from now on.
    View(EdgeView),
    /// What changed since the previous frame; never empty.
    Diff(EdgeViewDiff),
}

/// What changed between two views of one identity (`EdgeView::diff`), so that a change that
/// touches one dialer of a gateway's service costs one grant on the wire, not the gateway's whole
/// view. Applied in field order: services removed, services put, grants, then routers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeViewDiff {
    /// Services no longer in the view, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<Name>,
    /// Services added to the view, whole with their grants, or changed (intercepts, dial, bind),
    /// then without their grants: those change through [`EdgeViewDiff::grants`] only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub put: Vec<EdgeService>,
    /// Grants removed from and added to services the identity already held and still holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<GrantChanges>,
    /// The whole routers list, when it changed (routers are few; a list is simpler than a diff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routers: Option<Vec<crate::RouterInfo>>,
}

/// The grants of one hosted service that changed: a grant whose caller name or limits changed
/// is removed and added again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantChanges {
    /// The hosted service.
    pub service: Name,
    /// Grants gone, by caller and policy (applied first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<GrantKey>,
    /// Grants new or changed, whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub added: Vec<HostedGrant>,
}

/// What names one grant among a service's grants: a caller holds at most one grant per policy.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantKey {
    /// The caller's identity id.
    pub identity: umbra_policies::IdentityId,
    /// The granting policy.
    pub policy: Name,
}

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("token", &"...")
            .field("csr_len", &self.csr.len())
            .finish()
    }
}

impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("identity", &self.identity)
            .field("token", &"...")
            .field("token_expires_at", &self.token_expires_at)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_a_token() {
        let req = EnrollRequest {
            token: "eyJsecret".into(),
            csr: "AAAA".into(),
        };
        assert!(!format!("{req:?}").contains("eyJsecret"));
    }
}

/// Events an identity reports about itself: what its sandbox refused (DNS names, dials, limits,
/// timeouts). The controller records them in its audit log under the reporting identity, which
/// it takes from the client certificate, never from the body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportEventsRequest {
    /// At most [`MAX_REPORTED_EVENTS`] events.
    pub events: Vec<ReportedEvent>,
}

/// Most events in one report.
pub const MAX_REPORTED_EVENTS: usize = 100;

/// One reported event.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportedEvent {
    /// `started`, `dns_refused`, `dns_malformed`, `suppressed`, `dial_denied`, `limit`, `timeout`, `revoked` or `exited`.
    pub kind: String,
    /// The sandbox's id.
    pub sandbox: String,
    /// When, as the reporter's clock says (RFC 3339).
    pub at: String,
    /// The event's own fields.
    #[serde(default)]
    pub detail: serde_json::Value,
}

/// What a router decided about streams (`POST /v1/audit/decisions`, routers only), so that the
/// controller's audit log says who reached what under which policy, and who was refused why.
/// The router is trusted for what it saw (it verified the caller's certificate); the
/// controller takes the router's own identity from the router's certificate.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionReport {
    /// At most [`MAX_DECISIONS`].
    pub decisions: Vec<StreamDecision>,
    /// Decisions the router could not queue (its queue was full) since its last report: the
    /// controller counts them in an `audit.suppressed` row.
    #[serde(default)]
    pub dropped: u64,
}

/// Most decisions in one report.
pub const MAX_DECISIONS: usize = 200;

/// How a stream decision turned out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamOutcome {
    /// Refused when asked for (the audit kind `router.stream_refused`).
    Refused,
    /// Allowed, and ended by its ends, or failed (`router.stream`).
    Ended,
    /// Allowed, then cut because the grant no longer held (`router.stream_terminated`).
    Terminated,
}

/// One stream as a router saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamDecision {
    /// The caller's SPIFFE id, from its verified certificate.
    pub identity: String,
    /// The service asked for.
    pub service: String,
    /// `dial` or `bind`.
    pub action: String,
    /// How it turned out.
    pub outcome: StreamOutcome,
    /// The granting policy, when one granted it.
    #[serde(default)]
    pub policy: Option<String>,
    /// Why it was refused, terminated or failed.
    #[serde(default)]
    pub reason: Option<String>,
    /// Bytes from the caller to the service.
    #[serde(default)]
    pub bytes_up: u64,
    /// Bytes from the service to the caller.
    #[serde(default)]
    pub bytes_down: u64,
    /// From the request to the end, in milliseconds.
    #[serde(default)]
    pub duration_ms: u64,
}
