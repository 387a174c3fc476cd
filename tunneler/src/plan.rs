//! Which listeners should exist for a view: one per intercept of every dialable service.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use umbra_policies::{HostPort, Name};
use umbra_proto::api::EdgeView;

use crate::addresses::{AddressBook, AddressError};

/// One listener: where the agent connects, and which service it reaches.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mapping {
    /// The intercept as configured on the service.
    pub intercept: HostPort,
    /// The socket address the tunneler listens on.
    pub listen: SocketAddr,
    /// The service each connection is carried to.
    pub service: Name,
}

/// The listeners a view calls for, keyed by listening address, plus the intercepts that cannot
/// be served (and why). Two services claiming the same address: the first by name wins and the
/// other is reported, never silently merged.
pub fn desired(
    view: &EdgeView,
    book: &mut AddressBook,
) -> (BTreeMap<SocketAddr, Mapping>, Vec<AddressError>) {
    let mut out = BTreeMap::new();
    let mut errors = Vec::new();
    for svc in view.services.iter().filter(|s| s.dial) {
        for intercept in &svc.intercepts {
            match book.resolve(intercept) {
                Ok(ip) => {
                    let listen = SocketAddr::new(ip, intercept.port());
                    out.entry(listen).or_insert_with(|| Mapping {
                        intercept: intercept.clone(),
                        listen,
                        service: svc.name.clone(),
                    });
                }
                Err(e) => errors.push(e),
            }
        }
    }
    (out, errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use umbra_proto::api::EdgeService;

    fn svc(name: &str, dial: bool, intercepts: &[&str]) -> EdgeService {
        EdgeService {
            name: Name::new(name).unwrap(),
            intercepts: intercepts.iter().map(|i| i.parse().unwrap()).collect(),
            dial,
            bind: !dial,
            grants: Vec::new(),
        }
    }

    #[test]
    fn only_dialable_loopback_intercepts_get_listeners() {
        let view = EdgeView {
            routers: vec![],
            services: vec![
                svc("llm", true, &["llm.umbra:443", "127.0.0.1:8443"]),
                svc("hosted", false, &["hosted.umbra:80"]),
                svc("evil", true, &["0.0.0.0:22"]),
            ],
        };
        let mut book = AddressBook::new();
        let (want, errors) = desired(&view, &mut book);
        let listens: Vec<String> = want.keys().map(|a| a.to_string()).collect();
        assert_eq!(listens, vec!["127.0.0.1:8443", "127.77.0.1:443"]);
        assert!(want.values().all(|m| m.service.as_str() == "llm"));
        assert_eq!(errors.len(), 1);
    }
}
