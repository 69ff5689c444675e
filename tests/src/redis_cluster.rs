//! A private Redis Cluster for tests: `n` masters (`redis-server --cluster-enabled
//! yes`, each on a free port in a temp dir), joined with `redis-cli --cluster create
//! ... --cluster-replicas 0 --cluster-yes`, ready once every master reports
//! `cluster_state:ok`. Killed on drop.

use anyhow::{Context, Result};
use std::time::{Duration, Instant};

/// Bound on the cluster's start (processes up, slots assigned, state ok).
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub struct RedisCluster {
    pub ports: Vec<u16>,
    _dirs: Vec<tempfile::TempDir>,
    children: Vec<tokio::process::Child>,
}

impl RedisCluster {
    pub async fn start(masters: usize) -> Result<RedisCluster> {
        let mut c = RedisCluster {
            ports: Vec::new(),
            _dirs: Vec::new(),
            children: Vec::new(),
        };
        for _ in 0..masters {
            let port = cluster::harness::free_port()?;
            let dir = tempfile::tempdir()?;
            let child = tokio::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("starting redis-server (scripts/services.sh installs it)")?;
            c.ports.push(port);
            c._dirs.push(dir);
            c.children.push(child);
        }
        let deadline = Instant::now() + START_TIMEOUT;
        for &port in &c.ports {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "redis-server :{port} did not start"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let addrs: Vec<String> = c.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = tokio::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .await
            .context("running redis-cli --cluster create")?;
        anyhow::ensure!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for &port in &c.ports {
            while !cluster_ok(port).await {
                anyhow::ensure!(Instant::now() < deadline, "cluster state not ok on :{port}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(c)
    }

    /// The masters' URLs (`redis.cluster_urls`).
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// A cluster client connection (for checking what the service wrote).
    pub async fn connection(&self) -> Result<redis::cluster_async::ClusterConnection> {
        let client = redis::cluster::ClusterClient::new(self.urls())?;
        Ok(client.get_async_connection().await?)
    }
}

/// Whether the master on `port` reports `cluster_state:ok`.
async fn cluster_ok(port: u16) -> bool {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else {
        return false;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    let info: redis::RedisResult<String> = redis::cmd("CLUSTER")
        .arg("INFO")
        .query_async(&mut conn)
        .await;
    info.is_ok_and(|i| i.contains("cluster_state:ok"))
}
