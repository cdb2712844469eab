//! Sinks: where events leave the agent.

pub mod json;
pub mod pretty;
pub mod stdout;
