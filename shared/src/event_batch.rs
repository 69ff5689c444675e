//! How a session's owner hands its committed events to the routers: the messages on
//! `gs.session.S.events`.
//!
//! One commit of a session usually holds several events (a group commit gathers every
//! command that arrived while the previous one was being written; ~3.4 events per
//! session and commit at the SRD's load). They travel as **one** NATS message, so NATS
//! and every router handle each commit once instead of once per event:
//!
//! * one event: the payload is the event's JSON; headers `Gs-Version: v` and, when it
//!   carries a command's ack, `Gs-Ack: <command id>`;
//! * `n > 1` events with consecutive versions `v ..= v+n-1`: the payload is their JSON
//!   texts joined by `\n` (a rendered event never contains a raw newline: JSON escapes
//!   it inside strings); headers `Gs-Version: v`, `Gs-Count: n` and, when some carry
//!   acks, `Gs-Acks: i:<command id>,j:<command id>` (`i`: the event's offset in the
//!   message).
//!
//! Events that cannot share a message (a gap in the versions, a newline, a message
//! that would exceed [`MAX_BATCH_BYTES`]) go in separate ones. Pure code: the node
//! encodes with [`messages`], the router decodes with [`decode`].

use crate::protocol::{ACK_HEADER, VERSION_HEADER};
use crate::rpc::RawEvent;
use bytes::{Buf, Bytes, BytesMut};
use uuid::Uuid;

/// Header of a message carrying several events: how many.
pub const COUNT_HEADER: &str = "Gs-Count";
/// Header of a message carrying several events: the acks, `offset:command,…`.
pub const ACKS_HEADER: &str = "Gs-Acks";

/// A message's payload stays under this (NATS refuses payloads over its
/// `max_payload`, 1 MiB by default); a larger event goes alone.
pub const MAX_BATCH_BYTES: usize = 256 * 1024;

/// One message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsMessage {
    /// The version of its first event.
    pub first: u64,
    /// How many events (consecutive versions from `first`).
    pub count: usize,
    /// (offset in the message, command id) of the events that carry an ack.
    pub acks: Vec<(usize, Uuid)>,
    pub payload: Bytes,
}

impl EventsMessage {
    /// The NATS headers of the message.
    pub fn headers(&self) -> async_nats::HeaderMap {
        let mut h = async_nats::HeaderMap::new();
        h.insert(VERSION_HEADER, self.first.to_string().as_str());
        if self.count == 1 {
            if let Some((_, id)) = self.acks.first() {
                h.insert(ACK_HEADER, id.to_string().as_str());
            }
            return h;
        }
        h.insert(COUNT_HEADER, self.count.to_string().as_str());
        if !self.acks.is_empty() {
            let acks: Vec<String> = self
                .acks
                .iter()
                .map(|(i, id)| format!("{i}:{id}"))
                .collect();
            h.insert(ACKS_HEADER, acks.join(",").as_str());
        }
        h
    }
}

/// The messages for `events` (in version order; `acks`: index in `events` and command
/// id, ascending), as few as the rules of the module allow.
pub fn messages(events: &[RawEvent], acks: &[(usize, Uuid)]) -> Vec<EventsMessage> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < events.len() {
        let mut end = start + 1;
        let mut bytes = events[start].json.as_bytes().len();
        if joinable(&events[start]) {
            while end < events.len()
                && events[end].version == events[end - 1].version + 1
                && joinable(&events[end])
                && bytes + 1 + events[end].json.as_bytes().len() <= MAX_BATCH_BYTES
            {
                bytes += 1 + events[end].json.as_bytes().len();
                end += 1;
            }
        }
        let group = &events[start..end];
        let payload = if group.len() == 1 {
            group[0].json.bytes()
        } else {
            let mut b = BytesMut::with_capacity(bytes);
            for (i, ev) in group.iter().enumerate() {
                if i > 0 {
                    b.extend_from_slice(b"\n");
                }
                b.extend_from_slice(ev.json.as_bytes());
            }
            b.freeze()
        };
        out.push(EventsMessage {
            first: group[0].version,
            count: group.len(),
            acks: acks
                .iter()
                .filter(|(i, _)| (start..end).contains(i))
                .map(|(i, id)| (i - start, *id))
                .collect(),
            payload,
        });
        start = end;
    }
    out
}

fn joinable(ev: &RawEvent) -> bool {
    !ev.json.as_bytes().contains(&b'\n')
}

/// One event of a received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub version: u64,
    pub json: Bytes,
    /// The command whose ack this event carries.
    pub ack: Option<Uuid>,
}

/// The events of a received message; `None` for a malformed one (a missing or bad
/// version, a count that does not match the payload). A single event without a version
/// header takes it from the JSON's `version` field.
pub fn decode(headers: Option<&async_nats::HeaderMap>, payload: Bytes) -> Option<Vec<Received>> {
    let header = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
    let version = header(VERSION_HEADER).and_then(|v| v.parse::<u64>().ok());
    let count = match header(COUNT_HEADER) {
        None => 1,
        Some(c) => c.parse::<usize>().ok().filter(|c| *c >= 1)?,
    };
    if count == 1 {
        let version = match version {
            Some(v) => v,
            None => {
                serde_json::from_slice::<serde_json::Value>(&payload).ok()?["version"].as_u64()?
            }
        };
        let ack = header(ACK_HEADER).and_then(|v| Uuid::parse_str(v).ok());
        return Some(vec![Received {
            version,
            json: payload,
            ack,
        }]);
    }
    let first = version?;
    first.checked_add(count as u64 - 1)?;
    // `count` events need at least one byte each and a separator between them: a
    // count the payload cannot hold is refused before anything is sized by it.
    if count > payload.len().div_ceil(2) {
        return None;
    }
    let mut acks: Vec<(usize, Uuid)> = Vec::new();
    if let Some(list) = header(ACKS_HEADER) {
        for item in list.split(',') {
            let (i, id) = item.split_once(':')?;
            acks.push((i.parse().ok()?, Uuid::parse_str(id).ok()?));
        }
    }
    let mut out = Vec::with_capacity(count);
    let mut rest = payload;
    for i in 0..count {
        let json = if i + 1 == count {
            std::mem::take(&mut rest)
        } else {
            let at = rest.iter().position(|b| *b == b'\n')?;
            let json = rest.split_to(at);
            rest.advance(1);
            json
        };
        out.push(Received {
            version: first + i as u64,
            json,
            ack: acks.iter().find(|(at, _)| *at == i).map(|(_, id)| *id),
        });
    }
    if out.last().is_some_and(|r| r.json.contains(&b'\n')) {
        return None;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(version: u64, text: &str) -> RawEvent {
        RawEvent {
            version,
            json: text.into(),
        }
    }

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn round_trip(m: &EventsMessage) -> Vec<Received> {
        decode(Some(&m.headers()), m.payload.clone()).expect("decodes")
    }

    #[test]
    fn one_commit_is_one_message_and_comes_back_whole() {
        let events = vec![
            ev(7, r#"{"v":7}"#),
            ev(8, r#"{"v":"a\nb"}"#),
            ev(9, r#"{"v":9}"#),
        ];
        let ms = messages(&events, &[(0, id(1)), (2, id(2))]);
        assert_eq!(ms.len(), 1);
        let got = round_trip(&ms[0]);
        let want: Vec<Received> = events
            .iter()
            .zip([Some(id(1)), None, Some(id(2))])
            .map(|(e, ack)| Received {
                version: e.version,
                json: e.json.bytes(),
                ack,
            })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_single_event_keeps_the_plain_format() {
        let ms = messages(&[ev(3, r#"{"v":3}"#)], &[(0, id(9))]);
        let h = ms[0].headers();
        assert_eq!(h.get(VERSION_HEADER).unwrap().as_str(), "3");
        assert_eq!(h.get(ACK_HEADER).unwrap().as_str(), id(9).to_string());
        assert!(h.get(COUNT_HEADER).is_none());
        assert_eq!(&ms[0].payload[..], br#"{"v":3}"#);
        // Without headers the version comes from the JSON.
        let got = decode(None, Bytes::from_static(br#"{"version":4}"#)).unwrap();
        assert_eq!(got[0].version, 4);
    }

    #[test]
    fn gaps_newlines_and_size_split_messages() {
        let big = format!(r#"{{"x":"{}"}}"#, "y".repeat(MAX_BATCH_BYTES));
        let events = vec![
            ev(1, "{}"),
            ev(2, "{}"),
            ev(4, "{}"),
            ev(5, "{\n}"),
            ev(6, "{}"),
            ev(7, &big),
            ev(8, "{}"),
        ];
        let ms = messages(&events, &[(1, id(1)), (3, id(3)), (6, id(6))]);
        // (first version, count, acks) of each message.
        type Shape = (u64, usize, Vec<(usize, Uuid)>);
        let shape: Vec<Shape> = ms
            .iter()
            .map(|m| (m.first, m.count, m.acks.clone()))
            .collect();
        assert_eq!(
            shape,
            vec![
                (1, 2, vec![(1, id(1))]),
                (4, 1, vec![]),
                (5, 1, vec![(0, id(3))]),
                (6, 1, vec![]),
                (7, 1, vec![]),
                (8, 1, vec![(0, id(6))]),
            ]
        );
        let all: Vec<u64> = ms.iter().flat_map(round_trip).map(|r| r.version).collect();
        assert_eq!(all, vec![1, 2, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn malformed_messages_are_refused() {
        let mut h = async_nats::HeaderMap::new();
        h.insert(VERSION_HEADER, "1");
        h.insert(COUNT_HEADER, "3");
        // Two events where three are announced.
        assert!(decode(Some(&h), Bytes::from_static(b"{}\n{}")).is_none());
        // Four where three are announced.
        assert!(decode(Some(&h), Bytes::from_static(b"{}\n{}\n{}\n{}")).is_none());
        h.insert(ACKS_HEADER, "x:y");
        assert!(decode(Some(&h), Bytes::from_static(b"{}\n{}\n{}")).is_none());
        let mut h = async_nats::HeaderMap::new();
        h.insert(COUNT_HEADER, "2");
        // A batch needs its first version.
        assert!(decode(Some(&h), Bytes::from_static(b"{}\n{}")).is_none());
        h.insert(VERSION_HEADER, u64::MAX.to_string().as_str());
        assert!(decode(Some(&h), Bytes::from_static(b"{}\n{}")).is_none());
        h.insert(COUNT_HEADER, "0");
        assert!(decode(Some(&h), Bytes::from_static(b"{}")).is_none());
        // A count far beyond what the payload holds (nothing is allocated for it).
        let mut h = async_nats::HeaderMap::new();
        h.insert(VERSION_HEADER, "1");
        h.insert(COUNT_HEADER, (usize::MAX / 2).to_string().as_str());
        assert!(decode(Some(&h), Bytes::from_static(b"{}\n{}")).is_none());
    }
}
