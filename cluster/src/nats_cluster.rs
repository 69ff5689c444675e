//! A local NATS cluster: several `nats-server`s joined by routes (issue 13).

use anyhow::{Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// How long the servers may take to start and connect their routes.
pub const ROUTES_WAIT: Duration = Duration::from_secs(30);

/// How many times [`NatsCluster::start_logging`] tries fresh ports.
pub const START_ATTEMPTS: usize = 3;

/// A server of the cluster exited while the cluster was waiting for its routes.
#[derive(Debug)]
pub struct Exited {
    pub server: usize,
    pub status: std::process::ExitStatus,
}

impl std::fmt::Display for Exited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "nats-server {} exited at start ({})",
            self.server, self.status
        )
    }
}

impl std::error::Error for Exited {}

/// A private cluster of `nats-server`s on free local ports, joined by routes (every
/// server is given the cluster ports of all the others): `cluster up --nats-cluster N`,
/// and tests that kill a NATS server under load. Each server also serves its
/// monitoring endpoint (`/routez`, `/connz`) on a private port; [`NatsCluster::start`]
/// polls it until the routes are up. Killed on drop.
pub struct NatsCluster {
    pub name: String,
    pub servers: Vec<NatsMember>,
    /// Where each server's log goes (`nats-{i}.log`); none: discarded.
    log_dir: Option<PathBuf>,
}

/// One server of a [`NatsCluster`].
pub struct NatsMember {
    pub port: u16,
    pub cluster_port: u16,
    pub monitor_port: u16,
    child: Option<tokio::process::Child>,
}

impl NatsCluster {
    /// Starts `n` servers and waits (bounded) until each has a route to every other.
    pub async fn start(n: usize) -> Result<NatsCluster> {
        Self::start_logging(n, None).await
    }

    /// Like [`NatsCluster::start`], with each server's log in `log_dir/nats-{i}.log`.
    /// A server that exits at start (one of its free ports was taken meanwhile, e.g.
    /// as another connection's local port) fails the attempt; the cluster is started
    /// again on fresh ports, [`START_ATTEMPTS`] times at most.
    pub async fn start_logging(n: usize, log_dir: Option<&Path>) -> Result<NatsCluster> {
        let mut attempt = 1;
        loop {
            let mut c = NatsCluster::on_free_ports(n, log_dir)?;
            for i in 0..n {
                c.spawn(i)?;
            }
            match c.wait_routes().await {
                Ok(()) => return Ok(c),
                Err(e) if attempt < START_ATTEMPTS && e.is::<Exited>() => {
                    tracing::warn!(error = %e, attempt, "NATS cluster did not start; again on fresh ports");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn on_free_ports(n: usize, log_dir: Option<&Path>) -> Result<NatsCluster> {
        let mut servers = Vec::new();
        for _ in 0..n {
            servers.push(NatsMember {
                port: crate::harness::free_port()?,
                cluster_port: crate::harness::free_port()?,
                monitor_port: crate::harness::free_port()?,
                child: None,
            });
        }
        Ok(NatsCluster {
            name: format!("gs_{}", Uuid::new_v4().simple()),
            servers,
            log_dir: log_dir.map(Path::to_path_buf),
        })
    }

    /// The seed URLs, comma-separated: the form `nats.url` takes.
    pub fn url(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("nats://127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let routes = self
            .servers
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, s)| format!("nats://127.0.0.1:{}", s.cluster_port))
            .collect::<Vec<_>>()
            .join(",");
        let (stdout, stderr) = match &self.log_dir {
            Some(d) => {
                let log = std::fs::File::create(d.join(format!("nats-{i}.log")))?;
                (Stdio::from(log.try_clone()?), Stdio::from(log))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        let s = &self.servers[i];
        let child = tokio::process::Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &s.port.to_string()])
            .args(["-n", &format!("{}_{i}", self.name)])
            .args(["--cluster_name", &self.name])
            .args(["-cluster", &format!("nats://127.0.0.1:{}", s.cluster_port)])
            .args(["-routes", &routes])
            .args(["-m", &s.monitor_port.to_string()])
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .context("starting nats-server (scripts/services.sh installs it)")?;
        self.servers[i].child = Some(child);
        Ok(())
    }

    /// Waits until every running server reports a route to every
    /// other running server on its monitoring endpoint (bounded by [`ROUTES_WAIT`]).
    /// Fails at once with [`Exited`] when a server it waits for has exited.
    pub async fn wait_routes(&mut self) -> Result<()> {
        let http = crate::client::http_client(None);
        let want = self.servers.iter().filter(|s| s.child.is_some()).count() as u64 - 1;
        let deadline = Instant::now() + ROUTES_WAIT;
        loop {
            for (i, s) in self.servers.iter_mut().enumerate() {
                if let Some(status) = s.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    return Err(Exited { server: i, status }.into());
                }
            }
            let mut routes = Vec::new();
            for s in self.servers.iter().filter(|s| s.child.is_some()) {
                let url = format!("http://127.0.0.1:{}/routez", s.monitor_port);
                let n = match http.get(&url).send().await {
                    Ok(r) => r
                        .json::<Value>()
                        .await
                        .ok()
                        .and_then(|v| v["num_routes"].as_u64()),
                    Err(_) => None,
                };
                routes.push(n);
            }
            if routes.iter().all(|n| *n == Some(want)) {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "NATS cluster routes not up: {routes:?} (want {want} each)"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills server `i` (SIGKILL) and waits until it has exited.
    pub async fn kill(&mut self, i: usize) -> Result<()> {
        if let Some(mut c) = self.servers[i].child.take() {
            c.kill().await?;
        }
        Ok(())
    }

    /// Starts server `i` again on its ports and waits until the routes are up.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        self.spawn(i)?;
        self.wait_routes().await
    }

    /// Client connections per server (from each server's `/connz`; a server that does
    /// not answer counts 0).
    pub async fn connections(&self) -> Result<Vec<u64>> {
        let http = crate::client::http_client(None);
        let mut out = Vec::new();
        for s in &self.servers {
            let url = format!("http://127.0.0.1:{}/connz", s.monitor_port);
            let n = match http.get(&url).send().await {
                Ok(r) => r.json::<Value>().await?["num_connections"]
                    .as_u64()
                    .unwrap_or(0),
                Err(_) => 0,
            };
            out.push(n);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_that_cannot_start_is_reported_at_once() {
        // Another process holds the first server's client port.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = NatsCluster::on_free_ports(2, None).unwrap();
        c.servers[0].port = taken.local_addr().unwrap().port();
        for i in 0..2 {
            c.spawn(i).unwrap();
        }
        let e = c.wait_routes().await.unwrap_err();
        let exited = e
            .downcast_ref::<Exited>()
            .unwrap_or_else(|| panic!("{e:#}"));
        assert_eq!(exited.server, 0);
    }
}
