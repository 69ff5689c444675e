//! The answers a connection still owes its client (sans-IO).
//!
//! Every forwarded command is answered exactly once. An applied command's ack comes
//! with its event (`Gs-Acks`): the connection writes the ack right behind the event,
//! in the same flush, instead of waiting for the command's forwarding task to pass it
//! on (a second wake-up and, most of the time, a second `write` to the client). The
//! task still sends its answer; [`Owed::take_answer`] drops it when the event already
//! answered that message. Events a connection gets from the owner instead of the
//! hub (a gap filled, a resume, a connection that lagged past the hub's buffer) carry
//! no acks: those messages are answered by their tasks, as before. Either way each
//! message is answered once; the ack normally follows its event in the same write,
//! but an answer can still come first (the hub answers commands even while it holds
//! their event back for a gap, and a connection whose token expires writes the
//! answers it has before closing).
//!
//! Each message is tracked by a serial of its own, not by its command id: a client
//! may send the same id again while the first copy is in flight (both are answered).
//! An event answers a message only when exactly one unanswered message in flight
//! carries its command id; with several, the tasks answer them all.

use uuid::Uuid;

/// A forwarded message waiting for its answer.
#[derive(Debug)]
struct Message {
    serial: u64,
    command: Uuid,
    /// Sent without an `id` (the ICD's form): its ack is not sent.
    anonymous: bool,
    /// Already answered by its event: the task's answer is dropped.
    answered: bool,
}

/// What to do for an event that carries a command's ack.
#[derive(Debug, PartialEq, Eq)]
pub enum EventAck {
    /// Not this connection's message (or not only one): nothing.
    None,
    /// Write the ack after the event.
    Write,
    /// The message is answered, but its sender wants no ack (anonymous).
    Silent,
}

/// The messages in flight on one connection (at most `router.max_inflight_per_connection`).
#[derive(Debug, Default)]
pub struct Owed {
    in_flight: Vec<Message>,
    next_serial: u64,
}

impl Owed {
    /// A message was forwarded: the serial its task's answer carries.
    pub fn forwarded(&mut self, command: Uuid, anonymous: bool) -> u64 {
        self.next_serial += 1;
        self.in_flight.push(Message {
            serial: self.next_serial,
            command,
            anonymous,
            answered: false,
        });
        self.next_serial
    }

    /// An event carrying `command`'s ack is being written to the client.
    pub fn event_acks(&mut self, command: Uuid) -> EventAck {
        let mut waiting = self
            .in_flight
            .iter_mut()
            .filter(|m| m.command == command && !m.answered);
        let (Some(m), None) = (waiting.next(), waiting.next()) else {
            return EventAck::None;
        };
        m.answered = true;
        if m.anonymous {
            EventAck::Silent
        } else {
            EventAck::Write
        }
    }

    /// The task of message `serial` answered: whether to write its answer (`false`:
    /// its event already did).
    pub fn take_answer(&mut self, serial: u64) -> bool {
        match self.in_flight.iter().position(|m| m.serial == serial) {
            Some(i) => !self.in_flight.swap_remove(i).answered,
            // Not tracked (cannot happen): write it rather than lose it.
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_answers_its_message_once() {
        let mut o = Owed::default();
        let (x, y) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let sx = o.forwarded(x, false);
        let sy = o.forwarded(y, true);
        assert_eq!(o.event_acks(Uuid::from_u128(3)), EventAck::None, "not ours");
        assert_eq!(o.event_acks(x), EventAck::Write);
        assert_eq!(o.event_acks(x), EventAck::None, "already answered");
        assert!(!o.take_answer(sx), "the task's copy is dropped");
        assert_eq!(o.event_acks(y), EventAck::Silent, "anonymous: no ack");
        assert!(!o.take_answer(sy));
        assert!(o.in_flight.is_empty());
    }

    #[test]
    fn without_its_event_the_task_answers() {
        let mut o = Owed::default();
        let s = o.forwarded(Uuid::from_u128(1), false);
        assert!(o.take_answer(s), "a refusal, or a connection that lagged");
        assert_eq!(o.event_acks(Uuid::from_u128(1)), EventAck::None, "gone");
        assert!(o.take_answer(99), "an unknown serial is still written");
    }

    #[test]
    fn the_same_id_twice_in_flight_is_left_to_the_tasks() {
        let mut o = Owed::default();
        let x = Uuid::from_u128(1);
        let (a, b) = (o.forwarded(x, false), o.forwarded(x, false));
        assert_eq!(o.event_acks(x), EventAck::None);
        assert!(o.take_answer(a));
        assert!(o.take_answer(b));
        // Once one is answered, the event answers the other.
        let c = o.forwarded(x, false);
        let d = o.forwarded(x, false);
        assert!(o.take_answer(c));
        assert_eq!(o.event_acks(x), EventAck::Write);
        assert!(!o.take_answer(d));
    }
}
