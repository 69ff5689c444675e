//! The state file `cluster up` writes (`<dir>/state.json`): which processes it runs,
//! so `status`, `kill`, `pause`, `resume`, `add-node`, `scale` and `restart` can act
//! on them from another terminal.

use anyhow::{Context, Result};
use gs_shared::membership::MemberKind;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberState {
    pub id: String,
    /// `"node"` or `"router"` in the file.
    pub kind: MemberKind,
    pub pid: u32,
    pub url: String,
    pub log: PathBuf,
    pub config: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ClusterState {
    pub name: String,
    /// The base configuration file (holds the JWT secret `token` uses).
    pub config: PathBuf,
    pub cert: Option<PathBuf>,
    pub members: Vec<MemberState>,
}

impl ClusterState {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("state.json")
    }

    pub fn load(dir: &Path) -> Result<ClusterState> {
        let p = Self::path(dir);
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "no running cluster found ({} missing; start one with `cluster up`)",
                p.display()
            )
        })?;
        Ok(serde_json::from_str(&text)?)
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let tmp = dir.join("state.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(self)?)?;
        std::fs::rename(tmp, Self::path(dir))?;
        Ok(())
    }

    pub fn member(&self, id: &str) -> Result<&MemberState> {
        self.members.iter().find(|m| m.id == id).with_context(|| {
            let ids: Vec<&str> = self.members.iter().map(|m| m.id.as_str()).collect();
            format!("no member {id:?} (members: {})", ids.join(", "))
        })
    }
}

/// Whether a process is alive (signal 0) and not a zombie: a member `up` started and
/// `scale` drained has exited, but stays a zombie until `up` reaps it.
pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks for existence.
    if unsafe { libc::kill(pid as i32, 0) } != 0 {
        return false;
    }
    // Linux: the state is the field after the parenthesised command name.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().chars().next()),
            Some(Some('Z' | 'X'))
        ),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A child that has exited but is not reaped yet (a zombie, as the members `up`
    /// started are after `scale` drains them) is not alive; a running one is.
    #[test]
    fn a_zombie_is_not_alive() {
        let mut running = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        assert!(pid_alive(running.id()));
        let mut exited = std::process::Command::new("true").spawn().unwrap();
        let pid = exited.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        // Not reaped: kill(pid, 0) keeps answering; the state turns to Z.
        while pid_alive(pid) {
            assert!(Instant::now() < deadline, "{pid} still alive after exiting");
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: signal 0 to our own unreaped child only checks for existence.
        assert_eq!(unsafe { libc::kill(pid as i32, 0) }, 0, "still a zombie");
        exited.wait().unwrap();
        running.kill().unwrap();
        running.wait().unwrap();
    }
}
