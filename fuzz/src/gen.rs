//! JSON values and pointers generated from bytes, weighted towards what breaks
//! parsers and bounds: deep nesting, wide objects, long strings, U+0000 and other odd
//! characters, numbers at the edges of every integer type, escapes in pointers.

use arbitrary::Unstructured;
use serde_json::{json, Map, Value};

/// Keys and pointer tokens: short, colliding, escaped, numeric, odd.
const KEYS: &[&str] = &[
    "a",
    "b",
    "c",
    "0",
    "1",
    "2",
    "-",
    "01",
    "",
    "~",
    "~0",
    "~1",
    "/",
    "a/b",
    "hp",
    "x",
    "characters",
    "\u{0}",
    "é",
    "😀",
    " ",
    "\"",
    "\\",
    "10",
    "999999999999999999999",
];

/// Strings: empty, long, with characters PostgreSQL or parsers dislike.
const STRINGS: &[&str] = &[
    "",
    "x",
    "\u{0}",
    "a\u{0}b",
    "\u{1}",
    "\u{ffff}",
    "\u{10ffff}",
    "\u{feff}",
    "😀",
    "\\u0000",
    "~1",
    "/",
    "1d8+3",
    "null",
    "\r\n\t",
];

/// Numbers at the edges.
fn number(u: &mut Unstructured) -> Value {
    match u.int_in_range(0..=11u8).unwrap_or(0) {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(i64::MIN),
        3 => json!(i64::MAX),
        4 => json!(u64::MAX),
        5 => json!(u32::MAX),
        6 => json!(i32::MIN),
        7 => json!(1e308),
        8 => json!(-0.0),
        9 => json!(0.5),
        10 => json!(u.arbitrary::<i16>().unwrap_or(0)),
        _ => json!(u.arbitrary::<i64>().unwrap_or(0)),
    }
}

/// A string: from the list, arbitrary text, or long.
pub fn string(u: &mut Unstructured) -> String {
    match u.int_in_range(0..=5u8).unwrap_or(0) {
        0 | 1 => (*u.choose(STRINGS).unwrap_or(&"")).to_string(),
        2 | 3 => u.arbitrary::<String>().unwrap_or_default(),
        4 => {
            let n = u.int_in_range(0..=300usize).unwrap_or(0);
            "s".repeat(n)
        }
        _ => {
            // Past the default value limit (64 KiB) now and then.
            let n = u.int_in_range(1_000..=70_000usize).unwrap_or(1_000);
            "L".repeat(n)
        }
    }
}

/// A key: from the list or arbitrary.
pub fn key(u: &mut Unstructured) -> String {
    if u.ratio(3, 4).unwrap_or(true) {
        (*u.choose(KEYS).unwrap_or(&"a")).to_string()
    } else {
        u.arbitrary::<String>().unwrap_or_default()
    }
}

/// Any JSON value, `budget` levels deep at most except for the deliberate deep
/// chains (up to 140 levels: past every nesting bound of the service).
pub fn value(u: &mut Unstructured, budget: usize) -> Value {
    let top = if budget == 0 { 3 } else { 9 };
    match u.int_in_range(0..=top).unwrap_or(0) {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary().unwrap_or(false)),
        2 => number(u),
        3 => Value::String(string(u)),
        4 | 5 => {
            let n = u.int_in_range(0..=4usize).unwrap_or(0);
            Value::Array((0..n).map(|_| value(u, budget - 1)).collect())
        }
        6 | 7 => {
            let n = u.int_in_range(0..=4usize).unwrap_or(0);
            let mut m = Map::new();
            for _ in 0..n {
                m.insert(key(u), value(u, budget - 1));
            }
            Value::Object(m)
        }
        8 => deep(u),
        _ => wide(u),
    }
}

/// A chain of nested arrays and objects, 1 to 140 levels.
pub fn deep(u: &mut Unstructured) -> Value {
    let n = match u.int_in_range(0..=3u8).unwrap_or(0) {
        0 => u.int_in_range(1..=20usize).unwrap_or(1),
        1 => u.int_in_range(40..=50usize).unwrap_or(40),
        2 => u.int_in_range(60..=70usize).unwrap_or(60),
        _ => u.int_in_range(120..=140usize).unwrap_or(120),
    };
    let object = u.arbitrary::<bool>().unwrap_or(true);
    let mut v = Value::Null;
    for _ in 0..n {
        v = if object {
            json!({ "a": v })
        } else {
            json!([v])
        };
    }
    v
}

/// An object or array with many small members (around the 1,000-key bound).
pub fn wide(u: &mut Unstructured) -> Value {
    let n = match u.int_in_range(0..=2u8).unwrap_or(0) {
        0 => u.int_in_range(5..=50usize).unwrap_or(5),
        1 => u.int_in_range(990..=1010usize).unwrap_or(1000),
        _ => u.int_in_range(1..=3000usize).unwrap_or(1),
    };
    if u.arbitrary::<bool>().unwrap_or(true) {
        Value::Object((0..n).map(|i| (format!("k{i}"), json!(i))).collect())
    } else {
        Value::Array((0..n).map(|i| json!(i)).collect())
    }
}

/// A JSON Pointer: usually well-formed tokens, sometimes malformed, very deep or long.
pub fn path(u: &mut Unstructured) -> String {
    match u.int_in_range(0..=9u8).unwrap_or(0) {
        0 => String::new(),
        1 => u.arbitrary::<String>().unwrap_or_default(),
        2 => {
            // Deep: the 130 and 30,000 segments, and around the bounds.
            let n = *u
                .choose(&[31usize, 32, 33, 48, 130, 511, 513, 30_000])
                .unwrap_or(&33);
            "/a".repeat(n)
        }
        3 => format!(
            "/{}",
            "p".repeat(u.int_in_range(1000..=1100usize).unwrap_or(1000))
        ),
        _ => {
            let n = u.int_in_range(1..=5usize).unwrap_or(1);
            let mut p = String::new();
            for _ in 0..n {
                p.push('/');
                p.push_str(&key(u));
            }
            p
        }
    }
}
