//! Sinks: where events leave the agent.

pub mod json;
pub mod metrics;
