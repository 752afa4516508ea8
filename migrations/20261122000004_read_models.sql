-- Read models, built by the projectors from the event bus. Each projector records, in the same
-- transaction as its read-model update, the last sequence it applied per aggregate: an event at
-- or below it is a duplicate; one above it + 1 reveals a gap that is filled from the store.

CREATE TABLE projector_offsets (
    projector      text   NOT NULL,
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    last_sequence  bigint NOT NULL,
    PRIMARY KEY (projector, aggregate_type, aggregate_id)
);

CREATE TABLE projector_status (
    projector         text        PRIMARY KEY,
    last_position     bigint      NOT NULL DEFAULT 0,
    last_recorded_at  timestamptz,
    last_applied_at   timestamptz,
    processed_total   bigint      NOT NULL DEFAULT 0,
    skipped_total     bigint      NOT NULL DEFAULT 0,
    repaired_total    bigint      NOT NULL DEFAULT 0,
    retried_total     bigint      NOT NULL DEFAULT 0
);

CREATE TABLE dead_letters (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    projector      text        NOT NULL,
    event_id       uuid,
    aggregate_type text,
    aggregate_id   text,
    sequence       bigint,
    routing_key    text        NOT NULL,
    reason         text        NOT NULL,
    body           text        NOT NULL,
    dead_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_projector_idx ON dead_letters (projector, dead_at);

-- Agent catalogue.
CREATE TABLE rm_agents (
    agent_id     text        PRIMARY KEY,
    display_name text        NOT NULL,
    description  text        NOT NULL,
    tools        jsonb       NOT NULL,
    tiers        text[]      NOT NULL,
    status       text        NOT NULL,
    version      integer     NOT NULL,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL
);

-- Instance summaries.
CREATE TABLE rm_instances (
    instance_id     uuid        PRIMARY KEY,
    owner_id        text        NOT NULL,
    agent_id        text        NOT NULL,
    agent_version   integer     NOT NULL,
    thread_id       text        NOT NULL,
    status          text        NOT NULL,
    input           text        NOT NULL,
    created_at      timestamptz NOT NULL,
    started_at      timestamptz,
    ended_at        timestamptz,
    updated_at      timestamptz NOT NULL,
    last_sequence   bigint      NOT NULL,
    thought_count   integer     NOT NULL DEFAULT 0,
    tool_call_count integer     NOT NULL DEFAULT 0,
    open_tool_calls integer     NOT NULL DEFAULT 0,
    last_message    text,
    -- Admin only: the internal detail of the last step.
    last_internal   jsonb
);
CREATE INDEX rm_instances_owner_idx ON rm_instances (owner_id, created_at DESC, instance_id DESC);
CREATE INDEX rm_instances_agent_idx ON rm_instances (agent_id, created_at DESC);
CREATE INDEX rm_instances_created_idx ON rm_instances (created_at DESC, instance_id DESC);

-- Chat timeline: display fields only, never internal detail.
CREATE TABLE rm_timeline (
    instance_id uuid        NOT NULL,
    sequence    bigint      NOT NULL,
    owner_id    text        NOT NULL,
    kind        text        NOT NULL,
    at          timestamptz NOT NULL,
    display     jsonb       NOT NULL,
    PRIMARY KEY (instance_id, sequence)
);

-- Agent run statistics.
CREATE TABLE rm_agent_stats (
    agent_id         text   PRIMARY KEY,
    runs_total       bigint NOT NULL DEFAULT 0,
    pending          bigint NOT NULL DEFAULT 0,
    running          bigint NOT NULL DEFAULT 0,
    completed        bigint NOT NULL DEFAULT 0,
    failed           bigint NOT NULL DEFAULT 0,
    cancelled        bigint NOT NULL DEFAULT 0,
    tool_calls       bigint NOT NULL DEFAULT 0,
    finished_runs    bigint NOT NULL DEFAULT 0,
    total_duration_ms bigint NOT NULL DEFAULT 0
);

-- Per-instance facts the statistics projector needs (status and start time of each run).
CREATE TABLE rm_agent_stats_runs (
    instance_id uuid        PRIMARY KEY,
    agent_id    text        NOT NULL,
    status      text        NOT NULL,
    created_at  timestamptz NOT NULL
);

-- Usage per user.
CREATE TABLE rm_usage (
    user_id       text        PRIMARY KEY,
    instances     bigint      NOT NULL DEFAULT 0,
    completed     bigint      NOT NULL DEFAULT 0,
    failed        bigint      NOT NULL DEFAULT 0,
    cancelled     bigint      NOT NULL DEFAULT 0,
    thoughts      bigint      NOT NULL DEFAULT 0,
    tool_calls    bigint      NOT NULL DEFAULT 0,
    first_seen_at timestamptz NOT NULL,
    last_seen_at  timestamptz NOT NULL
);

-- Which user owns which instance, for the usage projector (events after creation carry no owner).
CREATE TABLE rm_usage_owners (
    instance_id uuid PRIMARY KEY,
    user_id     text NOT NULL
);
