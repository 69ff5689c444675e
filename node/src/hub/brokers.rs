//! Connecting to one of several brokers (`rabbitmq.url`, comma-separated).
//!
//! A RabbitMQ cluster has no client-side discovery: the client is given the nodes'
//! URLs and tries them. [`Brokers::connect`] tries each URL once, in turn, starting
//! from the one that worked last (so a healthy broker keeps its clients after a
//! blip), and returns the first connection that opens. Every user of the hub (the
//! relay's publisher and consumer, and the request/response client started on the
//! relay's connection, or on its own via [`Brokers::connect`]) goes through it, so a
//! dead broker costs one failed attempt (a refused port: at once; a silent host: at
//! most [`CONNECT_TIMEOUT`]) per reconnect, not an outage.

use lapin::{Connection, ConnectionProperties};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Longest wait for one broker to open a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The broker URLs and which one to try first.
#[derive(Debug)]
pub struct Brokers {
    urls: Vec<String>,
    next: AtomicUsize,
}

impl Brokers {
    /// From `rabbitmq.url`'s comma-separated list.
    pub fn from_list(list: &str) -> Brokers {
        Brokers::new(
            list.split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(String::from),
        )
    }

    pub fn new(urls: impl IntoIterator<Item = String>) -> Brokers {
        Brokers {
            urls: urls.into_iter().collect(),
            next: AtomicUsize::new(0),
        }
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Opens a connection to the first broker that answers, trying each once in turn
    /// from the one that worked last. Returns it with the index of its URL, or the
    /// last broker's error.
    pub async fn connect(&self, props: ConnectionProperties) -> lapin::Result<(Connection, usize)> {
        let n = self.urls.len();
        if n == 0 {
            return Err(closed());
        }
        let start = self.next.load(Ordering::Relaxed) % n;
        let mut last = closed();
        for i in (0..n).map(|k| (start + k) % n) {
            match tokio::time::timeout(
                CONNECT_TIMEOUT,
                Connection::connect(&self.urls[i], props.clone()),
            )
            .await
            {
                Ok(Ok(conn)) => {
                    self.next.store(i, Ordering::Relaxed);
                    return Ok((conn, i));
                }
                Ok(Err(e)) => {
                    tracing::debug!(
                        url = %gs_shared::config::redact_url(&self.urls[i]),
                        error = %gs_shared::config::redact_secrets(&e.to_string()),
                        "broker not reachable; trying the next"
                    );
                    last = e;
                }
                Err(_) => last = closed(),
            }
        }
        Err(last)
    }
}

fn closed() -> lapin::Error {
    lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(
        lapin::ConnectionState::Closed,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_is_split_and_trimmed() {
        let b = Brokers::from_list(" amqp://a:1/%2f , ,amqp://b:2/%2f");
        assert_eq!(b.urls(), ["amqp://a:1/%2f", "amqp://b:2/%2f"]);
        assert!(Brokers::from_list("").urls().is_empty());
    }
}
