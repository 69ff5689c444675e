//! Bounds on the state document, checked by `decide` before anything is stored.
//!
//! A session's document crosses every boundary of the service: it is stored in
//! PostgreSQL (jsonb), sent over NATS (whose messages are capped, 1 MiB by default), and
//! parsed by routers and clients (whose JSON parsers limit nesting, serde_json to 128
//! levels). A change that would take the document past any of these bounds is refused
//! with `limit_exceeded` (`details.limit` names the bound) and changes nothing:
//!
//! | limit | default | what |
//! |---|---|---|
//! | `max_path_depth` | 32 | tokens in one JSON Pointer |
//! | `max_path_bytes` | 1,024 | bytes of one JSON Pointer |
//! | `max_depth` | 48 | nesting of the document (the root object is 1) |
//! | `max_value_bytes` | 65,536 | serialised size of one change's value (and of metadata) |
//! | `max_document_bytes` | 262,144 | serialised size of the whole document |
//! | `max_keys_per_object` | 1,000 | members of any one object |
//!
//! Sizes are the compact serialisation's bytes, kept exactly and incrementally: each
//! change's effect on the size is computed from the path, the new value and the value
//! it replaces ([`size_delta`]), so a change costs what it touches, not the document.

use crate::error::{codes, RuleError};
use crate::pointer::{self, PathError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};

/// The bounds of one session's state document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DocLimits {
    pub max_path_depth: usize,
    pub max_path_bytes: usize,
    pub max_depth: usize,
    pub max_value_bytes: usize,
    pub max_document_bytes: usize,
    pub max_keys_per_object: usize,
}

impl Default for DocLimits {
    fn default() -> Self {
        DocLimits {
            max_path_depth: 32,
            max_path_bytes: 1024,
            max_depth: 48,
            max_value_bytes: 64 * 1024,
            max_document_bytes: 256 * 1024,
            max_keys_per_object: 1000,
        }
    }
}

/// `limit_exceeded`, naming the limit, its bound and the value that broke it.
pub fn exceeded(limit: &str, max: usize, actual: usize, what: impl Into<String>) -> RuleError {
    RuleError::new(codes::LIMIT_EXCEEDED, what)
        .with_details(json!({ "limit": limit, "max": max, "actual": actual }))
}

/// Bytes of `v`'s compact serialisation, counted without building it.
pub fn json_len<T: serde::Serialize + ?Sized>(v: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    serde_json::to_writer(&mut c, v).expect("a JSON value serialises");
    c.0
}

/// Bytes of a member name's serialisation (quotes and escapes included).
fn key_len(k: &str) -> usize {
    json_len(k)
}

/// Nesting of `v`: 0 for a scalar, 1 for an object or array of scalars, and so on.
/// Iterative, so any value that exists can be measured.
pub fn depth(v: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(v, 0usize)];
    while let Some((v, d)) = stack.pop() {
        match v {
            Value::Object(m) => {
                deepest = deepest.max(d + 1);
                stack.extend(m.values().map(|c| (c, d + 1)));
            }
            Value::Array(a) => {
                deepest = deepest.max(d + 1);
                stack.extend(a.iter().map(|c| (c, d + 1)));
            }
            _ => {}
        }
    }
    deepest
}

/// The most members of any object in `v`.
pub fn widest_object(v: &Value) -> usize {
    let mut widest = 0;
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(m) => {
                widest = widest.max(m.len());
                stack.extend(m.values());
            }
            Value::Array(a) => stack.extend(a.iter()),
            _ => {}
        }
    }
    widest
}

impl DocLimits {
    /// Checks a JSON Pointer's length and depth; returns its tokens' count.
    pub fn check_path(&self, path: &str) -> Result<usize, RuleError> {
        if path.len() > self.max_path_bytes {
            return Err(exceeded(
                "max_path_bytes",
                self.max_path_bytes,
                path.len(),
                format!("a path may have at most {} bytes", self.max_path_bytes),
            ));
        }
        let tokens = path.bytes().filter(|b| *b == b'/').count();
        if tokens > self.max_path_depth {
            return Err(exceeded(
                "max_path_depth",
                self.max_path_depth,
                tokens,
                format!("a path may have at most {} segments", self.max_path_depth),
            ));
        }
        Ok(tokens)
    }

    /// Checks a value to be set at a path of `tokens` segments: its size, the
    /// document's depth below it, the width of its objects.
    pub fn check_value(&self, tokens: usize, v: &Value) -> Result<usize, RuleError> {
        let len = json_len(v);
        if len > self.max_value_bytes {
            return Err(exceeded(
                "max_value_bytes",
                self.max_value_bytes,
                len,
                format!("a value may have at most {} bytes", self.max_value_bytes),
            ));
        }
        self.check_shape(tokens, v)?;
        Ok(len)
    }

    /// Depth and width of a value placed `tokens` levels below the root.
    pub fn check_shape(&self, tokens: usize, v: &Value) -> Result<(), RuleError> {
        // The root object is level 1; a value at a path of k tokens sits inside k
        // containers (the root and k - 1 members); the root itself (k = 0) in none.
        let d = tokens + depth(v);
        if d > self.max_depth {
            return Err(exceeded(
                "max_depth",
                self.max_depth,
                d,
                format!("the document may nest at most {} levels", self.max_depth),
            ));
        }
        let w = widest_object(v);
        if w > self.max_keys_per_object {
            return Err(exceeded(
                "max_keys_per_object",
                self.max_keys_per_object,
                w,
                format!(
                    "an object may have at most {} members",
                    self.max_keys_per_object
                ),
            ));
        }
        Ok(())
    }

    /// The document's size after a change.
    pub fn check_document(&self, size: usize) -> Result<(), RuleError> {
        if size > self.max_document_bytes {
            return Err(exceeded(
                "max_document_bytes",
                self.max_document_bytes,
                size,
                format!(
                    "the state document may have at most {} bytes",
                    self.max_document_bytes
                ),
            ));
        }
        Ok(())
    }
}

/// What setting (`Some(value)`) or removing (`None`) `path` would do to the document's
/// size in bytes, and the member count of the object that gains a member (0 when
/// none does). Fails as [`pointer::check_set`]/[`pointer::remove`] would.
pub fn size_delta(
    doc: &Value,
    path: &str,
    value: Option<&Value>,
) -> Result<(isize, usize), PathError> {
    size_delta_of(doc, path, value, None)
}

/// [`size_delta`], given the new value's serialised length when already measured
/// (`decide` measures it for `max_value_bytes`: no second serialisation).
pub fn size_delta_of(
    doc: &Value,
    path: &str,
    value: Option<&Value>,
    value_len: Option<usize>,
) -> Result<(isize, usize), PathError> {
    let json_len = |v: &Value| match (value_len, value) {
        (Some(n), Some(new)) if std::ptr::eq(v, new) => n,
        _ => json_len(v),
    };
    let tokens = pointer::parse(path)?;
    let err = |reason: String| PathError {
        path: path.to_string(),
        reason,
    };
    let Some((last, parents)) = tokens.split_last() else {
        return match value {
            Some(v) => Ok((json_len(v) as isize - json_len(doc) as isize, 0)),
            None => Err(err("the document root cannot be removed".into())),
        };
    };
    let mut cur = doc;
    for (i, token) in parents.iter().enumerate() {
        cur = match cur {
            Value::Object(m) => match m.get(token.as_ref()) {
                Some(v) => v,
                None => {
                    let Some(v) = value else {
                        return Err(err(format!("no member {token:?}")));
                    };
                    // The rest of the path is created as nested objects:
                    // `"token":{"next":{…"last":value}}`.
                    let created: usize = tokens[i + 1..].iter().map(|t| key_len(t) + 1).sum();
                    let wrappers = 2 * (tokens.len() - i - 1);
                    let comma = usize::from(!m.is_empty());
                    let added = comma + key_len(token) + 1 + created + wrappers + json_len(v);
                    return Ok((added as isize, m.len() + 1));
                }
            },
            Value::Array(a) => match pointer::array_index(path, token)? {
                Some(i) if i < a.len() => &a[i],
                _ => return Err(err(format!("no array element {token:?}"))),
            },
            _ => return Err(err(format!("cannot descend into a scalar at {token:?}"))),
        };
    }
    match (cur, value) {
        (Value::Object(m), Some(v)) => match m.get(last.as_ref()) {
            Some(old) => Ok((json_len(v) as isize - json_len(old) as isize, 0)),
            None => {
                let comma = usize::from(!m.is_empty());
                let added = comma + key_len(last) + 1 + json_len(v);
                Ok((added as isize, m.len() + 1))
            }
        },
        (Value::Object(m), None) => match m.get(last.as_ref()) {
            Some(old) => {
                let comma = usize::from(m.len() > 1);
                Ok((-((comma + key_len(last) + 1 + json_len(old)) as isize), 0))
            }
            None => Err(err(format!("no member {last:?}"))),
        },
        (Value::Array(a), Some(v)) => match pointer::array_index(path, last)? {
            Some(i) if i < a.len() => Ok((json_len(v) as isize - json_len(&a[i]) as isize, 0)),
            Some(i) if i > a.len() => Err(err(format!(
                "index {i} is past the end of an array of {}",
                a.len()
            ))),
            _ => Ok(((usize::from(!a.is_empty()) + json_len(v)) as isize, 0)),
        },
        (Value::Array(a), None) => match pointer::array_index(path, last)? {
            Some(i) if i < a.len() => {
                let comma = usize::from(a.len() > 1);
                Ok((-((comma + json_len(&a[i])) as isize), 0))
            }
            _ => Err(err(format!("no array element {last:?}"))),
        },
        _ => Err(err("the parent is not an object or array".into())),
    }
}

/// The document's size, remembered between commands (not part of the state: equal,
/// cloned and serialised as nothing). Unknown after a load or a wholesale
/// replacement until measured again.
#[derive(Debug, Default)]
pub struct SizeCache(AtomicU64);

const UNKNOWN: u64 = 0;

impl SizeCache {
    /// The size, measuring `doc` if it is not known.
    pub fn get_or_measure(&self, doc: &Value) -> usize {
        match self.0.load(Ordering::Relaxed) {
            UNKNOWN => {
                let n = json_len(doc);
                self.0.store(n as u64 + 1, Ordering::Relaxed);
                n
            }
            n => (n - 1) as usize,
        }
    }

    pub fn known(&self) -> Option<usize> {
        match self.0.load(Ordering::Relaxed) {
            UNKNOWN => None,
            n => Some((n - 1) as usize),
        }
    }

    pub fn set(&self, size: Option<usize>) {
        self.0
            .store(size.map_or(UNKNOWN, |n| n as u64 + 1), Ordering::Relaxed);
    }
}

impl Clone for SizeCache {
    fn clone(&self) -> Self {
        SizeCache(AtomicU64::new(self.0.load(Ordering::Relaxed)))
    }
}

impl PartialEq for SizeCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pointer;
    use serde_json::json;

    /// The incremental size equals the measured size after every kind of change.
    #[test]
    fn size_delta_is_exact() {
        let cases: Vec<(Value, &str, Option<Value>)> = vec![
            (json!({}), "/a", Some(json!(1))),
            (json!({"x": 1}), "/a", Some(json!("é\"\n"))),
            (json!({"a": 1}), "/a", Some(json!({"b": [1, 2]}))),
            (json!({"x": 1}), "/a/b/c", Some(json!(null))),
            (json!({}), "/a~1b/c~0d", Some(json!([true]))),
            (json!({"a": [1, 2]}), "/a/-", Some(json!(3))),
            (json!({"a": []}), "/a/0", Some(json!(3))),
            (json!({"a": [1, 2]}), "/a/1", Some(json!(30))),
            (json!({"a": [1, 2]}), "/a/0", None),
            (json!({"a": [1]}), "/a/0", None),
            (json!({"a": 1, "b": 2}), "/a", None),
            (json!({"a": 1}), "/a", None),
            (json!({"a": {"b": {}}}), "/a/b/c", Some(json!("v"))),
            (json!({"a": 1}), "", Some(json!({"z": [1, 2, 3]}))),
        ];
        for (doc, path, value) in cases {
            let (delta, _) = size_delta(&doc, path, value.as_ref()).unwrap();
            let mut after = doc.clone();
            match &value {
                Some(v) => {
                    pointer::set(&mut after, path, v.clone()).unwrap();
                }
                None => {
                    pointer::remove(&mut after, path).unwrap();
                }
            }
            assert_eq!(
                json_len(&doc) as isize + delta,
                json_len(&after) as isize,
                "{doc} {path} {value:?} -> {after}"
            );
        }
    }

    #[test]
    fn depth_and_width() {
        assert_eq!(depth(&json!(1)), 0);
        assert_eq!(depth(&json!({"a": [1, {"b": {}}]})), 4);
        assert_eq!(widest_object(&json!({"a": {"b": 1, "c": 2, "d": 3}})), 3);
        let l = DocLimits::default();
        assert_eq!(l.check_path("/a/b").unwrap(), 2);
        let deep = "/a".repeat(33);
        let e = l.check_path(&deep).unwrap_err();
        assert_eq!(e.code, codes::LIMIT_EXCEEDED);
        assert_eq!(e.details["limit"], "max_path_depth");
        let mut v = json!(1);
        for _ in 0..47 {
            v = json!({ "a": v });
        }
        assert!(l.check_shape(1, &v).is_ok());
        assert_eq!(
            l.check_shape(2, &v).unwrap_err().details["limit"],
            "max_depth"
        );
    }

    #[test]
    fn the_cache_is_not_part_of_the_state() {
        let a = SizeCache::default();
        let b = SizeCache::default();
        assert_eq!(a.get_or_measure(&json!({"a": 1})), 7);
        assert_eq!(a.known(), Some(7));
        assert_eq!(a, b);
        assert_eq!(a.clone().known(), Some(7));
        a.set(None);
        assert_eq!(a.known(), None);
    }
}
