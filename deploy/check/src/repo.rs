//! The repository's deployment files checked as a whole: every Kubernetes manifest
//! under [`K8S_DIR`] and the compose file [`COMPOSE_FILE`] against their schemas,
//! their `GS_*` variables against the configuration, the kustomizations against the
//! files beside them, and the objects against each other (what the schemas cannot
//! see: a Service whose selector matches no pod, a probe on a port the container does
//! not open, a node whose grace period ends before its drain).

use crate::{ConfigFields, Problem, Result, Schemas};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Kubernetes manifests (recursively; every `*.yaml` but `kustomization.yaml`).
pub const K8S_DIR: &str = "deploy/k8s";
/// The containerised cluster.
pub const COMPOSE_FILE: &str = "docker-compose.cluster.yml";
/// The node's drain deadline when the manifests do not set one
/// (`node.shutdown_timeout_ms`'s default).
const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 10_000;

/// What was checked (`file: kind/name`) and what is wrong.
#[derive(Debug, Default)]
pub struct Report {
    pub checked: Vec<String>,
    pub problems: Vec<Problem>,
}

/// One parsed Kubernetes object and the file it came from.
#[derive(Debug, Clone)]
pub struct Object {
    pub file: String,
    pub document: usize,
    pub value: Value,
}

impl Object {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }
    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }
    fn id(&self) -> String {
        format!("{}/{}", self.kind(), self.name())
    }
    fn problem(&self, pointer: &str, message: impl Into<String>) -> Problem {
        Problem {
            file: self.file.clone(),
            document: self.document,
            object: self.id(),
            pointer: pointer.into(),
            message: message.into(),
        }
    }
}

/// Every check, on the repository at `root`.
pub fn check(root: &Path) -> Result<Report> {
    let mut schemas = Schemas::load(&root.join("deploy/schemas"))?;
    let fields = ConfigFields::load(&root.join("config/example.toml"))?;
    let mut report = Report::default();
    let mut objects = Vec::new();
    for path in k8s_files(&root.join(K8S_DIR)) {
        let file = relative(root, &path);
        let text = crate::read(&path)?;
        report.problems.extend(schemas.check_k8s(&file, &text)?);
        for (document, doc) in crate::yaml_documents(&text).into_iter().enumerate() {
            if let Ok(value) = doc {
                if !value.is_null() {
                    let object = Object {
                        file: file.clone(),
                        document,
                        value,
                    };
                    report.checked.push(format!("{file}: {}", object.id()));
                    objects.push(object);
                }
            }
        }
    }
    let kustomizations = kustomizations(root)?;
    report
        .problems
        .extend(check_kustomizations(&kustomizations));
    report.problems.extend(k8s_variables(&fields, &objects));
    report
        .problems
        .extend(coherence(&objects, &generated_secrets(&kustomizations)));

    let compose = crate::read(&root.join(COMPOSE_FILE))?;
    report
        .problems
        .extend(schemas.check_compose(COMPOSE_FILE, &compose)?);
    report
        .problems
        .extend(compose_checks(&fields, COMPOSE_FILE, &compose));
    report.checked.push(format!("{COMPOSE_FILE}: compose"));
    Ok(report)
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

/// The manifests under `dir`, sorted, recursively.
pub fn k8s_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                dirs.push(path);
            } else if name.ends_with(".yaml") && name != "kustomization.yaml" {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// A `kustomization.yaml`: its directory, file name (relative) and content.
pub struct Kustomization {
    pub dir: PathBuf,
    pub file: String,
    pub value: Value,
}

fn kustomizations(root: &Path) -> Result<Vec<Kustomization>> {
    let mut out = Vec::new();
    let mut dirs = vec![root.join(K8S_DIR)];
    while let Some(d) = dirs.pop() {
        let path = d.join("kustomization.yaml");
        if path.exists() {
            let text = crate::read(&path)?;
            let value = crate::yaml_documents(&text)
                .into_iter()
                .next()
                .and_then(|d| d.ok())
                .unwrap_or(Value::Null);
            out.push(Kustomization {
                dir: d.clone(),
                file: relative(root, &path),
                value,
            });
        }
        if let Ok(entries) = std::fs::read_dir(&d) {
            dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
    }
    Ok(out)
}

/// Each kustomization lists exactly the manifests and subdirectories beside it, and
/// every entry exists: a manifest added but not listed would never be applied.
pub fn check_kustomizations(kustomizations: &[Kustomization]) -> Vec<Problem> {
    let mut problems = Vec::new();
    for k in kustomizations {
        let problem = |message: String| Problem {
            file: k.file.clone(),
            document: 0,
            object: "Kustomization".into(),
            pointer: "/resources".into(),
            message,
        };
        let listed: BTreeSet<String> = strings(&k.value["resources"]).into_iter().collect();
        let mut present = BTreeSet::new();
        for entry in std::fs::read_dir(&k.dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let manifest = name.ends_with(".yaml") && name != "kustomization.yaml";
            if manifest || path.join("kustomization.yaml").exists() {
                present.insert(name);
            }
        }
        for missing in listed.difference(&present) {
            problems.push(problem(format!("lists {missing}, which does not exist")));
        }
        for unlisted in present.difference(&listed) {
            problems.push(problem(format!("does not list {unlisted}")));
        }
    }
    problems
}

/// Secrets made by `secretGenerator`s (they have no manifest of their own).
fn generated_secrets(kustomizations: &[Kustomization]) -> BTreeSet<String> {
    kustomizations
        .iter()
        .flat_map(|k| k.value["secretGenerator"].as_array().cloned())
        .flatten()
        .filter_map(|g| g["name"].as_str().map(str::to_owned))
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The pod spec of a Deployment or StatefulSet.
fn pod_spec(o: &Object) -> Option<&Value> {
    matches!(o.kind(), "Deployment" | "StatefulSet").then(|| &o.value["spec"]["template"]["spec"])
}

fn containers(spec: &Value) -> impl Iterator<Item = (usize, &Value)> {
    spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
}

/// Every `GS_*` variable set by a container or a ConfigMap names a config field.
pub fn k8s_variables(fields: &ConfigFields, objects: &[Object]) -> Vec<Problem> {
    let mut problems = Vec::new();
    for o in objects {
        if o.kind() == "ConfigMap" {
            for key in o.value["data"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|m| m.0)
            {
                if let Some(why) = key.starts_with("GS_").then(|| fields.check_variable(key)) {
                    problems.extend(why.map(|w| o.problem(&format!("/data/{key}"), w)));
                }
            }
        }
        let Some(spec) = pod_spec(o) else { continue };
        for (c, container) in containers(spec) {
            for (e, env) in container["env"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                let name = env["name"].as_str().unwrap_or_default();
                if name.starts_with("GS_") {
                    if let Some(why) = fields.check_variable(name) {
                        let pointer = format!("/spec/template/spec/containers/{c}/env/{e}");
                        problems.push(o.problem(&pointer, why));
                    }
                }
            }
        }
    }
    problems
}

/// What the schemas cannot see: references between objects, probe ports, and the
/// node's grace period against its drain deadline.
pub fn coherence(objects: &[Object], generated_secrets: &BTreeSet<String>) -> Vec<Problem> {
    let mut problems = Vec::new();
    let named = |kind: &str| -> BTreeSet<String> {
        objects
            .iter()
            .filter(|o| o.kind() == kind)
            .map(|o| o.name().to_owned())
            .collect()
    };
    let config_maps = named("ConfigMap");
    let mut secrets = named("Secret");
    secrets.extend(generated_secrets.iter().cloned());
    let workloads: Vec<&Object> = objects.iter().filter(|o| pod_spec(o).is_some()).collect();
    for o in objects {
        match o.kind() {
            "Service" => problems.extend(selector_matches(o, "/spec/selector", &workloads)),
            "PodDisruptionBudget" => problems.extend(selector_matches(
                o,
                "/spec/selector/matchLabels",
                &workloads,
            )),
            "HorizontalPodAutoscaler" => {
                let target = &o.value["spec"]["scaleTargetRef"];
                let found = workloads.iter().any(|w| {
                    Some(w.kind()) == target["kind"].as_str()
                        && Some(w.name()) == target["name"].as_str()
                });
                if !found {
                    problems.push(o.problem("/spec/scaleTargetRef", "targets no workload here"));
                }
            }
            _ => {}
        }
        if let Some(spec) = pod_spec(o) {
            problems.extend(references(o, spec, &config_maps, &secrets));
            problems.extend(probe_ports(o, spec));
            problems.extend(node_drain(o, spec, objects));
        }
    }
    problems
}

/// A selector (`pointer` into the object) matches the pod labels of a workload.
fn selector_matches(o: &Object, pointer: &str, workloads: &[&Object]) -> Option<Problem> {
    let selector = o.value.pointer(pointer)?.as_object()?;
    let matches = workloads.iter().any(|w| {
        let labels = &w.value["spec"]["template"]["metadata"]["labels"];
        w.value["metadata"]["namespace"] == o.value["metadata"]["namespace"]
            && selector.iter().all(|(k, v)| &labels[k] == v)
    });
    (!matches).then(|| o.problem(pointer, "selects no pod of any workload here"))
}

/// ConfigMaps and Secrets named by `envFrom` and `valueFrom` exist.
fn references(
    o: &Object,
    spec: &Value,
    config_maps: &BTreeSet<String>,
    secrets: &BTreeSet<String>,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut check = |name: &Value, known: &BTreeSet<String>, what: &str, pointer: String| {
        if let Some(name) = name.as_str() {
            if !known.contains(name) {
                problems.push(o.problem(&pointer, format!("{what} {name} is not defined here")));
            }
        }
    };
    for (c, container) in containers(spec) {
        let base = format!("/spec/template/spec/containers/{c}");
        for (i, from) in container["envFrom"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let p = format!("{base}/envFrom/{i}");
            check(
                &from["configMapRef"]["name"],
                config_maps,
                "ConfigMap",
                p.clone(),
            );
            check(&from["secretRef"]["name"], secrets, "Secret", p);
        }
        for (i, env) in container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let p = format!("{base}/env/{i}");
            let from = &env["valueFrom"];
            check(
                &from["configMapKeyRef"]["name"],
                config_maps,
                "ConfigMap",
                p.clone(),
            );
            check(&from["secretKeyRef"]["name"], secrets, "Secret", p);
        }
    }
    problems
}

/// Probes use a port the container opens (by name or number).
fn probe_ports(o: &Object, spec: &Value) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (c, container) in containers(spec) {
        let ports = container["ports"].as_array().cloned().unwrap_or_default();
        for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
            let port = &container[probe]["httpGet"]["port"];
            if port.is_null() {
                continue;
            }
            let open = ports
                .iter()
                .any(|p| &p["name"] == port || &p["containerPort"] == port);
            if !open {
                let pointer = format!("/spec/template/spec/containers/{c}/{probe}/httpGet/port");
                problems.push(o.problem(&pointer, format!("port {port} is not a container port")));
            }
        }
    }
    problems
}

/// A `gs-node` container has a `preStop` hook, and its pod's grace period outlasts
/// the drain (`node.shutdown_timeout_ms`, from the container's env or a ConfigMap):
/// otherwise the kubelet kills the node mid-handoff.
fn node_drain(o: &Object, spec: &Value, objects: &[Object]) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (c, container) in containers(spec) {
        if !strings(&container["command"])
            .iter()
            .any(|s| s == "gs-node")
        {
            continue;
        }
        let base = format!("/spec/template/spec/containers/{c}");
        if container["lifecycle"]["preStop"].is_null() {
            problems.push(o.problem(&format!("{base}/lifecycle"), "gs-node has no preStop drain"));
        }
        let drain_ms = shutdown_timeout_ms(container, objects);
        let grace_s = spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
        if grace_s * 1000 <= drain_ms {
            problems.push(o.problem(
                "/spec/template/spec/terminationGracePeriodSeconds",
                format!("{grace_s} s does not outlast the node's drain of {drain_ms} ms"),
            ));
        }
    }
    problems
}

const SHUTDOWN_VAR: &str = "GS_NODE__SHUTDOWN_TIMEOUT_MS";

fn shutdown_timeout_ms(container: &Value, objects: &[Object]) -> u64 {
    let from_env = container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == SHUTDOWN_VAR)
        .and_then(|e| e["value"].as_str().map(str::to_owned));
    let from_config_map = || {
        let names = container["envFrom"].as_array().into_iter().flatten();
        names
            .filter_map(|f| f["configMapRef"]["name"].as_str())
            .find_map(|name| {
                let cm = objects
                    .iter()
                    .find(|o| o.kind() == "ConfigMap" && o.name() == name)?;
                cm.value["data"][SHUTDOWN_VAR].as_str().map(str::to_owned)
            })
    };
    from_env
        .or_else(from_config_map)
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT_MS)
}

/// The compose file's `GS_*` variables name config fields, and every service running
/// `gs-node` is given a `stop_grace_period` longer than its drain.
pub fn compose_checks(fields: &ConfigFields, file: &str, text: &str) -> Vec<Problem> {
    let mut problems = Vec::new();
    let Some(Ok(doc)) = crate::yaml_documents(text).into_iter().next() else {
        return problems;
    };
    for (name, service) in doc["services"].as_object().into_iter().flatten() {
        let problem = |pointer: String, message: String| Problem {
            file: file.into(),
            document: 0,
            object: format!("services.{name}"),
            pointer,
            message,
        };
        let env = compose_environment(&service["environment"]);
        for (key, _) in &env {
            if let Some(why) = key.starts_with("GS_").then(|| fields.check_variable(key)) {
                problems.extend(why.map(|w| problem(format!("/services/{name}/environment"), w)));
            }
        }
        if !strings(&service["command"]).iter().any(|s| s == "gs-node") {
            continue;
        }
        let drain_ms = env
            .iter()
            .find(|(k, _)| k == SHUTDOWN_VAR)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT_MS);
        let grace_ms = service["stop_grace_period"]
            .as_str()
            .and_then(compose_duration_ms)
            .unwrap_or(10_000);
        if grace_ms <= drain_ms {
            problems.push(problem(
                format!("/services/{name}/stop_grace_period"),
                format!("{grace_ms} ms does not outlast the node's drain of {drain_ms} ms"),
            ));
        }
    }
    problems
}

/// A service's `environment`, as a map or as a list of `KEY=VALUE`.
fn compose_environment(env: &Value) -> Vec<(String, String)> {
    match env {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| {
                let v = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                (k.clone(), v)
            })
            .collect(),
        Value::Array(a) => a
            .iter()
            .filter_map(|s| s.as_str())
            .map(|s| match s.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (s.to_owned(), String::new()),
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// A compose duration of whole units (`30s`, `1m30s`, `1500ms`) in milliseconds.
pub fn compose_duration_ms(s: &str) -> Option<u64> {
    let (mut total, mut number) = (0u64, String::new());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 = number.parse().ok()?;
        number.clear();
        let unit_ms = match c {
            'h' => 3_600_000,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                1
            }
            'm' => 60_000,
            's' => 1000,
            _ => return None,
        };
        total += n * unit_ms;
    }
    number.is_empty().then_some(total)
}

#[cfg(test)]
mod tests {
    use super::compose_duration_ms;

    #[test]
    fn compose_durations() {
        for (s, ms) in [
            ("30s", Some(30_000)),
            ("1m30s", Some(90_000)),
            ("1500ms", Some(1500)),
            ("1h", Some(3_600_000)),
            ("30", None),
            ("x", None),
        ] {
            assert_eq!(compose_duration_ms(s), ms, "{s}");
        }
    }
}
