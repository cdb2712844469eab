//! Sinks: where events leave the agent.

pub mod json;
