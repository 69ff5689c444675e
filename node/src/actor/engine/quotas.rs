//! The session's own rate limits (the ICD's saves and joins per minute).

use super::CoreConfig;
use gs_rules::Command;
use gs_shared::protocol::{codes, WireError};
use serde_json::json;
use std::time::{Duration, Instant};

/// A session's per-minute quotas of the ICD (`POST /state` saves, joins), kept by its
/// owner: it sees every command of the session whatever router sent it, and only
/// after the rules allowed it. A new owner starts with fresh windows.
#[derive(Debug, Default)]
pub(super) struct Quotas {
    saves: Window,
    joins: Window,
}

/// A fixed one-minute window.
#[derive(Debug, Default)]
struct Window {
    start: Option<Instant>,
    count: u32,
}

const QUOTA_WINDOW: Duration = Duration::from_secs(60);

impl Window {
    /// Counts one use; refuses (counting nothing) past `limit` (0: no limit).
    fn hit(&mut self, limit: u32, now: Instant) -> Result<(), Duration> {
        if limit == 0 {
            return Ok(());
        }
        let start = match self.start {
            Some(s) if now.duration_since(s) < QUOTA_WINDOW => s,
            _ => {
                self.count = 0;
                *self.start.insert(now)
            }
        };
        if self.count >= limit {
            return Err(QUOTA_WINDOW.saturating_sub(now.duration_since(start)));
        }
        self.count += 1;
        Ok(())
    }
}

impl Quotas {
    /// Counts an allowed command against its quota, if it has one.
    pub(super) fn hit(
        &mut self,
        cmd: &Command,
        cfg: &CoreConfig,
        now: Instant,
    ) -> Result<(), WireError> {
        let (window, limit, what) = match cmd {
            Command::SaveState { .. } => (&mut self.saves, cfg.state_saves_per_min, "state saves"),
            Command::Join(_) => (&mut self.joins, cfg.joins_per_min, "joins"),
            _ => return Ok(()),
        };
        window.hit(limit, now).map_err(|wait| {
            WireError::new(
                codes::RATE_LIMITED,
                format!("too many {what} in this session; retry shortly"),
            )
            .with_details(json!({"retry_after_secs": wait.as_secs().max(1),
                "limit": limit, "window_secs": QUOTA_WINDOW.as_secs()}))
        })
    }
}
