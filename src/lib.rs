//! convo: a conversation store for AI systems.
//!
//! Data flows one way: [`grpc`] → [`service`] → [`store`] → PostgreSQL, with
//! the parsed [`domain`] types shared by all. [`startup`] wires them together;
//! [`local_postgres`] runs a private database when none is configured.

pub mod config;
pub mod domain;
pub mod grpc;
pub mod local_postgres;
pub mod retention;
pub mod service;
pub mod startup;
pub mod store;
pub mod telemetry;
