//! A local NATS cluster: several `nats-server`s joined by routes (issue 13).

use anyhow::{Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// How long the servers may take to start and connect their routes.
pub const ROUTES_WAIT: Duration = Duration::from_secs(30);

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
    pub async fn start_logging(n: usize, log_dir: Option<&Path>) -> Result<NatsCluster> {
        let mut servers = Vec::new();
        for _ in 0..n {
            servers.push(NatsMember {
                port: crate::harness::free_port()?,
                cluster_port: crate::harness::free_port()?,
                monitor_port: crate::harness::free_port()?,
                child: None,
            });
        }
        let mut c = NatsCluster {
            name: format!("gs_{}", Uuid::new_v4().simple()),
            servers,
            log_dir: log_dir.map(Path::to_path_buf),
        };
        for i in 0..n {
            c.spawn(i)?;
        }
        c.wait_routes().await?;
        Ok(c)
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
    pub async fn wait_routes(&self) -> Result<()> {
        let http = crate::client::http_client(None);
        let running: Vec<&NatsMember> = self.servers.iter().filter(|s| s.child.is_some()).collect();
        let want = running.len() as u64 - 1;
        let deadline = Instant::now() + ROUTES_WAIT;
        loop {
            let mut routes = Vec::new();
            for s in &running {
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
