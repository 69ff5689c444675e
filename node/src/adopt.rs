//! Sessions of a node that died are taken over at once, not at their next request.
//!
//! Activation is otherwise on demand: a session whose owner dies moves to its next
//! place on the ring when a request for it arrives. A session whose clients are
//! quiet (waiting for a narration, say) would stay ownerless until then, and what its
//! owner had started on its behalf (a request to another service, the ICD's Redis
//! keys, the hub's unconfirmed rows) would wait with it. So when a member leaves the
//! ring without having stopped cleanly, every surviving node looks up the sessions
//! that member owned and did not hand off (`hub_cursor.active`, cleared by a clean
//! stop) and activates those the ring now gives to it; the activation then does what
//! any takeover does (recover, republish, resume open requests: see
//! `actor::activate`). The ownership lock and the fencing epoch are unchanged: this is
//! a request like any other, so a member that was only slow is fenced as usual.

use crate::NodeCtx;
use crate::SYSTEM;
use gs_shared::rpc::RequestBody;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// How long an adoption request may take (activation included).
const ADOPT_DEADLINE: Duration = Duration::from_secs(10);
/// Sessions activated at once by one node's adoption.
const ADOPT_CONCURRENCY: usize = 8;

/// The members that were on `before` and are known dead now (left without a drain).
pub fn departed(ctx: &NodeCtx, before: &BTreeSet<String>) -> Vec<String> {
    before
        .iter()
        .filter(|n| **n != ctx.id && ctx.cluster.is_known_dead(n))
        .cloned()
        .collect()
}

/// Activates the sessions `dead` owned that the ring now places on this node.
pub async fn adopt(ctx: &Arc<NodeCtx>, dead: Vec<String>) {
    let sessions = match ctx.store.unfinished_sessions_of(&dead).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(?dead, error = %e, "sessions of departed members not looked up");
            return;
        }
    };
    let mine: Vec<Uuid> = sessions
        .into_iter()
        .filter(|s| ctx.cluster.owner(s).as_deref() == Some(ctx.id.as_str()))
        .collect();
    if mine.is_empty() {
        return;
    }
    tracing::info!(
        ?dead,
        sessions = mine.len(),
        "adopting the sessions of departed members"
    );
    let forwarder = ctx.forwarder(ADOPT_DEADLINE);
    use futures::StreamExt;
    futures::stream::iter(mine)
        .for_each_concurrent(ADOPT_CONCURRENCY, |session| {
            let forwarder = &forwarder;
            async move {
                // Any request activates; presence is the cheapest read.
                if let Err(e) = forwarder
                    .request(session, SYSTEM, RequestBody::Presence)
                    .await
                {
                    tracing::info!(%session, code = %e.code, "session not adopted");
                }
            }
        })
        .await;
}
