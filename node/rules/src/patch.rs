//! JSON merge patches (RFC 7386) between two serialised play states.
//!
//! Every play event carries a `patch`: the merge patch that turns the play state
//! before the event into the play state after it. `decide` computes it by running the
//! rules on a scratch copy and diffing ([`diff`]); `apply` only merges it ([`merge`]).
//! Why this shape:
//!
//! * the rules live in one place (`decide`); `apply` cannot drift from them, because it
//!   makes no choice and computes nothing, so replaying the log reproduces the live
//!   state exactly;
//! * clients mirror the play view (`game_view().play`) by merging the same patch.
//!
//! Merge patches cannot express a JSON `null` value (null means "remove"); the play
//! state never serialises one, because every optional field is skipped when absent.

use serde_json::{Map, Value};

/// The merge patch turning `before` into `after` (an empty object when equal).
pub fn diff(before: &Value, after: &Value) -> Value {
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            let mut out = Map::new();
            for (k, bv) in b {
                match a.get(k) {
                    None => {
                        out.insert(k.clone(), Value::Null);
                    }
                    Some(av) if av != bv => {
                        out.insert(k.clone(), diff(bv, av));
                    }
                    Some(_) => {}
                }
            }
            for (k, av) in a {
                if !b.contains_key(k) {
                    out.insert(k.clone(), av.clone());
                }
            }
            Value::Object(out)
        }
        _ => after.clone(),
    }
}

/// Like [`diff`], but `null` when nothing changed: events store an absent patch, so an
/// empty one must compare equal after a round trip through the log.
pub fn diff_or_null(before: &Value, after: &Value) -> Value {
    let p = diff(before, after);
    if is_empty(&p) {
        Value::Null
    } else {
        p
    }
}

/// Merges `patch` into `target` (RFC 7386 `MergePatch`).
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("made an object above");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Whether a patch changes nothing (absent patches deserialise as `null`).
pub fn is_empty(patch: &Value) -> bool {
    match patch {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn diff_then_merge_is_identity() {
        let cases = [
            (
                json!({"a": 1, "b": {"c": [1, 2]}}),
                json!({"a": 2, "b": {"c": [1]}}),
            ),
            (json!({"a": {"x": 1}}), json!({})),
            (json!({}), json!({"a": {"x": {"y": 1}}})),
            (json!({"a": 1}), json!({"a": {"z": 1}})),
            (json!({"a": {"z": 1}}), json!({"a": 5})),
            (json!({"a": {"k": 1, "j": 2}}), json!({"a": {"k": 1}})),
        ];
        for (before, after) in cases {
            let p = diff(&before, &after);
            let mut t = before.clone();
            merge(&mut t, &p);
            assert_eq!(t, after, "{before} -> {after} via {p}");
        }
        assert!(is_empty(&diff(&json!({"a": 1}), &json!({"a": 1}))));
        assert!(is_empty(&Value::Null));
    }
}
