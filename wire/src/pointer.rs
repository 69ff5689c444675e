//! JSON Pointer (RFC 6901) reads and writes on the session's state document.
//!
//! `""` is the whole document, `/a/b` a member of a member, `~1` stands for `/` and
//! `~0` for `~` inside a token. Array elements are addressed by index (`/list/0`, no
//! leading zeros) and `-` names the position after the last element (append).
//!
//! Writes create missing intermediate *objects* (so `/characters/abc/hp` works on an
//! empty document) but never missing arrays or array slots: those are `invalid_path`.

use serde_json::{Map, Value};
use std::borrow::Cow;

/// Why a pointer could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathError {
    pub path: String,
    pub reason: String,
}

impl PathError {
    fn new(path: &str, reason: impl Into<String>) -> Self {
        Self {
            path: path.to_string(),
            reason: reason.into(),
        }
    }
}

/// Splits a pointer into unescaped tokens (borrowed from `path` unless a token has an
/// escape to undo: the usual token costs no allocation).
pub fn parse(path: &str) -> Result<Vec<Cow<'_, str>>, PathError> {
    if path.is_empty() {
        return Ok(vec![]);
    }
    if !path.starts_with('/') {
        return Err(PathError::new(
            path,
            "a JSON Pointer must be empty or start with '/'",
        ));
    }
    path[1..]
        .split('/')
        .map(|raw| {
            if !raw.contains('~') {
                return Ok(Cow::Borrowed(raw));
            }
            let mut out = String::with_capacity(raw.len());
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                if c == '~' {
                    match chars.next() {
                        Some('0') => out.push('~'),
                        Some('1') => out.push('/'),
                        _ => {
                            return Err(PathError::new(
                                path,
                                "'~' must be followed by '0' or '1' (RFC 6901)",
                            ))
                        }
                    }
                } else {
                    out.push(c);
                }
            }
            Ok(Cow::Owned(out))
        })
        .collect()
}

/// Index of an array token, or `None` for `-` (one past the end).
pub fn array_index(path: &str, token: &str) -> Result<Option<usize>, PathError> {
    if token == "-" {
        return Ok(None);
    }
    let valid = !token.is_empty()
        && token.bytes().all(|b| b.is_ascii_digit())
        && (token == "0" || !token.starts_with('0'));
    if !valid {
        return Err(PathError::new(
            path,
            format!("{token:?} is not an array index"),
        ));
    }
    token
        .parse::<usize>()
        .map(Some)
        .map_err(|_| PathError::new(path, format!("{token:?} is not an array index")))
}

/// The value at `path`, if any. A malformed pointer is an error; a well-formed pointer
/// to nothing is `Ok(None)`.
pub fn get<'a>(doc: &'a Value, path: &str) -> Result<Option<&'a Value>, PathError> {
    let mut cur = doc;
    for token in parse(path)? {
        cur = match cur {
            Value::Object(m) => match m.get(token.as_ref()) {
                Some(v) => v,
                None => return Ok(None),
            },
            Value::Array(a) => match array_index(path, &token)? {
                Some(i) if i < a.len() => &a[i],
                _ => return Ok(None),
            },
            _ => return Ok(None),
        };
    }
    Ok(Some(cur))
}

/// Sets `path` to `value`; returns the value it replaced (`None` if there was none).
pub fn set(doc: &mut Value, path: &str, value: Value) -> Result<Option<Value>, PathError> {
    let tokens = parse(path)?;
    let Some((last, parents)) = tokens.split_last() else {
        if !value.is_object() {
            return Err(PathError::new(
                path,
                "the document root must stay an object",
            ));
        }
        return Ok(Some(std::mem::replace(doc, value)));
    };
    let mut cur = doc;
    for token in parents {
        cur = match cur {
            Value::Object(m) => {
                // Looked up first: the key is copied only when the member is created.
                if !m.contains_key(token.as_ref()) {
                    m.insert(token.to_string(), Value::Object(Map::new()));
                }
                m.get_mut(token.as_ref()).expect("present or just inserted")
            }
            Value::Array(a) => match array_index(path, token)? {
                Some(i) if i < a.len() => &mut a[i],
                _ => return Err(PathError::new(path, format!("no array element {token:?}"))),
            },
            _ => {
                return Err(PathError::new(
                    path,
                    format!("cannot descend into a scalar at {token:?}"),
                ))
            }
        };
    }
    match cur {
        Value::Object(m) => match m.get_mut(last.as_ref()) {
            Some(slot) => Ok(Some(std::mem::replace(slot, value))),
            None => Ok(m.insert(last.to_string(), value)),
        },
        Value::Array(a) => match array_index(path, last)? {
            Some(i) if i < a.len() => Ok(Some(std::mem::replace(&mut a[i], value))),
            Some(i) if i == a.len() => {
                a.push(value);
                Ok(None)
            }
            None => {
                a.push(value);
                Ok(None)
            }
            Some(i) => Err(PathError::new(
                path,
                format!("index {i} is past the end of an array of {}", a.len()),
            )),
        },
        _ => Err(PathError::new(path, "the parent is not an object or array")),
    }
}

/// Whether [`set`] of `value` at `path` would succeed, without changing anything.
pub fn check_set(doc: &Value, path: &str, value: &Value) -> Result<(), PathError> {
    let tokens = parse(path)?;
    let Some((last, parents)) = tokens.split_last() else {
        if !value.is_object() {
            return Err(PathError::new(
                path,
                "the document root must stay an object",
            ));
        }
        return Ok(());
    };
    let mut cur = doc;
    for token in parents {
        cur = match cur {
            Value::Object(m) => match m.get(token.as_ref()) {
                Some(v) => v,
                // The rest of the path would be created as objects.
                None => return Ok(()),
            },
            Value::Array(a) => match array_index(path, token)? {
                Some(i) if i < a.len() => &a[i],
                _ => return Err(PathError::new(path, format!("no array element {token:?}"))),
            },
            _ => {
                return Err(PathError::new(
                    path,
                    format!("cannot descend into a scalar at {token:?}"),
                ))
            }
        };
    }
    match cur {
        Value::Object(_) => Ok(()),
        Value::Array(a) => match array_index(path, last)? {
            Some(i) if i > a.len() => Err(PathError::new(
                path,
                format!("index {i} is past the end of an array of {}", a.len()),
            )),
            _ => Ok(()),
        },
        _ => Err(PathError::new(path, "the parent is not an object or array")),
    }
}

/// Removes the value at `path` and returns it; it must exist.
pub fn remove(doc: &mut Value, path: &str) -> Result<Value, PathError> {
    let tokens = parse(path)?;
    let Some((last, parents)) = tokens.split_last() else {
        return Err(PathError::new(path, "the document root cannot be removed"));
    };
    let mut cur = doc;
    for token in parents {
        cur = match cur {
            Value::Object(m) => m
                .get_mut(token.as_ref())
                .ok_or_else(|| PathError::new(path, format!("no member {token:?}")))?,
            Value::Array(a) => match array_index(path, token)? {
                Some(i) if i < a.len() => &mut a[i],
                _ => return Err(PathError::new(path, format!("no array element {token:?}"))),
            },
            _ => return Err(PathError::new(path, "cannot descend into a scalar")),
        };
    }
    match cur {
        Value::Object(m) => m
            .remove(last.as_ref())
            .ok_or_else(|| PathError::new(path, format!("no member {last:?}"))),
        Value::Array(a) => match array_index(path, last)? {
            Some(i) if i < a.len() => Ok(a.remove(i)),
            _ => Err(PathError::new(path, format!("no array element {last:?}"))),
        },
        _ => Err(PathError::new(path, "the parent is not an object or array")),
    }
}

/// Escapes one token for use in a pointer.
pub fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rfc6901_examples() {
        // The examples of RFC 6901 section 5.
        let doc = json!({
            "foo": ["bar", "baz"], "": 0, "a/b": 1, "c%d": 2, "e^f": 3,
            "g|h": 4, "i\\j": 5, "k\"l": 6, " ": 7, "m~n": 8
        });
        let cases = [
            ("", doc.clone()),
            ("/foo", json!(["bar", "baz"])),
            ("/foo/0", json!("bar")),
            ("/", json!(0)),
            ("/a~1b", json!(1)),
            ("/c%d", json!(2)),
            ("/e^f", json!(3)),
            ("/g|h", json!(4)),
            ("/i\\j", json!(5)),
            ("/k\"l", json!(6)),
            ("/ ", json!(7)),
            ("/m~0n", json!(8)),
        ];
        for (p, want) in cases {
            assert_eq!(get(&doc, p).unwrap(), Some(&want), "{p}");
        }
    }

    #[test]
    fn tokens_are_borrowed_unless_unescaped() {
        let tokens = parse("/c1/k7/m~0n/a~1b").unwrap();
        assert_eq!(tokens, ["c1", "k7", "m~n", "a/b"]);
        assert!(matches!(tokens[0], Cow::Borrowed("c1")));
        assert!(matches!(tokens[1], Cow::Borrowed("k7")));
        assert!(matches!(tokens[2], Cow::Owned(_)));
        assert!(matches!(tokens[3], Cow::Owned(_)));
    }

    #[test]
    fn set_replaces_in_place_and_reports_the_old_value() {
        let mut doc = json!({"a": {"b": 1, "c": 2}});
        assert_eq!(set(&mut doc, "/a/b", json!(3)).unwrap(), Some(json!(1)));
        assert_eq!(set(&mut doc, "/a/d", json!(4)).unwrap(), None);
        assert_eq!(doc, json!({"a": {"b": 3, "c": 2, "d": 4}}));
    }

    #[test]
    fn malformed_pointers() {
        for p in ["a", "/a~2", "/a~"] {
            assert!(parse(p).is_err(), "{p}");
        }
        let doc = json!({"list": [1, 2]});
        for p in ["/list/01", "/list/x", "/list/-1"] {
            assert!(get(&doc, p).is_err(), "{p}");
        }
        assert_eq!(get(&doc, "/list/5").unwrap(), None);
        assert_eq!(get(&doc, "/missing/deeper").unwrap(), None);
    }

    #[test]
    fn set_creates_objects_and_appends() {
        let mut doc = json!({});
        assert_eq!(
            set(&mut doc, "/characters/abc/hp", json!(12)).unwrap(),
            None
        );
        assert_eq!(doc, json!({"characters": {"abc": {"hp": 12}}}));
        assert_eq!(
            set(&mut doc, "/characters/abc/hp", json!(9)).unwrap(),
            Some(json!(12))
        );
        set(&mut doc, "/log", json!([])).unwrap();
        set(&mut doc, "/log/-", json!("a")).unwrap();
        set(&mut doc, "/log/1", json!("b")).unwrap();
        assert_eq!(doc["log"], json!(["a", "b"]));
        assert!(set(&mut doc, "/log/5", json!("x")).is_err());
        assert!(set(&mut doc, "/log/0/deeper", json!(1)).is_err());
        assert!(set(&mut doc, "", json!(5)).is_err());
        assert_eq!(
            set(&mut doc, "", json!({"fresh": true})).unwrap().unwrap()["log"],
            json!(["a", "b"])
        );
    }

    #[test]
    fn check_set_agrees_with_set() {
        let doc = json!({"a": {"b": 1}, "l": [1, 2], "s": "x"});
        for p in [
            "", "/a/b", "/a/c/d", "/l/0", "/l/2", "/l/-", "/l/3", "/l/x", "/s/t", "/l/0/x", "bad",
        ] {
            for v in [json!(1), json!({})] {
                let mut copy = doc.clone();
                assert_eq!(
                    check_set(&doc, p, &v).is_ok(),
                    set(&mut copy, p, v.clone()).is_ok(),
                    "{p} {v}"
                );
            }
        }
    }

    #[test]
    fn remove_needs_an_existing_value() {
        let mut doc = json!({"a": {"b": 1}, "l": [1, 2, 3]});
        assert_eq!(remove(&mut doc, "/a/b").unwrap(), json!(1));
        assert!(remove(&mut doc, "/a/b").is_err());
        assert_eq!(remove(&mut doc, "/l/1").unwrap(), json!(2));
        assert_eq!(doc["l"], json!([1, 3]));
        assert!(remove(&mut doc, "").is_err());
    }

    #[test]
    fn escape_round_trips() {
        let t = "a/b~c";
        let p = format!("/{}", escape(t));
        assert_eq!(parse(&p).unwrap(), vec![t.to_string()]);
    }
}
