//! Seeded mutations for the driver: bytes (flips, inserts, deletes, splices between
//! inputs, dictionary tokens) and JSON-aware ones (nest a value deeper, duplicate a
//! key, put U+0000 in a string or a key, replace a value with a long string or a huge
//! number, copy a value elsewhere).

use serde_json::{json, Map, Value};

/// splitmix64: small, seeded, good enough to choose mutations.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    pub fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
        &from[self.below(from.len())]
    }
}

/// Tokens worth inserting anywhere.
const DICTIONARY: &[&str] = &[
    "\\u0000",
    "\\u0000\"",
    "\"",
    "\\",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "{\"a\":",
    "null",
    "true",
    "-0",
    "1e308",
    "1e400",
    "18446744073709551616",
    "-9223372036854775809",
    "4294967296",
    "0.0000000000000000000001",
    "/a",
    "/-",
    "/01",
    "~0",
    "~1",
    "~2",
    "\"op\":\"remove\",",
    "\"previous\":null,",
    "\"value\":",
    "\"path\":\"/a\",",
    "\"changes\":[",
    "\"data\":",
    "\"id\":\"00000000-0000-0000-0000-000000000000\",",
    "\"type\":\"state_update\",",
    "00000000-0000-0000-0000-0000000000c1",
    "00000000-0000-0000-0000-000000006001",
    "\\ud800",
    "\\udfff",
    "\u{feff}",
    "😀",
    "\"character_id\":\"00000000-0000-0000-0000-0000000000c2\",",
    "\"to_version\":1",
    "\"alg\":\"none\"",
    "\"exp\":18446744073709551615",
    "\"typ\":\"session\"",
];

/// Applies one to four mutations. `other` is another input to splice from.
pub fn mutate(rng: &mut Rng, input: &[u8], other: &[u8], max_len: usize) -> Vec<u8> {
    let mut out = input.to_vec();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        out = match rng.below(12) {
            0..=3 => {
                json_mutation(rng, &out, other).unwrap_or_else(|| bytes_mutation(rng, &out, other))
            }
            _ => bytes_mutation(rng, &out, other),
        };
        out.truncate(max_len);
    }
    out
}

fn bytes_mutation(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    let len = v.len();
    match rng.below(9) {
        0 if len > 0 => {
            let i = rng.below(len);
            v[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            v[i] = *rng.pick(b"\0\xff\"\\{}[],:/~0-9 \x7f\xc3");
        }
        2 => {
            let i = rng.below(len + 1);
            let n = 1 + rng.below(8);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            v.splice(i..i, bytes);
        }
        3 if len > 0 => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(64));
            v.drain(i..i + n);
        }
        4 if len > 0 => {
            // Duplicate a range (repeats keys, elements, segments).
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(256));
            let piece = v[i..i + n].to_vec();
            let times = if rng.chance(8) { 1 + rng.below(200) } else { 1 };
            let at = rng.below(len + 1);
            v.splice(at..at, piece.repeat(times));
        }
        5 if !other.is_empty() => {
            // Splice: a piece of another input.
            let i = rng.below(other.len());
            let n = 1 + rng.below((other.len() - i).min(512));
            let at = rng.below(len + 1);
            let cut = if rng.chance(2) { (len - at).min(n) } else { 0 };
            v.splice(at..at + cut, other[i..i + n].iter().copied());
        }
        6 => {
            let at = rng.below(len + 1);
            let tok = rng.pick(DICTIONARY).as_bytes().to_vec();
            v.splice(at..at, tok);
        }
        7 => {
            // Deep nesting, textually.
            let at = rng.below(len + 1);
            let n = *rng.pick(&[8usize, 47, 49, 63, 65, 127, 129, 200]);
            let open = if rng.chance(2) { "[" } else { "{\"a\":" };
            v.splice(at..at, open.repeat(n).into_bytes());
        }
        _ => {
            // A long string or a long run of a byte.
            let at = rng.below(len + 1);
            let n = *rng.pick(&[100usize, 1025, 4097, 65_537]);
            let b = *rng.pick(b"a/\\~\"0");
            v.splice(at..at, std::iter::repeat_n(b, n));
        }
    }
    v
}

/// A JSON-aware mutation, when the input is JSON.
fn json_mutation(rng: &mut Rng, input: &[u8], other: &[u8]) -> Option<Vec<u8>> {
    let mut doc: Value = serde_json::from_slice(input).ok()?;
    let donor: Option<Value> = serde_json::from_slice(other).ok();
    let count = count_nodes(&doc);
    let target = rng.below(count.max(1));
    let mut seen = 0;
    let replacement = match rng.below(10) {
        0 => Mutation::Nest(*rng.pick(&[1usize, 2, 16, 46, 47, 48, 62, 63, 64, 130])),
        1 => Mutation::Replace(json!("\u{0}")),
        2 => Mutation::Replace(Value::String(
            "x".repeat(*rng.pick(&[1023usize, 1024, 65_536, 70_000])),
        )),
        3 => Mutation::Replace(json!(*rng.pick(&[u64::MAX, 1 << 53, 0, 1 << 32]))),
        4 => Mutation::Replace(json!(*rng.pick(&[i64::MIN, -1]))),
        5 => Mutation::Replace(
            rng.pick(&[json!(null), json!({}), json!([]), json!(1.5), json!("")])
                .clone(),
        ),
        6 => Mutation::NulKey,
        7 => Mutation::Widen(*rng.pick(&[2usize, 999, 1000, 1001])),
        _ => Mutation::Replace(match &donor {
            Some(d) => {
                let n = count_nodes(d);
                let mut i = rng.below(n.max(1));
                nth_node(d, &mut i).cloned().unwrap_or(Value::Null)
            }
            None => Value::Null,
        }),
    };
    apply_at(&mut doc, target, &mut seen, &replacement);
    let mut text = serde_json::to_string(&doc).ok()?;
    if rng.chance(4) {
        duplicate_key(rng, &mut text);
    }
    Some(text.into_bytes())
}

enum Mutation {
    Nest(usize),
    Replace(Value),
    NulKey,
    Widen(usize),
}

fn count_nodes(v: &Value) -> usize {
    let mut n = 0;
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        n += 1;
        match v {
            Value::Array(a) => stack.extend(a.iter()),
            Value::Object(m) => stack.extend(m.values()),
            _ => {}
        }
    }
    n
}

fn nth_node<'a>(v: &'a Value, i: &mut usize) -> Option<&'a Value> {
    if *i == 0 {
        return Some(v);
    }
    *i -= 1;
    match v {
        Value::Array(a) => a.iter().find_map(|c| nth_node(c, i)),
        Value::Object(m) => m.values().find_map(|c| nth_node(c, i)),
        _ => None,
    }
}

fn apply_at(v: &mut Value, target: usize, seen: &mut usize, m: &Mutation) -> bool {
    if *seen == target {
        match m {
            Mutation::Nest(n) => {
                let mut inner = v.take();
                for _ in 0..*n {
                    inner = json!([inner]);
                }
                *v = inner;
            }
            Mutation::Replace(r) => *v = r.clone(),
            Mutation::NulKey => match v {
                Value::Object(map) => {
                    map.insert("k\u{0}".into(), json!(1));
                }
                Value::String(s) => s.push('\u{0}'),
                _ => *v = json!({"\u{0}": v.take()}),
            },
            Mutation::Widen(n) => {
                let map: Map<String, Value> =
                    (0..*n).map(|i| (format!("w{i}"), json!(i))).collect();
                *v = Value::Object(map);
            }
        }
        return true;
    }
    *seen += 1;
    match v {
        Value::Array(a) => a.iter_mut().any(|c| apply_at(c, target, seen, m)),
        Value::Object(map) => map.values_mut().any(|c| apply_at(c, target, seen, m)),
        _ => false,
    }
}

/// Inserts `"key":…,` after a `{`, with a key already in the text: a duplicate key.
fn duplicate_key(rng: &mut Rng, text: &mut String) {
    let keys: Vec<&str> = text
        .split('"')
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[1].starts_with(':'))
        .map(|w| w[0])
        .collect();
    let opens: Vec<usize> = text.match_indices('{').map(|(i, _)| i).collect();
    if keys.is_empty() || opens.is_empty() {
        return;
    }
    let key = rng.pick(&keys).to_string();
    let at = *rng.pick(&opens) + 1;
    let value = rng.pick(&["1", "null", "\"x\"", "{}", "[]"]);
    text.insert_str(at, &format!("\"{key}\":{value},"));
}
