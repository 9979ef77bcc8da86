//! The aggregator service: consumes the events of the configured upstream services from Kafka and
//! folds them into one live view per entity, served over HTTP. The actors live in the `actors`
//! crate; this crate holds what faces the outside: configuration, Kafka, HTTP, and the demo.

pub mod allocator;
pub mod bench;
pub mod broker_process;
pub mod changelog_producer;
pub mod changelog_restorer;
pub mod chaos;
pub mod config;
pub mod consumer;
pub mod dead_letter_producer;
pub mod demo;
pub mod embedded_broker;
pub mod event_producer;
pub mod generator;
pub mod http;
pub mod offset_sink;
pub mod pipeline_bench;
pub mod service;
pub mod thread_cpu;
pub mod verifier;
