-- session_db, as in the ICD ("Storage Service Interface"), extended for the design
-- brief's invariants:
--   * sessions.owner_epoch: the fencing epoch, bumped by every new owner (invariant 1);
--   * session_events.seq with UNIQUE(session_id, seq): the session version (invariant 2);
--   * session_events.command_id with UNIQUE(session_id, command_id): exactly-once
--     effect of a client command (invariant 3);
--   * session_states.seq: snapshots that recovery starts from (invariant 6);
--   * hub_outbox: Message Hub events written in the same transaction as their session
--     event (invariant 7).
-- Every durable write of a session carries the writer's epoch, and the trigger
-- gs_fence() refuses it unless it is the session's current owner_epoch.

CREATE TABLE sessions (
  id UUID PRIMARY KEY,
  campaign_id UUID NOT NULL,
  name VARCHAR(255) NOT NULL,
  status VARCHAR(50) NOT NULL,
  metadata JSONB,
  created_at TIMESTAMP NOT NULL,
  updated_at TIMESTAMP NOT NULL,
  is_deleted BOOLEAN DEFAULT FALSE,
  deleted_at TIMESTAMP,
  -- extensions
  created_by UUID NOT NULL,
  settings JSONB NOT NULL DEFAULT '{}'::jsonb,
  owner_epoch BIGINT NOT NULL DEFAULT 0,
  owner_node VARCHAR(255)
);

CREATE INDEX sessions_campaign_idx ON sessions (campaign_id) WHERE NOT is_deleted;

CREATE TABLE session_states (
  id UUID PRIMARY KEY,
  session_id UUID NOT NULL,
  state JSONB NOT NULL,
  version VARCHAR(50) NOT NULL,
  created_at TIMESTAMP NOT NULL,
  -- extensions
  seq BIGINT NOT NULL,
  epoch BIGINT NOT NULL,
  FOREIGN KEY (session_id) REFERENCES sessions(id)
);

CREATE UNIQUE INDEX session_states_seq_idx ON session_states (session_id, seq DESC);

CREATE TABLE session_events (
  id UUID PRIMARY KEY,
  session_id UUID NOT NULL,
  event_type VARCHAR(100) NOT NULL,
  event_data JSONB NOT NULL,
  created_at TIMESTAMP NOT NULL,
  -- extensions
  seq BIGINT NOT NULL,
  epoch BIGINT NOT NULL,
  command_id UUID,
  user_id UUID,
  FOREIGN KEY (session_id) REFERENCES sessions(id),
  CONSTRAINT session_events_seq_key UNIQUE (session_id, seq),
  CONSTRAINT session_events_command_key UNIQUE (session_id, command_id)
);

CREATE TABLE hub_outbox (
  id BIGSERIAL PRIMARY KEY,
  event_id UUID NOT NULL UNIQUE,
  session_id UUID NOT NULL REFERENCES sessions(id),
  seq BIGINT NOT NULL,
  epoch BIGINT NOT NULL,
  routing_key VARCHAR(100) NOT NULL,
  payload JSONB NOT NULL,
  created_at TIMESTAMP NOT NULL,
  published_at TIMESTAMP
);

CREATE INDEX hub_outbox_pending_idx ON hub_outbox (session_id, seq) WHERE published_at IS NULL;

-- Fencing. The row lock (FOR SHARE) makes the check atomic with the insert: a new
-- owner's epoch bump (UPDATE sessions) waits for in-flight writes of the old owner to
-- commit (so recovery sees them), and a write that waits behind an epoch bump sees the
-- new epoch and is refused.
CREATE FUNCTION gs_fence() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  current_epoch BIGINT;
BEGIN
  SELECT owner_epoch INTO current_epoch FROM sessions WHERE id = NEW.session_id FOR SHARE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'session % does not exist', NEW.session_id
      USING ERRCODE = 'foreign_key_violation';
  END IF;
  IF NEW.epoch IS DISTINCT FROM current_epoch THEN
    RAISE EXCEPTION 'fenced: epoch % is not the owner epoch % of session %',
      NEW.epoch, current_epoch, NEW.session_id
      USING ERRCODE = 'GSF01';
  END IF;
  RETURN NEW;
END
$$;

CREATE TRIGGER session_events_fence BEFORE INSERT ON session_events
  FOR EACH ROW EXECUTE FUNCTION gs_fence();
CREATE TRIGGER session_states_fence BEFORE INSERT ON session_states
  FOR EACH ROW EXECUTE FUNCTION gs_fence();
CREATE TRIGGER hub_outbox_fence BEFORE INSERT ON hub_outbox
  FOR EACH ROW EXECUTE FUNCTION gs_fence();
