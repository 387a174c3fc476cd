//! Services and service policies.

use super::*;

impl Controller {
    /// Creates a service.
    pub fn create_service(
        &self,
        actor: &Actor,
        service: Service,
    ) -> Result<Service, ControllerError> {
        let mut inner = self.write()?;
        if inner.state().services.contains_key(&service.name) {
            return Err(ControllerError::Conflict(format!(
                "a service named {} already exists",
                service.name
            )));
        }
        // An intercept another service uses is refused by the gate in `commit`.
        let mut batch = Batch::default();
        batch.changes.push(ChangeEvent::ServicePut {
            service: service.clone(),
        });
        batch.audit.push(Self::audit(
            actor,
            "service.create",
            service.name.as_str(),
            serde_json::to_value(&service)?,
        ));
        self.commit(&mut inner, batch)?;
        Ok(service)
    }

    /// All services, by name.
    pub fn list_services(&self) -> Vec<Service> {
        self.lock().state().services.values().cloned().collect()
    }

    /// One service.
    pub fn show_service(&self, name: &str) -> Result<Service, ControllerError> {
        self.lock()
            .state()
            .services
            .get(name)
            .cloned()
            .ok_or_else(|| ControllerError::NotFound(format!("no service named {name}")))
    }

    /// Deletes a service; `@name` references block it unless `cascade` (see `delete_identity`).
    pub fn delete_service(
        &self,
        actor: &Actor,
        name: &str,
        cascade: bool,
    ) -> Result<Vec<Name>, ControllerError> {
        let mut inner = self.write()?;
        let service = inner
            .state()
            .services
            .get(name)
            .cloned()
            .ok_or_else(|| ControllerError::NotFound(format!("no service named {name}")))?;
        let referencing = referencing_policies(inner.state(), &service.name, false);
        if !referencing.is_empty() && !cascade {
            return Err(ControllerError::Conflict(format!(
                "service {name} is named by policies {}; revoke them first or pass --cascade",
                join(&referencing)
            )));
        }
        let mut batch = Batch::default();
        batch.changes.push(ChangeEvent::ServiceDeleted {
            name: service.name.clone(),
        });
        for p in &referencing {
            batch
                .changes
                .push(ChangeEvent::PolicyDeleted { name: p.clone() });
        }
        batch.audit.push(Self::audit(
            actor,
            "service.delete",
            name,
            serde_json::json!({ "deleted_policies": referencing }),
        ));
        self.commit(&mut inner, batch)?;
        Ok(referencing)
    }

    /// Creates a service policy.
    pub fn grant(
        &self,
        actor: &Actor,
        req: GrantRequest,
    ) -> Result<ServicePolicy, ControllerError> {
        let mut inner = self.write()?;
        let state = inner.state();
        let name = match req.name {
            Some(n) if state.policies.contains_key(&n) => {
                return Err(ControllerError::Conflict(format!(
                    "a policy named {n} already exists"
                )))
            }
            Some(n) => n,
            None => generated_policy_name(state, req.action, &req.identities, &req.services),
        };
        // Empty selector lists and `@name`s that name nothing are refused by the gate in
        // `commit`.
        let policy = ServicePolicy {
            name,
            action: req.action,
            identities: req.identities,
            services: req.services,
            semantic: req.semantic,
            limits: req.limits,
        };
        let mut batch = Batch::default();
        batch.changes.push(ChangeEvent::PolicyPut {
            policy: policy.clone(),
        });
        batch.audit.push(Self::audit(
            actor,
            "policy.grant",
            policy.name.as_str(),
            serde_json::to_value(&policy)?,
        ));
        self.commit(&mut inner, batch)?;
        Ok(policy)
    }

    /// Deletes a service policy; routers cut the streams that only it allowed.
    pub fn revoke_policy(&self, actor: &Actor, name: &str) -> Result<(), ControllerError> {
        let mut inner = self.write()?;
        let policy = inner
            .state()
            .policies
            .get(name)
            .cloned()
            .ok_or_else(|| ControllerError::NotFound(format!("no policy named {name}")))?;
        let mut batch = Batch::default();
        batch.changes.push(ChangeEvent::PolicyDeleted {
            name: policy.name.clone(),
        });
        batch.audit.push(Self::audit(
            actor,
            "policy.revoke",
            name,
            serde_json::to_value(&policy)?,
        ));
        self.commit(&mut inner, batch)
    }

    /// All policies, by name.
    pub fn list_policies(&self) -> Vec<ServicePolicy> {
        self.lock().state().policies.values().cloned().collect()
    }

    /// Names the policies that grant `identity` access to `service`, or says why none does.
    pub fn explain(
        &self,
        identity: &str,
        service: &str,
        action: Action,
    ) -> Result<ExplainResponse, ControllerError> {
        let id = {
            let inner = self.lock();
            inner
                .identity_named(identity)
                .map(|i| i.id.clone())
                .ok_or_else(|| ControllerError::NotFound(format!("no identity named {identity}")))?
        };
        let index = self.index();
        let ex = index.explain(&id, service, action, self.now());
        let limits = (ex.granting.iter())
            .filter_map(|n| index.state().policies.get(n))
            .filter(|p| !p.limits.is_unlimited())
            .map(|p| (p.name.clone(), p.limits.clone()))
            .collect();
        Ok(ExplainResponse {
            allowed: ex.decision.is_ok(),
            granting: ex.granting,
            reason: ex.reason,
            limits,
        })
    }
}

/// `dial-agent-1-llm`, made unique with a numeric suffix.
fn generated_policy_name(
    state: &State,
    action: Action,
    ids: &[Selector],
    svcs: &[Selector],
) -> Name {
    let part = |s: Option<&Selector>| match s {
        Some(Selector::All) | None => "all".to_owned(),
        Some(Selector::Role(n)) | Some(Selector::Named(n)) => n.to_string(),
    };
    let mut base = format!("{action}-{}-{}", part(ids.first()), part(svcs.first()));
    base.truncate(54);
    let base = base
        .trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned();
    let mut candidate = base.clone();
    let mut n = 2;
    loop {
        if let Ok(name) = Name::new(candidate.clone()) {
            if !state.policies.contains_key(&name) {
                return name;
            }
        }
        candidate = format!("{base}-{n}");
        n += 1;
    }
}
