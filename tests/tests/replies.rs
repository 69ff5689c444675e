//! Requests over real NATS (`gs_shared::replies`): however a request ends (answered,
//! no responders, timed out, dropped while in flight), its waiter is gone. The reply
//! multiplexer of `async_nats::Client::send_request` forgets a waiter only when an
//! answer arrives, so the routers' commands acknowledged by their events (no answer)
//! piled up in it at 10,000 a second under the SRD load.

use anyhow::Result;
use futures::StreamExt;
use gs_shared::config::Config;
use gs_shared::replies::{Replies, RequestFailed};
use std::time::Duration;
use uuid::Uuid;

const LONG: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_way_a_request_ends_forgets_its_waiter() -> Result<()> {
    gs_tests::init_logging();
    let nats = async_nats::connect(Config::default().nats.url).await?;
    let base = format!("gs_replies_{}", Uuid::new_v4().simple());
    let replies = Replies::new(nats.clone());

    // An echo that answers, and a listener that never does.
    let mut echo = nats.subscribe(format!("{base}.echo")).await?;
    let answerer = nats.clone();
    let echo_task = tokio::spawn(async move {
        while let Some(msg) = echo.next().await {
            let to = msg.reply.expect("a request");
            answerer.publish(to, msg.payload).await?;
        }
        anyhow::Ok(())
    });
    let mut silent = nats.subscribe(format!("{base}.silent")).await?;
    nats.flush().await?;

    // Answered: the answer is the request's, and nothing waits afterwards.
    for i in 0..100u32 {
        let body = format!("ping {i}");
        let answer = replies
            .request(format!("{base}.echo"), body.clone().into(), LONG)
            .await?;
        assert_eq!(answer.payload, body.as_bytes());
    }
    assert_eq!(replies.waiting(), 0, "answered requests are forgotten");

    // Nobody listens: the server says so, and nothing waits.
    let r = replies
        .request(format!("{base}.nobody"), "x".into(), LONG)
        .await;
    assert!(matches!(r, Err(RequestFailed::NoResponders)), "{r:?}");
    assert_eq!(replies.waiting(), 0);

    // Delivered and never answered: timed out, and nothing waits.
    let r = replies
        .request(
            format!("{base}.silent"),
            "x".into(),
            Duration::from_millis(50),
        )
        .await;
    assert!(matches!(r, Err(RequestFailed::TimedOut)), "{r:?}");
    let delivered = tokio::time::timeout(LONG, silent.next()).await?;
    assert!(delivered.is_some(), "the request was delivered");
    assert_eq!(replies.waiting(), 0);

    // Dropped while in flight (the router's command acked by its event): once the
    // listener has the request, the request is dropped; nothing waits.
    for _ in 0..100 {
        let pending = replies.request(format!("{base}.silent"), "x".into(), LONG);
        tokio::pin!(pending);
        tokio::select! {
            r = &mut pending => anyhow::bail!("a silent listener answered: {r:?}"),
            got = tokio::time::timeout(LONG, silent.next()) => assert!(got?.is_some()),
        }
        assert_eq!(replies.waiting(), 1, "the request in flight waits");
    }
    assert_eq!(replies.waiting(), 0, "dropped requests are forgotten");

    echo_task.abort();
    Ok(())
}
