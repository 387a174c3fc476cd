//! The controller's only source of time, so tests can move it.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use umbra_policies::Timestamp;

/// Where the controller reads the time. The real clock in production; tests set a fixed or
/// shifted one to issue certificates and tokens that are already expired.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> SystemTime + Send + Sync>);

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock(Arc::new(SystemTime::now))
    }

    /// A clock that runs `offset_secs` seconds ahead of (or, if negative, behind) the system.
    pub fn shifted(offset_secs: i64) -> Clock {
        Clock(Arc::new(move || {
            let now = SystemTime::now();
            let d = std::time::Duration::from_secs(offset_secs.unsigned_abs());
            if offset_secs >= 0 {
                now + d
            } else {
                now - d
            }
        }))
    }

    /// The current time.
    pub fn now(&self) -> SystemTime {
        (self.0)()
    }

    /// The current time in whole seconds since the epoch.
    pub fn timestamp(&self) -> Timestamp {
        to_timestamp(self.now())
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

/// Whole seconds since the epoch (0 for times before it).
pub fn to_timestamp(t: SystemTime) -> Timestamp {
    Timestamp(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}
