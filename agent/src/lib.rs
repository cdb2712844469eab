//! The resptrace agent as a library: the binary (`main.rs`) and the
//! userspace pipeline benchmark (`examples/pipeline.rs`) both use it.
//! Stages, one module each: decode → enrich → tracker (RESP) → aggregate →
//! observe/detect → sinks.

pub mod aggregate;
pub mod btf;
pub mod cli;
pub mod clock;
pub mod config;
pub mod decode;
pub mod detect;
pub mod enrich;
pub mod gauges;
pub mod http;
pub mod kube;
pub mod observe;
pub mod preflight;
pub mod probes;
pub mod procfs;
pub mod resp;
pub mod rings;
pub mod run;
pub mod sinks;
pub mod tls;
pub mod tracefs;
pub mod tracker;
pub mod workload;
pub mod zones;
