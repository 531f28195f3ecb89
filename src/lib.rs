pub mod domain;
pub mod grpc;
pub mod service;
pub mod store;
