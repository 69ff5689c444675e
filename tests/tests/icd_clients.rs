//! Clients written from the ICD alone (issue 11, first part): messages without an
//! envelope `id` are accepted; a `state_update`'s `data.update_id` is then its command
//! id, so a resend with the same `update_id` applies once; such a sender gets no `ack`
//! (a type the ICD does not have) and sees its change as the `state_update` event.

use anyhow::{ensure, Result};
use gs_tests::{finish, set, Fixture, WAIT};
use serde_json::{json, Value};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_icd_state_update_without_an_id_reaches_everyone_once() -> Result<()> {
    let fx = Fixture::start(1, 1, false).await?;
    let f = &fx;
    let r = async {
        let (_, token, st) = f.player(0, json!({})).await?;
        let mut icd = f.connect(0, "icd client", &token, &st).await?;
        let other = f.connect(0, "dm", &f.dm_token, &f.session_token).await?;
        let update = Uuid::new_v4();
        let text = json!({"type": "state_update", "data": {
            "update_id": update,
            "changes": [{"path": "/icd", "value": 1, "previous": null}],
            "timestamp": "2026-12-01T12:00:00Z",
            "client_note": "unknown fields are ignored"}})
        .to_string();
        icd.send_raw(text.clone()).await?;
        other
            .wait_for("the ICD client's change", WAIT, |v| v.doc["icd"] == 1)
            .await?;
        icd.wait_for("its own change, as an event", WAIT, |v| v.doc["icd"] == 1)
            .await?;
        // A resend (same update_id) takes effect once; an id-carrying update after it
        // is the barrier.
        icd.send_raw(text).await?;
        let barrier = icd.send("state_update", set("/after", json!(true))).await?;
        ensure!(
            icd.wait_answer(barrier, WAIT).await?.is_ok(),
            "barrier refused"
        );
        let stored: Vec<Uuid> = f
            .stored_updates()
            .await?
            .into_iter()
            .map(|(c, _)| c)
            .collect();
        ensure!(
            stored.iter().filter(|c| **c == update).count() == 1,
            "update_id stored {} times: {stored:?}",
            stored.iter().filter(|c| **c == update).count()
        );
        let v = icd.view();
        ensure!(!v.acks.contains_key(&update), "an ICD sender got an ack");
        ensure!(
            v.anonymous_errors.is_empty() && v.errors.is_empty(),
            "errors: {v:?}"
        );
        // An ICD heartbeat (no id) is accepted and needs no answer; the connection goes on.
        icd.send_raw(json!({"type": "heartbeat", "data": {"timestamp": "t"}}).to_string())
            .await?;
        let state = f.api(0, &f.dm_token).get_state(&f.session).await?;
        ensure!(
            state["state"]["icd"] == 1 && state["state"]["after"] == Value::Bool(true),
            "{state}"
        );
        ensure!(icd.view().closed.is_none(), "closed");
        Ok(())
    }
    .await;
    finish(fx, r).await
}
