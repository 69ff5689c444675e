//! A front door for the routers: one local TCP address that forwards each new
//! connection to one of the live routers, round-robin, as a load balancer (or a
//! Kubernetes Service) does in a real deployment. Clients that only know the front
//! keep working while every router behind it is replaced (`cluster restart --rolling`):
//! a connection whose router goes away is closed, and the client's reconnect lands on
//! a live one.
//!
//! It forwards bytes only (TLS, if any, is end to end with the router); the set of
//! routers is changed with [`Front::set_backends`] before a router is drained, so no
//! new connection is sent to a router that is stopping.

use anyhow::Result;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How long the front tries one router before it tries the next.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Backends {
    /// `host:port` of each router that takes new connections.
    addrs: Vec<String>,
    next: usize,
}

pub struct Front {
    /// The front's own `127.0.0.1:port`.
    pub addr: String,
    backends: Arc<Mutex<Backends>>,
    accept: JoinHandle<()>,
}

impl Front {
    /// Listens on a free local port and forwards to `backends` (`host:port`).
    pub async fn start(backends: Vec<String>) -> Result<Front> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let shared = Arc::new(Mutex::new(Backends {
            addrs: backends,
            next: 0,
        }));
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Front {
            addr,
            backends: shared,
            accept,
        })
    }

    /// Replaces the routers new connections go to (connections already open stay).
    pub fn set_backends(&self, addrs: Vec<String>) {
        let mut b = self.backends.lock().unwrap();
        b.addrs = addrs;
    }

    pub fn backends(&self) -> Vec<String> {
        self.backends.lock().unwrap().addrs.clone()
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// `host:port` of a member URL (`http://127.0.0.1:1234` → `127.0.0.1:1234`).
pub fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.split('/').next().unwrap_or(rest).to_string()
}

async fn accept_loop(listener: TcpListener, backends: Arc<Mutex<Backends>>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let _ = client.set_nodelay(true);
        tokio::spawn(forward(client, backends.clone()));
    }
}

/// The routers to try for one connection: all of them, starting at the next in turn.
fn candidates(backends: &Mutex<Backends>) -> Vec<String> {
    let mut b = backends.lock().unwrap();
    let n = b.addrs.len();
    let start = b.next;
    b.next = b.next.wrapping_add(1);
    (0..n).map(|i| b.addrs[(start + i) % n].clone()).collect()
}

/// Connects `client` to the first router that answers and copies both ways until
/// either side closes; then closes both (a router that went away ends its clients'
/// connections, so they reconnect through the front).
async fn forward(mut client: TcpStream, backends: Arc<Mutex<Backends>>) {
    let mut router = None;
    for addr in candidates(&backends) {
        if let Ok(Ok(s)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)).await {
            router = Some(s);
            break;
        }
    }
    let Some(router) = router else {
        let _ = client.shutdown().await;
        return;
    };
    let _ = router.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut rr, mut rw) = router.into_split();
    tokio::select! {
        _ = tokio::io::copy(&mut cr, &mut rw) => {}
        _ = tokio::io::copy(&mut rr, &mut cw) => {}
    }
    let _ = cw.shutdown().await;
    let _ = rw.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_of_member_urls() {
        for (url, want) in [
            ("http://127.0.0.1:1234", "127.0.0.1:1234"),
            ("https://127.0.0.1:99/", "127.0.0.1:99"),
            ("ws://localhost:5/x/y", "localhost:5"),
            ("127.0.0.1:7", "127.0.0.1:7"),
        ] {
            assert_eq!(host_port(url), want, "{url}");
        }
    }

    #[test]
    fn candidates_rotate_over_every_router() {
        let b = Mutex::new(Backends {
            addrs: vec!["a".into(), "b".into(), "c".into()],
            next: 0,
        });
        assert_eq!(candidates(&b), ["a", "b", "c"]);
        assert_eq!(candidates(&b), ["b", "c", "a"]);
        assert_eq!(candidates(&b), ["c", "a", "b"]);
        b.lock().unwrap().addrs.clear();
        assert!(candidates(&b).is_empty());
    }
}
