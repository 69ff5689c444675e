//! Fault injection for the chaos tests: the one seam where the session task lets a
//! test break it on purpose. Compiled in only with the `fault-injection` feature
//! (enabled by the `gs-tests` package, so the binaries of a workspace build carry it;
//! `cargo build --release -p gs-node` does not); without it every method is an empty
//! inline function and the `node.fault_*` settings are ignored.
//!
//! * `node.fault_crash_after_commit`: abort right after committing an event whose
//!   JSON contains the marker, before publishing or acknowledging it (exactly-once).
//! * `node.fault_delay_commit` (+ `_ms`): wait before a commit holding the marker,
//!   after the last lease check, announcing it on `{prefix}.fault.delaying` (fencing).
//! * `node.fault_hub_fail_once`: fail, once, an inbound hub event holding the marker
//!   with `internal_error`, so the relay must requeue it (hub relay).

use super::Envelope;
use crate::store::EventRow;
use crate::NodeCtx;
use gs_shared::config::NodeConfig;
use uuid::Uuid;

/// Per-session state of the hooks.
#[derive(Default)]
pub struct Faults {
    /// Hub events the `fault_hub_fail_once` hook has failed already.
    #[cfg(feature = "fault-injection")]
    refused: std::collections::HashSet<Uuid>,
}

/// Whether a hook's marker appears in these rows (never when the hook is off: an
/// empty marker).
#[cfg(feature = "fault-injection")]
fn mentions(rows: &[EventRow], marker: &str) -> bool {
    !marker.is_empty() && rows.iter().any(|r| r.data_json.contains(marker))
}

#[cfg(feature = "fault-injection")]
impl Faults {
    pub fn new(_: &NodeConfig) -> Faults {
        Faults::default()
    }

    /// Takes out of a batch the hub events to fail (each once), to be answered with
    /// `internal_error`.
    pub fn hub_events_to_fail(
        &mut self,
        cfg: &NodeConfig,
        batch: &mut Vec<Envelope>,
    ) -> Vec<Envelope> {
        let marker = cfg.fault_hub_fail_once.as_str();
        let mut failed = Vec::new();
        if marker.is_empty() {
            return failed;
        }
        let mut i = 0;
        while i < batch.len() {
            let fail = match &batch[i].req.body {
                gs_shared::rpc::RequestBody::HubEvent {
                    event_id, payload, ..
                } => payload.to_string().contains(marker) && self.refused.insert(*event_id),
                _ => false,
            };
            if fail {
                tracing::warn!("fault injection: failing a hub event");
                failed.push(batch.remove(i));
            } else {
                i += 1;
            }
        }
        failed
    }

    /// A pause between the last local lease check and the write, the window only
    /// PostgreSQL's epoch check closes.
    pub async fn before_commit(&self, ctx: &NodeCtx, id: Uuid, rows: &[EventRow]) {
        let cfg = &ctx.cfg;
        if !mentions(rows, &cfg.node.fault_delay_commit) {
            return;
        }
        tracing::warn!(session = %id, "fault injection: delaying a commit");
        let subject = format!("{}.fault.delaying", cfg.nats.subject_prefix);
        let _ = ctx.nats.publish(subject, id.to_string().into()).await;
        let _ = ctx.nats.flush().await;
        let ms = cfg.node.fault_delay_commit_ms;
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }

    /// A crash after the commit, before anything is published or acknowledged.
    pub fn after_commit(&self, cfg: &NodeConfig, id: Uuid, rows: &[EventRow]) {
        if mentions(rows, &cfg.fault_crash_after_commit) {
            tracing::error!(session = %id, "fault injection: aborting after commit, before ack");
            std::process::abort();
        }
    }
}

#[cfg(not(feature = "fault-injection"))]
impl Faults {
    /// The hooks of a session; without the feature, says once per process that the
    /// `node.fault_*` settings it was given are ignored.
    pub fn new(cfg: &NodeConfig) -> Faults {
        static WARNED: std::sync::Once = std::sync::Once::new();
        let set = [
            &cfg.fault_crash_after_commit,
            &cfg.fault_delay_commit,
            &cfg.fault_hub_fail_once,
        ];
        if set.iter().any(|m| !m.is_empty()) {
            WARNED.call_once(|| {
                tracing::warn!("node.fault_* settings ignored: gs-node was built without the fault-injection feature");
            });
        }
        Faults::default()
    }

    #[inline(always)]
    pub fn hub_events_to_fail(&mut self, _: &NodeConfig, _: &mut [Envelope]) -> Vec<Envelope> {
        Vec::new()
    }

    #[inline(always)]
    pub async fn before_commit(&self, _: &NodeCtx, _: Uuid, _: &[EventRow]) {}

    #[inline(always)]
    pub fn after_commit(&self, _: &NodeConfig, _: Uuid, _: &[EventRow]) {}
}
