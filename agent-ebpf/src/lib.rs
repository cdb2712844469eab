//! Nothing to see here: the kernel programs are binaries (`src/main.rs`).
//! This empty library lets `agent` list the crate as a build-dependency,
//! so cargo rebuilds the agent when the programs change.
#![no_std]
