//! Reporting a sandbox's events to the controller's audit log, beside the events file: a
//! forwarder for the [`EventSink`](umbra_sandbox::events::EventSink) that never blocks the
//! launcher, and an upload task with an owner.

use std::time::Duration;

use http::Method;
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;
use umbra_proto::api::{ReportEventsRequest, ReportedEvent};
use umbra_sandbox::events::Event;
use umbra_sdk::ControllerClient;

/// Events queued for the controller; when full, an event goes to the file only.
const QUEUE: usize = 1024;

/// The upload to the controller, the owner of its task: dropping it stops the upload at once;
/// [`Upload::finish`] lets it send what is queued first.
#[derive(Debug)]
pub struct Upload {
    task: AbortOnDropHandle<()>,
}

impl Upload {
    /// Waits (at most `within`) for the upload to send what is queued; it ends once every
    /// forwarder (so the event sink holding it) is gone.
    pub async fn finish(mut self, within: Duration) {
        let _ = tokio::time::timeout(within, &mut self.task).await;
    }
}

/// A forwarder to hand to `EventSink::forward`, and the upload that sends what it forwards to
/// the controller as `client`.
pub fn to_controller(
    client: ControllerClient,
) -> (impl Fn(&Event) + Send + Sync + 'static, Upload) {
    let (tx, rx) = mpsc::channel::<ReportedEvent>(QUEUE);
    let forward = move |ev: &Event| {
        if let Some(r) = reported(ev) {
            // A full queue drops the event for the controller; the file still has it.
            let _ = tx.try_send(r);
        }
    };
    let task = AbortOnDropHandle::new(tokio::spawn(upload_events(client, rx)));
    (forward, Upload { task })
}

/// An event as the controller's audit log takes it.
fn reported(ev: &Event) -> Option<ReportedEvent> {
    let mut v = serde_json::to_value(ev).ok()?;
    let obj = v.as_object_mut()?;
    let kind = obj.remove("kind")?.as_str()?.to_string();
    for k in ["at", "sandbox", "identity"] {
        obj.remove(k);
    }
    Some(ReportedEvent {
        kind,
        sandbox: ev.sandbox.clone(),
        at: ev.at.clone(),
        detail: v,
    })
}

/// Sends events to the controller's audit log as they come, a batch at a time. Failures are
/// logged once; a revoked identity cannot report, and the controller recorded the revocation.
async fn upload_events(client: ControllerClient, mut rx: mpsc::Receiver<ReportedEvent>) {
    let mut warned = false;
    while let Some(first) = rx.recv().await {
        let mut events = vec![first];
        while events.len() < umbra_proto::api::MAX_REPORTED_EVENTS {
            match rx.try_recv() {
                Ok(e) => events.push(e),
                Err(_) => break,
            }
        }
        let req = ReportEventsRequest { events };
        let r: Result<serde_json::Value, _> = tokio::time::timeout(
            Duration::from_secs(2),
            client.call(Method::POST, "/v1/audit/events", Some(&req)),
        )
        .await
        .unwrap_or_else(|_| Err(umbra_sdk::SdkError::Timeout("the controller".into())));
        if let Err(e) = r {
            if !warned {
                tracing::warn!(error = %e, "could not send sandbox events to the controller");
                warned = true;
            }
        }
    }
}
