//! Chat WebSocket tests over the whole real stack: HTTP commands → event store (with the
//! timeline) → relay → chat exchange → API replica → WebSocket client.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../support/broker.rs"]
mod broker;
mod helpers;
#[path = "../support/metrics.rs"]
mod metrics_text;

mod hostile;
mod live;
mod metrics;
mod readiness;
mod traces;
