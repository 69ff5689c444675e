use super::*;
use std::collections::BTreeMap;

#[test]
fn the_table_is_well_formed() {
    let mut seen = std::collections::BTreeSet::new();
    for c in CODES {
        assert!(seen.insert(c.name), "{} appears twice", c.name);
        assert!(
            !c.name.is_empty() && c.name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{}",
            c.name
        );
        assert!((400..=599).contains(&c.http), "{}: {}", c.name, c.http);
        assert!(!c.about.is_empty(), "{}", c.name);
        // Only "try again elsewhere or later" answers are retried.
        assert!(!c.retryable || c.http == 503, "{}", c.name);
    }
}

#[test]
fn statuses_and_retryability_come_from_the_table() {
    assert!(WireError::new(codes::NOT_OWNER, "").is_retryable());
    assert!(WireError::new(codes::OVERLOADED, "").is_retryable());
    assert!(WireError::new(codes::SERVICE_UNAVAILABLE, "").is_retryable());
    assert!(!WireError::new(codes::DEADLINE_EXCEEDED, "").is_retryable());
    assert!(!WireError::new(codes::CONFLICT, "").is_retryable());
    assert_eq!(WireError::new(codes::CONFLICT, "").http_status(), 409);
    assert_eq!(WireError::new(codes::NOT_YOUR_TURN, "").http_status(), 422);
    assert_eq!(WireError::new(codes::WRONG_USER, "").http_status(), 403);
    assert_eq!(
        WireError::new(codes::METHOD_NOT_ALLOWED, "").http_status(),
        405
    );
    let full = WireError::new(codes::TOO_MANY_CONNECTIONS, "")
        .with_details(serde_json::json!({"scope": "router"}));
    assert_eq!(full.http_status(), 503);
    let user = WireError::new(codes::TOO_MANY_CONNECTIONS, "")
        .with_details(serde_json::json!({"scope": "user"}));
    assert_eq!(user.http_status(), 429);
    // A code outside the table (none is sent) is a client mistake, not retried.
    let odd = WireError::new("no_such_code", "");
    assert_eq!((odd.http_status(), odd.is_retryable()), (422, false));
}

#[test]
fn wire_format_is_unchanged() {
    let e = WireError::new(codes::CONFLICT, "guard");
    assert_eq!(
        serde_json::to_string(&e).unwrap(),
        r#"{"code":"conflict","message":"guard"}"#
    );
    let d = e.with_details(serde_json::json!({"path": "/a"}));
    let text = serde_json::to_string(&d).unwrap();
    assert_eq!(
        text,
        r#"{"code":"conflict","message":"guard","details":{"path":"/a"}}"#
    );
    assert_eq!(serde_json::from_str::<WireError>(&text).unwrap(), d);
    assert_eq!(d.to_string(), "conflict: guard");
}

/// One table of `docs/protocol.md`: each row's codes (the backticked names in its
/// first cell) with the HTTP statuses of its second cell (none for "–", or for a
/// table without an HTTP column).
fn doc_table(doc: &str, heading: &str) -> Vec<(Vec<String>, Vec<u16>)> {
    let start = doc
        .lines()
        .position(|l| l.trim() == heading)
        .unwrap_or_else(|| panic!("docs/protocol.md has no `{heading}`"));
    let with_http = doc
        .lines()
        .skip(start)
        .find(|l| l.starts_with('|'))
        .is_some_and(|h| h.contains("HTTP"));
    doc.lines()
        .skip(start + 1)
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2) // header and separator
        .map(|row| {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let codes = cells[1]
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect();
            let http = if with_http {
                cells[2]
                    .split(|c: char| !c.is_ascii_digit())
                    .filter_map(|n| n.parse().ok())
                    .collect()
            } else {
                vec![]
            };
            (codes, http)
        })
        .collect()
}

/// `docs/protocol.md`'s error tables against the code table: every documented code is
/// in the table with the documented HTTP status, and every code is documented.
#[test]
fn the_protocol_document_matches_the_table() {
    let doc = include_str!("../../docs/protocol.md");
    let main = doc_table(doc, "## Error codes");
    let game = doc_table(doc, "### Error codes");
    assert!(
        main.len() > 10 && game.len() > 10,
        "the tables were not found"
    );
    // Sent only as `connection_error` before a close: the document gives no status.
    let connection_only = [
        codes::IDLE_TIMEOUT,
        codes::SILENCE_TIMEOUT,
        codes::SLOW_CONSUMER,
    ];
    let mut documented: BTreeMap<String, u16> = BTreeMap::new();
    for (names, http) in &main {
        for name in names {
            let row = lookup(name)
                .unwrap_or_else(|| panic!("`{name}` is documented but not in the code table"));
            if http.is_empty() {
                assert!(
                    connection_only.contains(&name.as_str()),
                    "`{name}` has no HTTP status in the document"
                );
            } else {
                assert!(
                    http.contains(&row.http),
                    "`{name}`: the document says {http:?}, the table {}",
                    row.http
                );
            }
            documented.insert(name.clone(), row.http);
        }
    }
    for (names, _) in &game {
        for name in names {
            let row = lookup(name)
                .unwrap_or_else(|| panic!("`{name}` is documented but not in the code table"));
            // The game table says "HTTP 422 unless the main table says otherwise".
            if !documented.contains_key(name) {
                assert_eq!(row.http, 422, "`{name}`: a rule error is 422");
                documented.insert(name.clone(), row.http);
            }
        }
    }
    for c in CODES {
        assert!(
            documented.contains_key(c.name),
            "`{}` is in the code table but not documented in docs/protocol.md",
            c.name
        );
    }
}
