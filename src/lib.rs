//! Apex: settings, start-up and the command-line entry points of the `apex` binary.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod bench;
pub mod chaos;
pub mod cli;
pub mod config;
pub mod demo;
pub mod maintenance;
pub mod startup;
pub mod telemetry;
