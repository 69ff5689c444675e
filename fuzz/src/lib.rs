//! Fuzz targets of the Game Session Service.
//!
//! Each target is a plain function taking arbitrary bytes. It must not panic on any
//! input: a panic (or an abort such as a stack overflow) is a bug found, either in the
//! service code it drives or in an invariant it checks. The targets:
//!
//! * [`client_message`]: the router's decoder of a WebSocket text frame
//!   (`protocol::parse_client_message` with the default limits), the router → node
//!   request it becomes (`rpc::NodeRequest` through JSON), and the node's command
//!   decoder (`Command::from_client_json`).
//! * [`pointer`]: JSON Pointer reads and writes on a document
//!   (`gs_rules::pointer::{get, set, check_set, remove}`) with the size bookkeeping of
//!   `gs_rules::limits`: `check_set` agrees with `set`, `size_delta` is exact.
//! * [`decide`]: a table (DM, players, observer, outsiders, characters, maybe combat)
//!   receives a sequence of arbitrary commands; each is decided by the rules; a refused
//!   one changes nothing, an accepted one's events are applied; the events replay to
//!   the same state, and the document stays within its `DocLimits`.
//! * [`token`]: `auth::Authority` verification of arbitrary strings as access and
//!   session tokens (refusals are errors with a code, never panics).
//!
//! Every target also returns a [`Trace`]: a few hashed features of what the input
//! did (which error code, which event kinds). The mutation driver (`src/bin/fuzz.rs`)
//! keeps inputs that show a new feature; the cargo-fuzz driver ignores it (libFuzzer
//! has its own coverage).
//!
//! Inputs are bytes, but each target also reads a readable form, so that the
//! committed corpus (`fuzz/corpus/<target>/`) can be written by hand: see each
//! target's documentation.

pub mod gen;
pub mod mutate;
pub mod table;

use arbitrary::Unstructured;
use gs_rules::limits::{self, DocLimits};
use gs_rules::{pointer, Command};
use gs_shared::auth::{Authority, Role};
use gs_shared::config::{DocumentConfig, RouterConfig};
use gs_shared::protocol::{self, codes};
use gs_shared::rpc::{Caller, NodeRequest, RequestBody};
use serde_json::Value;
use std::hash::{DefaultHasher, Hash, Hasher};
use uuid::Uuid;

/// What an input did, as hashed features (a coverage signal for the mutation driver).
#[derive(Debug, Default, Clone)]
pub struct Trace {
    pub features: Vec<u64>,
}

impl Trace {
    /// Records a feature.
    pub fn hit(&mut self, feature: impl Hash) {
        let mut h = DefaultHasher::new();
        feature.hash(&mut h);
        self.features.push(h.finish());
    }
}

/// A target: bytes in, a trace out; panics only on a bug.
pub type Target = fn(&[u8]) -> Trace;

/// Every target by name (the names of `fuzz/corpus/<name>/`).
pub const TARGETS: &[(&str, Target)] = &[
    ("client_message", client_message),
    ("pointer", pointer),
    ("decide", decide),
    ("token", token),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// Wire error codes a client may be sent for a refused message.
const ENVELOPE_CODES: &[&str] = &[
    codes::MALFORMED_JSON,
    codes::INVALID_MESSAGE,
    codes::MESSAGE_TOO_LARGE,
    codes::LIMIT_EXCEEDED,
    codes::UNSUPPORTED_CHARACTER,
];

// ---------------------------------------------------------------------------------
// client_message

/// The router's decoder, then the node's. The input is the text of one WebSocket
/// frame (bytes that are not UTF-8 are replaced, as a WebSocket library would refuse
/// them before the router sees them).
pub fn client_message(data: &[u8]) -> Trace {
    let mut t = Trace::default();
    let text = String::from_utf8_lossy(data);
    let router = RouterConfig::default();
    let doc = DocumentConfig::default();
    let m =
        match protocol::parse_client_message(&text, router.max_message_bytes, doc.max_json_depth) {
            Ok(m) => m,
            Err(r) => {
                assert!(
                    ENVELOPE_CODES.contains(&r.error.code.as_str()),
                    "unexpected envelope code {}",
                    r.error
                );
                // The error frame the client gets is JSON.
                let frame = protocol::error(r.id, &r.error);
                let back: Value = serde_json::from_str(&frame).expect("an error frame is JSON");
                assert_eq!(back["error"]["code"], r.error.code.as_str());
                t.hit(("rejected", r.error.code, r.id.is_some()));
                return t;
            }
        };
    assert!(text.len() <= router.max_message_bytes);
    assert!(!m.kind.is_empty() && m.kind.len() <= protocol::MAX_TYPE_LEN);
    let data = m.data.get();
    assert!(data.starts_with('{'), "accepted data is an object: {data}");
    protocol::check_json_text(data, doc.max_json_depth - 1)
        .expect("accepted data passes the edge checks");
    // The envelope parser checks JSON syntax, not what only decoding finds (a float
    // out of range such as `1e400`, a lone surrogate `\ud800`): such data is passed on
    // and must be refused by the node's decoder.
    let decodable = match serde_json::from_str::<Value>(data) {
        Ok(parsed) => {
            assert!(parsed.is_object());
            true
        }
        Err(e) => {
            t.hit(("undecodable", e.classify() as u8));
            false
        }
    };
    if m.kind == protocol::TYPE_HEARTBEAT || m.kind == protocol::TYPE_SYNC_REQUEST {
        t.hit(("router", m.kind));
        return t;
    }
    // The router forwards it to the owner as a NATS request, which the node decodes.
    let req = NodeRequest {
        session_id: Uuid::nil(),
        caller: Caller {
            user_id: Uuid::from_u128(1),
            role: Role::Player,
        },
        body: RequestBody::Command {
            command_id: m.id,
            kind: m.kind.clone(),
            data: m.data.clone(),
            ack_by_event: true,
        },
        deadline_ms: Some(u64::MAX),
    };
    let wire = serde_json::to_vec(&req).expect("a request serialises");
    let back: NodeRequest =
        serde_json::from_slice(&wire).expect("the node reads what the router sends");
    let RequestBody::Command { kind, data, .. } = back.body else {
        panic!("the body changed kind in transit");
    };
    assert_eq!(data.get(), m.data.get(), "the payload changed in transit");
    match Command::from_client_json(&kind, data.get()) {
        Ok(cmd) => {
            assert_eq!(cmd.kind(), kind, "decoded as another type");
            // What the command carries into events is valid JSON even when the data
            // was not (an unknown field holding `\ud800` is skipped, not decoded).
            let text = serde_json::to_string(&cmd).expect("a command serialises");
            serde_json::from_str::<Value>(&text).expect("a decoded command is JSON");
            t.hit(("command", kind, decodable));
        }
        Err(e) => {
            assert!(
                e.code == codes::UNKNOWN_TYPE || e.code == codes::INVALID_PAYLOAD,
                "unexpected decoder code {e}"
            );
            t.hit(("refused", kind, e.code));
        }
    }
    t
}

// ---------------------------------------------------------------------------------
// pointer

/// One operation of the [`pointer`] target.
#[derive(Debug, Clone)]
pub enum PointerOp {
    Get(String),
    Set(String, Value),
    Check(String, Value),
    Remove(String),
}

/// A document and operations: from the readable form
/// `{"doc": {…}, "ops": [["set", "/a/b", 1], ["remove", "/a"], ["get", "/x"],
/// ["check", "/y", []]]}`, or generated from the bytes.
pub fn pointer_input(data: &[u8]) -> (Value, Vec<PointerOp>) {
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        if let (Some(doc), Some(ops)) = (v.get("doc"), v.get("ops").and_then(Value::as_array)) {
            let ops = ops
                .iter()
                .filter_map(|op| {
                    let op = op.as_array()?;
                    let path = op.get(1)?.as_str()?.to_string();
                    let value = op.get(2).cloned().unwrap_or(Value::Null);
                    Some(match op.first()?.as_str()? {
                        "get" => PointerOp::Get(path),
                        "set" => PointerOp::Set(path, value),
                        "check" => PointerOp::Check(path, value),
                        "remove" => PointerOp::Remove(path),
                        _ => return None,
                    })
                })
                .collect();
            return (doc.clone(), ops);
        }
    }
    let mut u = Unstructured::new(data);
    let doc = gen::value(&mut u, 6);
    let mut ops = vec![];
    while !u.is_empty() && ops.len() < 64 {
        let path = gen::path(&mut u);
        let op = match u.int_in_range(0..=3u8).unwrap_or(0) {
            0 => PointerOp::Get(path),
            1 => PointerOp::Set(path, gen::value(&mut u, 4)),
            2 => PointerOp::Check(path, gen::value(&mut u, 4)),
            _ => PointerOp::Remove(path),
        };
        ops.push(op);
    }
    (doc, ops)
}

/// JSON Pointer operations on a document, with the invariants the rules rely on:
/// `check_set` agrees with `set`; a failed `set`/`remove` changes nothing; after a
/// successful `set` the value is at its path; `size_delta` agrees with `remove` and is
/// exactly the change of `json_len` for every successful `set` and `remove`.
///
/// Writes pass the document's bounds first (`DocLimits::check_path`/`check_value`,
/// with the defaults), as `decide` does before it calls the pointer code: an
/// unbounded path would build a document too deep for any recursive serialiser (the
/// 30,000-segment path of issue 10). Reads take any path.
pub fn pointer(data: &[u8]) -> Trace {
    let mut t = Trace::default();
    let (mut doc, ops) = pointer_input(data);
    let lim = DocLimits::default();
    if lim.check_shape(0, &doc).is_err() {
        // No document of a session can be this deep or wide.
        t.hit("doc_out_of_bounds");
        return t;
    }
    for op in ops {
        match op {
            PointerOp::Get(path) => {
                let r = pointer::get(&doc, &path);
                if pointer::parse(&path).is_err() {
                    assert!(r.is_err(), "get of a malformed pointer {path:?} succeeded");
                }
                t.hit(("get", r.is_ok(), matches!(r, Ok(Some(_)))));
            }
            PointerOp::Check(path, value) => {
                let predicted = pointer::check_set(&doc, &path, &value).is_ok();
                let mut copy = doc.clone();
                let done = bounded_write(&lim, &path, &value)
                    .then(|| pointer::set(&mut copy, &path, value.clone()).is_ok());
                if let Some(done) = done {
                    assert_eq!(predicted, done, "check_set disagrees with set at {path:?}");
                }
                t.hit(("check", predicted));
            }
            PointerOp::Set(path, value) => {
                let predicted = pointer::check_set(&doc, &path, &value);
                if !bounded_write(&lim, &path, &value) {
                    t.hit(("set_out_of_bounds", predicted.is_ok()));
                    continue;
                }
                let delta = limits::size_delta(&doc, &path, Some(&value));
                let before_len = limits::json_len(&doc);
                let before = doc.clone();
                let r = pointer::set(&mut doc, &path, value.clone());
                assert_eq!(
                    predicted.is_ok(),
                    r.is_ok(),
                    "check_set ({predicted:?}) disagrees with set ({r:?}) at {path:?}"
                );
                match r {
                    Ok(_) => {
                        let (d, _) = delta.unwrap_or_else(|e| {
                            panic!("size_delta refused a set that worked at {path:?}: {e:?}")
                        });
                        assert_eq!(
                            before_len as isize + d,
                            limits::json_len(&doc) as isize,
                            "size_delta of set {path:?} is wrong"
                        );
                        if !path.ends_with("/-") {
                            assert_eq!(
                                pointer::get(&doc, &path).expect("a path that was set parses"),
                                Some(&value),
                                "the value set is not at {path:?}"
                            );
                        }
                        t.hit(("set", true));
                    }
                    Err(_) => {
                        assert_eq!(doc, before, "a failed set changed the document");
                        t.hit(("set", false));
                    }
                }
            }
            PointerOp::Remove(path) => {
                let delta = limits::size_delta(&doc, &path, None);
                let before_len = limits::json_len(&doc);
                let before = doc.clone();
                let r = pointer::remove(&mut doc, &path);
                assert_eq!(
                    delta.is_ok(),
                    r.is_ok(),
                    "size_delta ({delta:?}) disagrees with remove ({r:?}) at {path:?}"
                );
                match r {
                    Ok(old) => {
                        let (d, _) = delta.expect("checked above");
                        assert_eq!(
                            before_len as isize + d,
                            limits::json_len(&doc) as isize,
                            "size_delta of remove {path:?} is wrong"
                        );
                        assert_eq!(
                            pointer::get(&before, &path).expect("it parsed"),
                            Some(&old),
                            "remove returned another value"
                        );
                        t.hit(("remove", true));
                    }
                    Err(_) => {
                        assert_eq!(doc, before, "a failed remove changed the document");
                        t.hit(("remove", false));
                    }
                }
            }
        }
    }
    t.hit(("depth", limits::depth(&doc).min(64)));
    t
}

/// Whether a write passes the bounds `decide` checks before writing.
fn bounded_write(lim: &DocLimits, path: &str, value: &Value) -> bool {
    match lim.check_path(path) {
        Ok(tokens) => lim.check_value(tokens, value).is_ok(),
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------------
// decide

/// The rules against arbitrary commands: see [`table::Table`] for the input forms and
/// the invariants.
pub fn decide(data: &[u8]) -> Trace {
    let mut t = Trace::default();
    let script = table::Script::from_bytes(data);
    let mut table = table::Table::new(&script.setup, &mut t);
    for (who, kind, payload) in &script.commands {
        table.step(*who, kind, payload, &mut t);
    }
    table.check_end(&mut t);
    t
}

// ---------------------------------------------------------------------------------
// token

/// The secret of the [`token`] target's authorities (the readable form signs with it).
pub const TOKEN_SECRET: &str = "fuzz-secret-0123456789abcdef";
/// `iss` and `aud` the strict authority of the [`token`] target requires.
pub const TOKEN_ISSUER: &str = "gs-fuzz-iss";
pub const TOKEN_AUDIENCE: &str = "gs-fuzz-aud";

/// The test key material committed for the auth tests.
fn fixture(name: &str) -> String {
    format!(
        "{}/../tests/fixtures/auth/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// A plain HS256 authority and a strict one (issuer, audience, RS256/ES256 public keys
/// from PEM files and a JWKS file), built once.
fn authorities() -> &'static (Authority, Authority) {
    static A: std::sync::OnceLock<(Authority, Authority)> = std::sync::OnceLock::new();
    A.get_or_init(|| {
        let plain = Authority::new(TOKEN_SECRET, 3600, 5);
        let cfg = gs_shared::config::AuthConfig {
            jwt_secret: TOKEN_SECRET.into(),
            issuer: TOKEN_ISSUER.into(),
            audience: TOKEN_AUDIENCE.into(),
            public_keys_pem: vec![fixture("rsa-1.pub.pem"), fixture("ec-1.pub.pem")],
            jwks_file: fixture("jwks-1.json"),
            keys_check_ms: 3_600_000,
            ..Default::default()
        };
        let strict = Authority::load(&cfg).expect("the fixtures' keys load");
        (plain, strict)
    })
}

/// Verifies the input as an access token and as a session token, with a plain HS256
/// authority and with a strict one (issuer, audience, public keys). Readable forms:
/// `sign:`, `rsa:` or `ec:` followed by a JWT header (JSON), a newline and claims
/// (JSON): the target signs them (HS256 with [`TOKEN_SECRET`], RS256 with the
/// fixtures' `rsa-1` key, ES256 with `ec-1`; the header's `alg` and `kid` are kept
/// when the key can sign them), so that inputs reach the claims' validation and the
/// key selection. Anything else is the token text itself.
pub fn token(data: &[u8]) -> Trace {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let mut t = Trace::default();
    let (plain, strict) = authorities();
    let text = String::from_utf8_lossy(data);
    let signed = [
        ("sign:", Algorithm::HS256),
        ("rsa:", Algorithm::RS256),
        ("ec:", Algorithm::ES256),
    ]
    .into_iter()
    .find_map(|(prefix, alg)| text.strip_prefix(prefix).map(|rest| (rest, alg)));
    let tok = match signed {
        Some((rest, alg)) => {
            let (h, c) = rest.split_once('\n').unwrap_or((rest, "{}"));
            let claims: Value = serde_json::from_str(c).unwrap_or(Value::Null);
            let mut header: Header = serde_json::from_str(h).unwrap_or_else(|_| Header::new(alg));
            let key = match alg {
                Algorithm::RS256 => {
                    let pem = std::fs::read(fixture("rsa-1.key.pem")).expect("fixture");
                    EncodingKey::from_rsa_pem(&pem).expect("an RSA key")
                }
                Algorithm::ES256 => {
                    let pem = std::fs::read(fixture("ec-1.key.pem")).expect("fixture");
                    EncodingKey::from_ec_pem(&pem).expect("an EC key")
                }
                _ => EncodingKey::from_secret(TOKEN_SECRET.as_bytes()),
            };
            if header.alg == Algorithm::HS256 && alg != Algorithm::HS256 {
                header.alg = alg;
            }
            match encode(&header, &claims, &key) {
                Ok(s) => s,
                Err(_) => {
                    t.hit("unsignable");
                    return t;
                }
            }
        }
        None => text.into_owned(),
    };
    let (user, session) = (Uuid::from_u128(0xA1), Uuid::from_u128(0x5E55));
    for (name, a) in [("plain", plain), ("strict", strict)] {
        match a.verify_access(Some(&tok)) {
            Ok(c) => {
                assert_ne!(
                    c.typ.as_deref(),
                    Some("session"),
                    "a session token passed as an access token"
                );
                let now = gs_shared::auth::now_secs();
                assert!(
                    c.exp.saturating_add(a.leeway_secs()) >= now,
                    "an expired token passed"
                );
                if let Some(nbf) = c.nbf {
                    assert!(
                        nbf <= now.saturating_add(a.leeway_secs()),
                        "a token not yet valid passed"
                    );
                }
                if name == "strict" {
                    assert_eq!(
                        c.iss.as_deref(),
                        Some(TOKEN_ISSUER),
                        "a token of another issuer passed"
                    );
                    let aud_ok = match &c.aud {
                        Some(Value::String(s)) => s == TOKEN_AUDIENCE,
                        Some(Value::Array(v)) => v.iter().any(|x| x == TOKEN_AUDIENCE),
                        _ => false,
                    };
                    assert!(aud_ok, "a token for another audience passed: {:?}", c.aud);
                }
                t.hit(("access_ok", name, c.role.as_str()));
            }
            Err(e) => t.hit(("access", name, e.code())),
        }
        match a.verify_session(Some(&tok), user, session) {
            Ok(c) => {
                assert_eq!((c.sub, c.sid, c.typ.as_str()), (user, session, "session"));
                t.hit(("session_ok", name));
            }
            Err(e) => t.hit(("session", name, e.code())),
        }
    }
    t
}
