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

/// Batched requests (`Replies::request_batched`, what the forwarder sends to nodes):
/// requests issued together reach the receiver in fewer messages than requests, each
/// with its own reply subject, and each is answered on its own; "no responders" still
/// ends a batched request at once, and a batched request dropped in flight is
/// forgotten like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_requests_share_messages_and_are_answered_one_by_one() -> Result<()> {
    use gs_shared::request_batch;
    gs_tests::init_logging();
    let nats = async_nats::connect(Config::default().nats.url).await?;
    let base = format!("gs_batched_{}", Uuid::new_v4().simple());
    let replies = Replies::new(nats.clone());

    // A receiver that reads batches as a node does and echoes each request.
    let mut echo = nats.subscribe(format!("{base}.echo")).await?;
    let answerer = nats.clone();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let echo_task = tokio::spawn(async move {
        while let Some(msg) = echo.next().await {
            let requests = match request_batch::decode(msg.headers.as_ref(), &msg.payload) {
                None => vec![request_batch::Pending {
                    reply: msg.reply.expect("a request").to_string(),
                    payload: msg.payload,
                }],
                Some(batch) => batch?,
            };
            seen_tx.send(requests.len())?;
            for r in requests {
                answerer.publish(r.reply, r.payload).await?;
            }
        }
        anyhow::Ok(())
    });
    nats.flush().await?;

    // 200 requests issued at once: every answer is its own request's.
    let n = 200;
    let answers = futures::future::join_all((0..n).map(|i| {
        let replies = &replies;
        let subject = format!("{base}.echo");
        async move {
            let body = format!("request {i}");
            let answer = replies
                .request_batched(subject, body.clone().into(), LONG)
                .await?;
            anyhow::ensure!(answer.payload == body.as_bytes(), "answer {i} is its own");
            anyhow::Ok(())
        }
    }))
    .await;
    for a in answers {
        a?;
    }
    let mut messages = 0;
    let mut requests = 0;
    while let Ok(k) = seen.try_recv() {
        messages += 1;
        requests += k;
    }
    assert_eq!(requests, n, "every request was delivered once");
    assert!(
        messages < n,
        "{n} requests issued together came in {messages} messages"
    );
    assert_eq!(replies.waiting(), 0, "answered requests are forgotten");

    // Nobody listens: the batched request ends at once, as a plain one does.
    let r = replies
        .request_batched(format!("{base}.nobody"), "x".into(), LONG)
        .await;
    assert!(matches!(r, Err(RequestFailed::NoResponders)), "{r:?}");

    // Dropped in flight: forgotten.
    let mut silent = nats.subscribe(format!("{base}.silent")).await?;
    nats.flush().await?;
    {
        let pending = replies.request_batched(format!("{base}.silent"), "x".into(), LONG);
        tokio::pin!(pending);
        tokio::select! {
            r = &mut pending => anyhow::bail!("a silent listener answered: {r:?}"),
            got = tokio::time::timeout(LONG, silent.next()) => assert!(got?.is_some()),
        }
        assert_eq!(replies.waiting(), 1, "the request in flight waits");
    }
    assert_eq!(
        replies.waiting(),
        0,
        "a dropped batched request is forgotten"
    );

    echo_task.abort();
    Ok(())
}
