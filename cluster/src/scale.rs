//! Changing a running cluster: `cluster scale --nodes N --routers M` and
//! `cluster restart --rolling`.
//!
//! What to do is decided without I/O ([`plan_scale`], [`plan_rolling`]: lists of
//! [`Step`]s, table-tested); doing it goes through [`Members`], which the in-process
//! harness ([`LocalCluster`], the chaos tests) and the processes of `cluster up` (the
//! state file, [`StateCluster`]) both implement, so the CLI and the tests run the same
//! sequence:
//!
//! * **adding** starts a member and waits until it is ready (a node: on every router's
//!   ring; a router: ready and seeing every node) before the next step;
//! * **removing** drains: SIGTERM, then waits for the process to exit (a node hands its
//!   sessions off with the planned handoff; a router closes its sockets with 1001 and
//!   its clients reconnect elsewhere). The member with the largest index goes first,
//!   so the oldest members (and their placement) stay;
//! * consecutive steps are [`STEP_SPACING`] apart, so the sessions one step moved are
//!   taken over before the next step moves them again or starts a process beside them;
//! * **rolling restart** replaces every node, then every router, one at a time: start
//!   the replacement, wait for it, then drain the old one (surge first, like a
//!   Kubernetes Deployment with `maxSurge: 1, maxUnavailable: 0`), so capacity never
//!   drops below the cluster's size.

use crate::client::{cluster_info, http_client};
use crate::harness::{self, is_ready, launch, node_config, LocalCluster, READY_TIMEOUT};
use crate::state::{pid_alive, ClusterState, MemberState};
use anyhow::{bail, Context, Result};
use gs_shared::auth::{Authority, Role};
use gs_shared::config::Config;
use gs_shared::membership::MemberKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// How long a drained member may take to exit (a node's drain is bounded by
/// `node.shutdown_timeout_ms`, a router's by its close grace; both well under this).
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// One step of a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Start one more member of this kind and wait until it is ready.
    Start(MemberKind),
    /// Drain this member (SIGTERM) and wait until it has exited.
    Drain(String),
}

/// The index in a member id (`node-12` → 12); ids without one sort first.
fn index_of(id: &str) -> u64 {
    id.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Steps that bring `running` members of `kind` to `target`: starts, or drains of the
/// members with the largest index first.
pub fn plan_scale(kind: MemberKind, running: &[String], target: usize) -> Vec<Step> {
    if target >= running.len() {
        return vec![Step::Start(kind); target - running.len()];
    }
    let mut by_index: Vec<&String> = running.iter().collect();
    by_index.sort_by_key(|id| std::cmp::Reverse(index_of(id)));
    by_index
        .into_iter()
        .take(running.len() - target)
        .map(|id| Step::Drain(id.clone()))
        .collect()
}

/// Steps that replace every node, then every router, one at a time (oldest first):
/// start a replacement, then drain the old member.
pub fn plan_rolling(nodes: &[String], routers: &[String]) -> Vec<Step> {
    let mut steps = Vec::new();
    for (kind, ids) in [(MemberKind::Node, nodes), (MemberKind::Router, routers)] {
        let mut ids: Vec<&String> = ids.iter().collect();
        ids.sort_by_key(|id| index_of(id));
        for id in ids {
            steps.push(Step::Start(kind));
            steps.push(Step::Drain(id.clone()));
        }
    }
    steps
}

/// The next free id of a kind: one past the largest index ever used (`ids` includes
/// members that are gone), so a new member never takes a drained member's name.
pub fn next_id(kind: MemberKind, ids: &[String]) -> String {
    let prefix = match kind {
        MemberKind::Node => "node",
        MemberKind::Router => "router",
    };
    let n = ids
        .iter()
        .filter(|id| id.starts_with(&format!("{prefix}-")))
        .map(|id| index_of(id))
        .max()
        .unwrap_or(0);
    format!("{prefix}-{}", n + 1)
}

/// A running cluster the steps act on.
#[allow(async_fn_in_trait)]
pub trait Members {
    /// Ids of the running members of `kind`.
    fn running(&self, kind: MemberKind) -> Vec<String>;
    /// Starts one more member of `kind`, waits until it is ready, returns its id.
    async fn start_member(&mut self, kind: MemberKind) -> Result<String>;
    /// SIGTERM to `id`, then waits (at most [`EXIT_TIMEOUT`]) until it has exited.
    async fn drain_member(&mut self, id: &str) -> Result<()>;
}

/// What one executed step did, for the caller's progress output.
#[derive(Debug, Clone)]
pub struct Done {
    pub step: Step,
    /// The member started or drained.
    pub id: String,
    pub took: Duration,
}

/// Between two consecutive steps: time for the sessions the first step moved to be
/// taken over before the next one acts. Measured reasons (BENCHMARKS.md): drained back
/// to back, a session of the first drained node can land on the next one to go and
/// move two or three times while one command waits; started back to back, the next
/// node's process start-up (its connections opened and warmed) runs on the same cores
/// as the takeovers the previous join caused. Doing every step at once instead makes
/// one burst of every takeover on the nodes that stay, which measured worse.
pub const STEP_SPACING: Duration = Duration::from_millis(500);

/// Executes `steps` in order, calling `each` after every one; consecutive steps are
/// [`STEP_SPACING`] apart.
pub async fn execute<M: Members>(
    m: &mut M,
    steps: Vec<Step>,
    mut each: impl FnMut(&Done),
) -> Result<Vec<Done>> {
    let mut done: Vec<Done> = Vec::new();
    for step in steps {
        if !done.is_empty() {
            tokio::time::sleep(STEP_SPACING).await;
        }
        let t = Instant::now();
        let id = match &step {
            Step::Start(kind) => m.start_member(*kind).await?,
            Step::Drain(id) => {
                m.drain_member(id).await?;
                id.clone()
            }
        };
        let d = Done {
            step,
            id,
            took: t.elapsed(),
        };
        each(&d);
        done.push(d);
    }
    Ok(done)
}

/// Brings the cluster to `nodes` nodes and `routers` routers (`None`: unchanged):
/// nodes first, then routers. At least one of each must remain.
pub async fn scale<M: Members>(
    m: &mut M,
    nodes: Option<usize>,
    routers: Option<usize>,
    each: impl FnMut(&Done),
) -> Result<Vec<Done>> {
    if nodes == Some(0) || routers == Some(0) {
        bail!("a cluster needs at least one node and one router");
    }
    let mut steps = Vec::new();
    if let Some(n) = nodes {
        steps.extend(plan_scale(
            MemberKind::Node,
            &m.running(MemberKind::Node),
            n,
        ));
    }
    if let Some(r) = routers {
        steps.extend(plan_scale(
            MemberKind::Router,
            &m.running(MemberKind::Router),
            r,
        ));
    }
    execute(m, steps, each).await
}

/// Replaces every node, then every router, one at a time.
pub async fn restart_rolling<M: Members>(m: &mut M, each: impl FnMut(&Done)) -> Result<Vec<Done>> {
    let steps = plan_rolling(&m.running(MemberKind::Node), &m.running(MemberKind::Router));
    execute(m, steps, each).await
}

impl Members for LocalCluster {
    fn running(&self, kind: MemberKind) -> Vec<String> {
        self.members
            .values()
            .filter(|m| m.kind == kind && m.child.is_some())
            .map(|m| m.id.clone())
            .collect()
    }

    async fn start_member(&mut self, kind: MemberKind) -> Result<String> {
        match kind {
            MemberKind::Node => self.add_node().await,
            MemberKind::Router => self.add_router().await,
        }
    }

    async fn drain_member(&mut self, id: &str) -> Result<()> {
        self.drain(id).await
    }
}

/// The processes `cluster up` runs, as its state file records them; started members
/// outlive the command (as with `add-node`) and are recorded in the file, drained ones
/// are removed from it.
pub struct StateCluster {
    dir: PathBuf,
    state: ClusterState,
    http: reqwest::Client,
    auth: Authority,
}

impl StateCluster {
    pub fn open(dir: &Path) -> Result<StateCluster> {
        let state = ClusterState::load(dir)?;
        let cfg = Config::load(Some(&state.config))?;
        let cert = match &state.cert {
            Some(p) => Some(crate::tls::DevCert::load(p)?),
            None => None,
        };
        Ok(StateCluster {
            dir: dir.to_path_buf(),
            http: http_client(cert.as_ref()),
            auth: Authority::from_config(&cfg.auth),
            state,
        })
    }

    fn template(&self, kind: MemberKind) -> Result<&MemberState> {
        self.state
            .members
            .iter()
            .find(|m| m.kind == kind)
            .with_context(|| format!("the cluster has no {kind} to copy the configuration from"))
    }

    /// Waits until every live router is ready and has every live node on its ring.
    async fn wait_routers_see_nodes(&self) -> Result<()> {
        let admin = self.auth.mint_access(Uuid::new_v4(), Role::Admin, 300);
        let nodes = self.running(MemberKind::Node);
        let deadline = Instant::now() + READY_TIMEOUT;
        for r in self
            .state
            .members
            .iter()
            .filter(|m| m.kind == MemberKind::Router)
        {
            if !pid_alive(r.pid) {
                continue;
            }
            loop {
                let on_ring = match cluster_info(&self.http, &r.url, &admin).await {
                    Ok(v) => harness::nodes_on_ring(&v),
                    Err(_) => Vec::new(),
                };
                if is_ready(&self.http, &r.url).await && nodes.iter().all(|n| on_ring.contains(n)) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{} does not see every node on its ring after {READY_TIMEOUT:?}",
                        r.id
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }
}

impl Members for StateCluster {
    fn running(&self, kind: MemberKind) -> Vec<String> {
        self.state
            .members
            .iter()
            .filter(|m| m.kind == kind && pid_alive(m.pid))
            .map(|m| m.id.clone())
            .collect()
    }

    async fn start_member(&mut self, kind: MemberKind) -> Result<String> {
        let template = self.template(kind)?.clone();
        let base = Config::load(Some(&template.config))?;
        let ids: Vec<String> = self.state.members.iter().map(|m| m.id.clone()).collect();
        let id = next_id(kind, &ids);
        let port = harness::free_port()?;
        let (cfg, url) = match kind {
            MemberKind::Node => (
                node_config(&base, &id, port),
                format!("http://127.0.0.1:{port}"),
            ),
            MemberKind::Router => {
                let scheme = template.url.split("://").next().unwrap_or("http");
                (
                    harness::router_config(&base, &id, port),
                    format!("{scheme}://127.0.0.1:{port}"),
                )
            }
        };
        let launched = launch(&harness::bin_dir()?, &self.dir, &id, kind, &cfg, false)?;
        let pid = launched
            .child
            .id()
            .context("the new member exited at once")?;
        self.state.members.push(MemberState {
            id: id.clone(),
            kind,
            pid,
            url: url.clone(),
            log: launched.log,
            config: launched.config,
        });
        self.state.save(&self.dir)?;
        harness::wait_until_ready(&self.http, &id, &url).await?;
        self.wait_routers_see_nodes().await?;
        Ok(id)
    }

    async fn drain_member(&mut self, id: &str) -> Result<()> {
        let pid = self.state.member(id)?.pid;
        if pid_alive(pid) {
            // SAFETY: a signal to a process the cluster started.
            unsafe {
                libc::kill(pid as i32, libc::SIGCONT);
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while pid_alive(pid) {
            if Instant::now() > deadline {
                bail!("{id} (pid {pid}) did not exit within {EXIT_TIMEOUT:?} of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.state.members.retain(|m| m.id != id);
        self.state.save(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MemberKind::{Node, Router};

    fn ids(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    fn drain(id: &str) -> Step {
        Step::Drain(id.into())
    }

    #[test]
    fn scale_plans() {
        let cases: &[(&[&str], usize, Vec<Step>)] = &[
            (&["node-1", "node-2"], 2, vec![]),
            (&["node-1", "node-2"], 5, vec![Step::Start(Node); 3]),
            (
                &["node-1", "node-2", "node-3", "node-4", "node-5"],
                2,
                vec![drain("node-5"), drain("node-4"), drain("node-3")],
            ),
            // Largest index first, by number, not by text.
            (
                &["node-10", "node-9", "node-2"],
                1,
                vec![drain("node-10"), drain("node-9")],
            ),
            (&[], 1, vec![Step::Start(Node)]),
        ];
        for (running, target, want) in cases {
            assert_eq!(
                &plan_scale(Node, &ids(running), *target),
                want,
                "{running:?} -> {target}"
            );
        }
    }

    #[test]
    fn rolling_replaces_nodes_then_routers_one_at_a_time() {
        let steps = plan_rolling(&ids(&["node-2", "node-1"]), &ids(&["router-1", "router-2"]));
        assert_eq!(
            steps,
            vec![
                Step::Start(Node),
                drain("node-1"),
                Step::Start(Node),
                drain("node-2"),
                Step::Start(Router),
                drain("router-1"),
                Step::Start(Router),
                drain("router-2"),
            ]
        );
    }

    #[test]
    fn next_ids_never_reuse_a_name() {
        let cases: &[(MemberKind, &[&str], &str)] = &[
            (Node, &[], "node-1"),
            (Node, &["node-1", "node-2", "router-7"], "node-3"),
            (Node, &["node-4", "node-2"], "node-5"),
            (Router, &["node-9", "router-1"], "router-2"),
            (Router, &["node-1"], "router-1"),
        ];
        for (kind, existing, want) in cases {
            assert_eq!(next_id(*kind, &ids(existing)), *want, "{existing:?}");
        }
    }
}
