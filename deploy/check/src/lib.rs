//! Checks of the deployment manifests, with no network and no cluster: every
//! Kubernetes object under `deploy/k8s/` against the Kubernetes JSON schema of its
//! kind, `docker-compose.cluster.yml` against the Compose specification's schema, and
//! every `GS_*` variable they set against the fields of `config/example.toml`. The
//! schemas are vendored in `deploy/schemas/` (where each comes from, and how to refresh
//! it: `deploy/schemas/README.md`), so CI on a fresh machine needs nothing but Cargo.
//!
//! # Layout
//! * [`Schemas`]: the vendored schemas, compiled once; [`Schemas::check_k8s`] and
//!   [`Schemas::check_compose`] validate YAML text and return every [`Problem`].
//! * [`k8s_schema_file`]: which vendored file holds the schema of an `apiVersion`/`kind`
//!   (the layout of the standalone-strict schemas: `deployment-apps-v1.json`).
//! * [`ConfigFields`]: the `[section] field`s of the configuration, and the check that
//!   a `GS_SECTION__FIELD` variable names one of them (a typo would be ignored silently
//!   by the processes, which read unknown variables as nothing).
//! * [`yaml_documents`]: the documents of a (multi-document) YAML text as JSON values,
//!   with `<<` merge keys resolved (the compose file uses them).
//!
//! Why a schema check and not only `kubectl --dry-run`: CI has no cluster and no
//! Docker engine. The strict schemas reject unknown fields (a misspelt `readinesProbe`
//! would otherwise be dropped by the API server without a word) and wrong types.

pub mod repo;

use jsonschema::{Registry, Resource, Validator};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

/// The Kubernetes version whose schemas are vendored (a directory of
/// `deploy/schemas/kubernetes/`).
pub const K8S_SCHEMA_DIR: &str = "kubernetes/v1.37.0-local-strict";
/// The `$id` under which the strict schemas refer to their shared definitions.
const K8S_DEFINITIONS_ID: &str = "https://kubernetes.io/api/_definitions.json";
/// The Compose specification's schema.
pub const COMPOSE_SCHEMA: &str = "compose/compose-spec.json";
/// Variables the processes read that are not configuration fields.
const NON_FIELD_VARIABLES: &[&str] = &["GS_CONFIG"];

/// Why a check could not run at all (a missing or unreadable schema or input).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path} is not valid TOML: {source}")]
    Toml {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("schema {what}: {message}")]
    Schema { what: String, message: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// One thing wrong with a manifest: where (file, document, object, field) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    /// Index of the YAML document in the file (0 for single-document files).
    pub document: usize,
    /// `kind/name` of a Kubernetes object, or the compose file's `services.x` etc.
    pub object: String,
    /// JSON Pointer into the document ("" for the whole document).
    pub pointer: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (document {}, {}) at '{}': {}",
            self.file, self.document, self.object, self.pointer, self.message
        )
    }
}

/// The repository's root (this crate lives in `deploy/check/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_json(path: &Path) -> Result<Value> {
    serde_json::from_str(&read(path)?).map_err(|source| Error::Json {
        path: path.to_owned(),
        source,
    })
}

/// The vendored file holding the schema of `kind` in `api_version`, named as the
/// standalone-strict schemas are: `{kind}-{group}-{version}.json` with the group's
/// domain cut off (`policy/v1` PodDisruptionBudget: `poddisruptionbudget-policy-v1`,
/// `rbac.authorization.k8s.io/v1` Role: `role-rbac-v1`), `{kind}-{version}.json` for
/// the core group (`v1` Service: `service-v1`).
pub fn k8s_schema_file(api_version: &str, kind: &str) -> String {
    let kind = kind.to_lowercase();
    match api_version.split_once('/') {
        Some((group, version)) => {
            let group = group.split('.').next().unwrap_or(group);
            format!("{kind}-{group}-{version}.json")
        }
        None => format!("{kind}-{api_version}.json"),
    }
}

/// The vendored schemas, each compiled on first use.
pub struct Schemas {
    dir: PathBuf,
    registry: Registry<'static>,
    k8s: HashMap<String, Validator>,
    compose: Option<Validator>,
}

impl Schemas {
    /// Loads the shared Kubernetes definitions from `dir` (normally
    /// `deploy/schemas/`); kinds and the compose schema are compiled when needed.
    pub fn load(dir: &Path) -> Result<Schemas> {
        let defs = read_json(&dir.join(K8S_SCHEMA_DIR).join("_definitions.json"))?;
        let registry = Registry::new()
            .add(K8S_DEFINITIONS_ID, Resource::from_contents(defs))
            .and_then(|r| r.prepare())
            .map_err(|e| Error::Schema {
                what: K8S_DEFINITIONS_ID.into(),
                message: e.to_string(),
            })?;
        Ok(Schemas {
            dir: dir.to_owned(),
            registry,
            k8s: HashMap::new(),
            compose: None,
        })
    }

    /// The vendored schemas of this repository.
    pub fn vendored() -> Result<Schemas> {
        Schemas::load(&repo_root().join("deploy/schemas"))
    }

    fn k8s_validator(&mut self, file: &str) -> Result<Option<&Validator>> {
        if !self.k8s.contains_key(file) {
            let path = self.dir.join(K8S_SCHEMA_DIR).join(file);
            if !path.exists() {
                return Ok(None);
            }
            let schema = read_json(&path)?;
            let validator = jsonschema::options()
                .with_registry(&self.registry)
                .build(&schema)
                .map_err(|e| Error::Schema {
                    what: file.into(),
                    message: e.to_string(),
                })?;
            self.k8s.insert(file.to_owned(), validator);
        }
        Ok(self.k8s.get(file))
    }

    /// Validates every document of a Kubernetes manifest (`file` names it in the
    /// problems). A kind without a vendored schema is a problem, not a pass.
    pub fn check_k8s(&mut self, file: &str, text: &str) -> Result<Vec<Problem>> {
        let mut problems = Vec::new();
        for (i, doc) in yaml_documents(text).into_iter().enumerate() {
            let problem = |object: &str, pointer: &str, message: String| Problem {
                file: file.into(),
                document: i,
                object: object.into(),
                pointer: pointer.into(),
                message,
            };
            let doc = match doc {
                Ok(Value::Null) => continue,
                Ok(doc) => doc,
                Err(message) => {
                    problems.push(problem("?", "", message));
                    continue;
                }
            };
            let api_version = doc["apiVersion"].as_str().unwrap_or_default();
            let kind = doc["kind"].as_str().unwrap_or_default();
            let object = format!("{kind}/{}", doc["metadata"]["name"].as_str().unwrap_or("?"));
            if api_version.is_empty() || kind.is_empty() {
                problems.push(problem(&object, "", "no apiVersion or kind".into()));
                continue;
            }
            let schema_file = k8s_schema_file(api_version, kind);
            let Some(validator) = self.k8s_validator(&schema_file)? else {
                problems.push(problem(
                    &object,
                    "",
                    format!(
                        "no vendored schema {schema_file} for {api_version} {kind} \
                         (add it: deploy/schemas/README.md)"
                    ),
                ));
                continue;
            };
            for e in validator.iter_errors(&doc) {
                let pointer = e.instance_path().to_string();
                problems.push(problem(&object, &pointer, e.to_string()));
            }
        }
        Ok(problems)
    }

    /// Validates a compose file against the Compose specification's schema.
    pub fn check_compose(&mut self, file: &str, text: &str) -> Result<Vec<Problem>> {
        if self.compose.is_none() {
            let schema = read_json(&self.dir.join(COMPOSE_SCHEMA))?;
            let validator = jsonschema::validator_for(&schema).map_err(|e| Error::Schema {
                what: COMPOSE_SCHEMA.into(),
                message: e.to_string(),
            })?;
            self.compose = Some(validator);
        }
        let validator = self.compose.as_ref().expect("compiled above");
        let mut problems = Vec::new();
        for (i, doc) in yaml_documents(text).into_iter().enumerate() {
            let problem = |pointer: String, message: String| Problem {
                file: file.into(),
                document: i,
                object: "compose".into(),
                pointer,
                message,
            };
            match doc {
                Ok(doc) => problems.extend(
                    validator
                        .iter_errors(&doc)
                        .map(|e| problem(e.instance_path().to_string(), e.to_string())),
                ),
                Err(message) => problems.push(problem(String::new(), message)),
            }
        }
        Ok(problems)
    }
}

/// The documents of a YAML text as JSON values (`<<` merge keys resolved), each or
/// the reason it could not be read.
pub fn yaml_documents(text: &str) -> Vec<std::result::Result<Value, String>> {
    serde_norway::Deserializer::from_str(text)
        .map(|de| {
            let mut value: serde_norway::Value =
                serde::Deserialize::deserialize(de).map_err(|e| e.to_string())?;
            value.apply_merge().map_err(|e| e.to_string())?;
            serde_json::to_value(value).map_err(|e| e.to_string())
        })
        .collect()
}

/// The configuration's fields, `section -> {field}`, as `config/example.toml` lists
/// them (it lists every field with its default).
pub struct ConfigFields(BTreeMap<String, BTreeSet<String>>);

impl ConfigFields {
    pub fn load(example_toml: &Path) -> Result<ConfigFields> {
        let table: toml::Table = read(example_toml)?.parse().map_err(|source| Error::Toml {
            path: example_toml.to_owned(),
            source,
        })?;
        let fields = table
            .into_iter()
            .filter_map(|(section, v)| match v {
                toml::Value::Table(t) => Some((section, t.keys().cloned().collect())),
                _ => None,
            })
            .collect();
        Ok(ConfigFields(fields))
    }

    /// This repository's `config/example.toml`.
    pub fn of_repo() -> Result<ConfigFields> {
        ConfigFields::load(&repo_root().join("config/example.toml"))
    }

    /// `None` when `GS_SECTION__FIELD` names a field (or is another variable the
    /// processes read), else why not.
    pub fn check_variable(&self, name: &str) -> Option<String> {
        if NON_FIELD_VARIABLES.contains(&name) {
            return None;
        }
        let Some(rest) = name.strip_prefix("GS_") else {
            return Some(format!("{name} does not start with GS_"));
        };
        let Some((section, field)) = rest.split_once("__") else {
            return Some(format!("{name} is not GS_<SECTION>__<FIELD>"));
        };
        let (section, field) = (section.to_lowercase(), field.to_lowercase());
        match self.0.get(&section) {
            None => Some(format!(
                "{name}: no section [{section}] in the configuration"
            )),
            Some(fields) if !fields.contains(&field) => {
                Some(format!("{name}: no field {field} in [{section}]"))
            }
            Some(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_file_names_follow_the_strict_schemas_layout() {
        for (api_version, kind, file) in [
            ("v1", "Service", "service-v1.json"),
            ("v1", "ConfigMap", "configmap-v1.json"),
            ("apps/v1", "Deployment", "deployment-apps-v1.json"),
            (
                "policy/v1",
                "PodDisruptionBudget",
                "poddisruptionbudget-policy-v1.json",
            ),
            (
                "autoscaling/v2",
                "HorizontalPodAutoscaler",
                "horizontalpodautoscaler-autoscaling-v2.json",
            ),
            ("rbac.authorization.k8s.io/v1", "Role", "role-rbac-v1.json"),
        ] {
            assert_eq!(k8s_schema_file(api_version, kind), file);
        }
    }

    #[test]
    fn merge_keys_are_resolved_and_documents_split() {
        let docs = yaml_documents("a: &x {p: 1}\nb: {<<: *x, q: 2}\n---\nc: 3\n");
        assert_eq!(docs.len(), 2);
        let first = docs[0].as_ref().unwrap();
        assert_eq!(first["b"], serde_json::json!({"p": 1, "q": 2}));
        assert_eq!(docs[1].as_ref().unwrap()["c"], 3);
    }

    #[test]
    fn variables_are_checked_against_the_sections_and_fields() {
        let fields = ConfigFields(BTreeMap::from([(
            "redis".to_string(),
            BTreeSet::from(["url".to_string(), "lock_urls".to_string()]),
        )]));
        assert_eq!(fields.check_variable("GS_REDIS__LOCK_URLS"), None);
        assert_eq!(fields.check_variable("GS_CONFIG"), None);
        for bad in [
            "GS_REDIS__LOCK_URL",
            "GS_REDIS_URL",
            "GS_REDDIS__URL",
            "REDIS__URL",
        ] {
            assert!(fields.check_variable(bad).is_some(), "{bad} passed");
        }
    }
}
