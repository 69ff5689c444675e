//! Several requests to one node in one NATS message: router → `gs.node.{n}.rpc`.
//!
//! At the SRD's load a router forwards thousands of commands a second to each node, one
//! NATS message each; the server and the node's client then handle each one on its own,
//! about two thirds of all the messages NATS carries (BENCHMARKS.md, stop 30). The
//! requests that become ready while the router's previous publish was being handed to
//! its NATS client travel together instead:
//!
//! * one request: as before, the request's JSON with the reply subject of its waiter;
//! * `n > 1` requests: header `Gs-Batch: n`; the payload is, for each request, its
//!   reply subject's length (`u16`, big-endian), the subject, the request's length
//!   (`u32`, big-endian) and the request. The message's own reply subject is its first
//!   request's, so that "no responders" (nothing delivered) still reaches a waiter.
//!
//! The node answers each request on its own reply subject, exactly as if it had come
//! alone. A batch never exceeds [`MAX_BATCH_BYTES`] nor [`MAX_BATCH_REQUESTS`]. (A node
//! that predates the batched form refuses it as a bad request whose reply nobody waits
//! for, and its requests time out and are retried: in a rolling upgrade across this
//! change, nodes go first.) Pure code: the router encodes with [`encode`], the node
//! decodes with [`decode`].

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Header of a message carrying several requests: how many.
pub const BATCH_HEADER: &str = "Gs-Batch";

/// A message's payload stays under this (NATS refuses payloads over its
/// `max_payload`, 1 MiB by default); a larger request goes alone.
pub const MAX_BATCH_BYTES: usize = 256 * 1024;

/// At most this many requests in one message.
pub const MAX_BATCH_REQUESTS: usize = 128;

/// One request waiting to be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub reply: String,
    pub payload: Bytes,
}

impl Pending {
    fn framed_len(&self) -> usize {
        2 + self.reply.len() + 4 + self.payload.len()
    }

    /// Whether the request can travel in a batch at all.
    fn batchable(&self) -> bool {
        self.reply.len() <= u16::MAX as usize && self.framed_len() <= MAX_BATCH_BYTES
    }
}

/// One message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// A request on its own.
    Single(Pending),
    /// Several requests; `reply` is the message's reply subject (its first request's).
    Batch {
        reply: String,
        count: usize,
        payload: Bytes,
    },
}

impl Outgoing {
    /// The NATS headers of a batch.
    pub fn headers(count: usize) -> async_nats::HeaderMap {
        let mut h = async_nats::HeaderMap::new();
        h.insert(BATCH_HEADER, count.to_string().as_str());
        h
    }
}

/// `requests` grouped by destination: the destinations in the order of their first
/// request, each group in the order queued.
pub fn by_destination<D: PartialEq>(
    requests: impl IntoIterator<Item = (D, Pending)>,
) -> Vec<(D, Vec<Pending>)> {
    let mut groups: Vec<(D, Vec<Pending>)> = Vec::new();
    for (to, request) in requests {
        // A linear search: a process sends to a handful of nodes.
        match groups.iter_mut().find(|(d, _)| *d == to) {
            Some((_, group)) => group.push(request),
            None => groups.push((to, vec![request])),
        }
    }
    groups
}

/// The messages for `requests` (in the order given, which they keep), as few as the
/// limits allow.
pub fn encode(requests: Vec<Pending>) -> Vec<Outgoing> {
    let mut out = Vec::new();
    let mut group: Vec<Pending> = Vec::new();
    let mut bytes = 0;
    for r in requests {
        if !r.batchable() {
            flush(&mut out, &mut group);
            bytes = 0;
            out.push(Outgoing::Single(r));
            continue;
        }
        if bytes + r.framed_len() > MAX_BATCH_BYTES || group.len() == MAX_BATCH_REQUESTS {
            flush(&mut out, &mut group);
            bytes = 0;
        }
        bytes += r.framed_len();
        group.push(r);
    }
    flush(&mut out, &mut group);
    out
}

fn flush(out: &mut Vec<Outgoing>, group: &mut Vec<Pending>) {
    match group.len() {
        0 => {}
        1 => out.push(Outgoing::Single(group.pop().expect("one request"))),
        count => {
            let size = group.iter().map(Pending::framed_len).sum();
            let mut payload = BytesMut::with_capacity(size);
            for r in group.iter() {
                payload.put_u16(r.reply.len() as u16);
                payload.put_slice(r.reply.as_bytes());
                payload.put_u32(r.payload.len() as u32);
                payload.put_slice(&r.payload);
            }
            out.push(Outgoing::Batch {
                reply: group[0].reply.clone(),
                count,
                payload: payload.freeze(),
            });
            group.clear();
        }
    }
}

/// Why a batch could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadBatch {
    #[error("the {BATCH_HEADER} header is not a count")]
    Count,
    #[error("the payload ends inside request {0}")]
    Truncated(usize),
    #[error("request {0}'s reply subject is not UTF-8")]
    Reply(usize),
    #[error("{0} bytes follow the last request")]
    Trailing(usize),
}

/// The requests of a message: `None` when it is not a batch (one request, the message's
/// own payload and reply subject), else each request's reply subject and payload.
pub fn decode(
    headers: Option<&async_nats::HeaderMap>,
    payload: &Bytes,
) -> Option<Result<Vec<Pending>, BadBatch>> {
    let count = headers?.get(BATCH_HEADER)?;
    Some(decode_payload(count.as_str(), payload))
}

fn decode_payload(count: &str, payload: &Bytes) -> Result<Vec<Pending>, BadBatch> {
    let count: usize = count.trim().parse().map_err(|_| BadBatch::Count)?;
    if count == 0 || count > MAX_BATCH_REQUESTS {
        return Err(BadBatch::Count);
    }
    let mut rest = payload.clone();
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        if rest.remaining() < 2 {
            return Err(BadBatch::Truncated(i));
        }
        let n = rest.get_u16() as usize;
        if rest.remaining() < n {
            return Err(BadBatch::Truncated(i));
        }
        let reply = rest.split_to(n);
        let reply = String::from_utf8(reply.to_vec()).map_err(|_| BadBatch::Reply(i))?;
        if rest.remaining() < 4 {
            return Err(BadBatch::Truncated(i));
        }
        let n = rest.get_u32() as usize;
        if rest.remaining() < n {
            return Err(BadBatch::Truncated(i));
        }
        out.push(Pending {
            reply,
            payload: rest.split_to(n),
        });
    }
    if rest.has_remaining() {
        return Err(BadBatch::Trailing(rest.remaining()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(i: usize, len: usize) -> Pending {
        Pending {
            reply: format!("_INBOX.abc.{i}"),
            payload: Bytes::from(vec![b'{'; len]),
        }
    }

    fn roundtrip(out: &[Outgoing]) -> Vec<Pending> {
        out.iter()
            .flat_map(|o| match o {
                Outgoing::Single(p) => vec![p.clone()],
                Outgoing::Batch {
                    reply,
                    count,
                    payload,
                } => {
                    let h = Outgoing::headers(*count);
                    let items = decode(Some(&h), payload).unwrap().unwrap();
                    assert_eq!(&items[0].reply, reply, "the batch replies as its first");
                    assert_eq!(items.len(), *count);
                    items
                }
            })
            .collect()
    }

    #[test]
    fn requests_are_grouped_by_destination_in_order() {
        let tagged = |s: &str| {
            s.split(' ')
                .enumerate()
                .map(|(i, d)| (d.to_string(), req(i, 1)))
                .collect::<Vec<_>>()
        };
        let cases = [
            ("a", vec![("a", vec![0])]),
            ("a a a", vec![("a", vec![0, 1, 2])]),
            (
                "a b a c b",
                vec![("a", vec![0, 2]), ("b", vec![1, 4]), ("c", vec![3])],
            ),
            (
                "c b a",
                vec![("c", vec![0]), ("b", vec![1]), ("a", vec![2])],
            ),
        ];
        for (queued, want) in cases {
            let got = by_destination(tagged(queued));
            let want: Vec<(String, Vec<Pending>)> = want
                .into_iter()
                .map(|(d, ids)| (d.to_string(), ids.into_iter().map(|i| req(i, 1)).collect()))
                .collect();
            assert_eq!(got, want, "{queued}");
        }
        assert!(by_destination(Vec::<(String, Pending)>::new()).is_empty());
    }

    #[test]
    fn one_request_goes_alone_and_is_not_a_batch() {
        let out = encode(vec![req(0, 10)]);
        assert_eq!(out, vec![Outgoing::Single(req(0, 10))]);
        assert!(decode(None, &Bytes::from_static(b"{}")).is_none());
        assert!(decode(Some(&async_nats::HeaderMap::new()), &Bytes::new()).is_none());
    }

    #[test]
    fn several_requests_share_a_message_in_order() {
        let reqs: Vec<_> = (0..5).map(|i| req(i, 100 + i)).collect();
        let out = encode(reqs.clone());
        assert_eq!(out.len(), 1);
        assert_eq!(roundtrip(&out), reqs);
    }

    #[test]
    fn limits_split_batches_and_large_requests_go_alone() {
        let mut reqs: Vec<_> = (0..MAX_BATCH_REQUESTS + 10).map(|i| req(i, 10)).collect();
        reqs.insert(7, req(999, MAX_BATCH_BYTES));
        let out = encode(reqs.clone());
        // 7 before the large one, the large one alone, the rest in a full batch and
        // one of the remainder.
        assert_eq!(out.len(), 4);
        assert!(matches!(out[1], Outgoing::Single(_)));
        assert_eq!(roundtrip(&out), reqs);
        // Bytes: two 150 KiB requests cannot share a message.
        let big: Vec<_> = (0..3).map(|i| req(i, 150 * 1024)).collect();
        let out = encode(big.clone());
        assert_eq!(out.len(), 3);
        assert_eq!(roundtrip(&out), big);
    }

    #[test]
    fn malformed_batches_are_refused() {
        let out = encode((0..3).map(|i| req(i, 20)).collect());
        let Outgoing::Batch { payload, .. } = &out[0] else {
            panic!("a batch")
        };
        let cases = [
            ("x", payload.clone(), BadBatch::Count),
            ("0", payload.clone(), BadBatch::Count),
            ("4", payload.clone(), BadBatch::Truncated(3)),
            ("2", payload.clone(), BadBatch::Trailing(2 + 12 + 4 + 20)),
            (
                "3",
                payload.slice(..payload.len() - 1),
                BadBatch::Truncated(2),
            ),
            (
                "1",
                Bytes::from_static(&[0, 2, 0xff, 0xfe, 0, 0, 0, 0]),
                BadBatch::Reply(0),
            ),
            ("1", Bytes::from_static(&[0]), BadBatch::Truncated(0)),
        ];
        for (count, payload, want) in cases {
            let mut h = async_nats::HeaderMap::new();
            h.insert(BATCH_HEADER, count);
            assert_eq!(decode(Some(&h), &payload), Some(Err(want)), "count {count}");
        }
    }
}
