-- Message Hub relay.
--
-- session_characters: which sessions a character plays in, so a node receiving
-- `character.state.changed` finds the sessions to relay it to. Written in the same
-- transaction as the event that brings the character into the session (a join with a
-- character, or a spawn), so the index never misses an acknowledged character.
CREATE TABLE session_characters (
  character_id UUID NOT NULL,
  session_id UUID NOT NULL REFERENCES sessions(id),
  added_at TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'utc'),
  PRIMARY KEY (character_id, session_id)
);

CREATE INDEX session_characters_session_idx ON session_characters (session_id);

-- The relay reads a session's unpublished rows in order; the sweeper finds old ones.
CREATE INDEX hub_outbox_unpublished_idx ON hub_outbox (created_at) WHERE published_at IS NULL;
