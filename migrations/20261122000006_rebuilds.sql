-- Read-model rebuilds: one row per run, for operators and the admin API.
CREATE TABLE projection_rebuilds (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    projection  text        NOT NULL,
    status      text        NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
    events      bigint      NOT NULL DEFAULT 0,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    error       text
);
CREATE INDEX projection_rebuilds_projection_idx ON projection_rebuilds (projection, started_at DESC);
