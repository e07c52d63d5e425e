-- One row per invocation, as delivered by the gateway's event-worker.
-- `id` is the event id (stable across redelivery): the primary key makes inserts idempotent.
CREATE TABLE function_usage (
    id                 text        PRIMARY KEY,
    namespace          text        NOT NULL,
    function_name      text        NOT NULL,
    started            timestamptz NOT NULL,
    duration_ns        bigint      NOT NULL CHECK (duration_ns >= 0),
    billed_duration_ms bigint      NOT NULL CHECK (billed_duration_ms >= 0),
    memory_bytes       bigint      NOT NULL CHECK (memory_bytes >= 0),
    memory_peak_bytes  bigint      NULL     CHECK (memory_peak_bytes >= 0),
    cpu_ns             bigint      NULL     CHECK (cpu_ns >= 0),
    status_code        integer     NULL,
    call_id            text        NULL,
    source             text        NOT NULL,
    cold_start         boolean     NOT NULL DEFAULT false,
    init_duration_ns   bigint      NULL     CHECK (init_duration_ns >= 0),
    delivery_id        text        NULL,
    received_at        timestamptz NOT NULL DEFAULT now()
);

-- Reports select a period, optionally one namespace, and group by function.
CREATE INDEX function_usage_started_idx ON function_usage (started);
CREATE INDEX function_usage_ns_fn_started_idx
    ON function_usage (namespace, function_name, started);
-- Tracing one delivery (X-Openfaas-Delivery) back to its rows.
CREATE INDEX function_usage_delivery_idx ON function_usage (delivery_id);
