//! Sinks: where events leave the agent.

pub mod json;
pub mod metrics;
pub mod pretty;
pub mod stdout;
