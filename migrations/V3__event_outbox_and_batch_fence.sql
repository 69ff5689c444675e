-- Throughput at the SRD's load (issue 9), with the same guarantees:
--
-- 1. The event row is the hub outbox. Every committed event is published; instead of
--    an outbox row per event (inserted, then updated once confirmed), each session has
--    a cursor: the newest version the broker has confirmed. The relay advances it once
--    per publishing pass. The hub payload is a pure function of the event row, so the
--    row carries what the payload needs besides the event itself: the command (or hub
--    event) that caused it, and the combat it belongs to.
-- 2. The fencing check runs once per statement and session, not once per row. A write
--    takes a shared advisory lock on each of its sessions and checks their epochs; a
--    new owner takes the lock exclusively while it bumps the epoch. So an epoch bump
--    waits for the old owner's writes in flight (and recovery then sees them), and a
--    write queued behind a bump sees the new epoch and is refused: the guarantee of
--    the per-row trigger of V1, without a row lock per inserted row.

ALTER TABLE session_events ADD COLUMN correlation_id UUID;
ALTER TABLE session_events ADD COLUMN combat_id UUID;

CREATE TABLE hub_cursor (
  session_id UUID PRIMARY KEY REFERENCES sessions(id),
  -- Every event with seq <= published_seq has been confirmed by the broker.
  published_seq BIGINT NOT NULL DEFAULT 0,
  -- The session may have events the relay has not published yet: a live owner, or a
  -- dead one's leftovers. Cleared by an owner that stopped with everything published.
  active BOOLEAN NOT NULL DEFAULT true,
  -- The epoch of the owner that last set `active`.
  epoch BIGINT NOT NULL DEFAULT 0
);

CREATE INDEX hub_cursor_active_idx ON hub_cursor (session_id) WHERE active;

-- Cursors for the sessions that exist: up to the oldest unconfirmed outbox row.
INSERT INTO hub_cursor (session_id, published_seq, active, epoch)
SELECT s.id,
       COALESCE(
         (SELECT min(o.seq) - 1 FROM hub_outbox o
           WHERE o.session_id = s.id AND o.published_at IS NULL),
         (SELECT max(e.seq) FROM session_events e WHERE e.session_id = s.id),
         0),
       true,
       s.owner_epoch
FROM sessions s;

DROP TABLE hub_outbox;

-- The advisory-lock key of a session: the first 64 bits of its id.
CREATE FUNCTION gs_lock_key(session UUID) RETURNS BIGINT
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT ('x' || substr(replace(session::text, '-', ''), 1, 16))::bit(64)::bigint
$$;

-- The per-statement fence: every session written by the statement must exist and be
-- owned at the epoch the rows carry. (Nodes take the same locks and make the same check
-- before inserting, to leave a fenced session out of a group commit; this trigger is
-- the database's own guarantee, whoever writes.)
CREATE FUNCTION gs_fence_rows() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  bad RECORD;
BEGIN
  PERFORM pg_advisory_xact_lock_shared(gs_lock_key(d.session_id))
    FROM (SELECT DISTINCT session_id FROM new_rows) d;
  -- A new statement: it sees every epoch bump committed before the locks were granted.
  SELECT n.session_id, n.epoch, s.owner_epoch, s.id IS NULL AS missing INTO bad
    FROM (SELECT DISTINCT session_id, epoch FROM new_rows) n
    LEFT JOIN sessions s ON s.id = n.session_id
   WHERE s.id IS NULL OR s.owner_epoch IS DISTINCT FROM n.epoch
   LIMIT 1;
  IF FOUND THEN
    IF bad.missing THEN
      RAISE EXCEPTION 'session % does not exist', bad.session_id
        USING ERRCODE = 'foreign_key_violation';
    END IF;
    RAISE EXCEPTION 'fenced: epoch % is not the owner epoch % of session %',
      bad.epoch, bad.owner_epoch, bad.session_id
      USING ERRCODE = 'GSF01';
  END IF;
  RETURN NULL;
END
$$;

DROP TRIGGER session_events_fence ON session_events;
DROP TRIGGER session_states_fence ON session_states;
DROP FUNCTION gs_fence();

CREATE TRIGGER session_events_fence AFTER INSERT ON session_events
  REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION gs_fence_rows();
CREATE TRIGGER session_states_fence AFTER INSERT ON session_states
  REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION gs_fence_rows();
