//! The gRPC edge: the server and its layers (`server.rs`), identity
//! (`identity.rs`, `jwt.rs`), parsing requests into domain commands
//! (`parse.rs`), the handlers (`handlers.rs`), domain values back into
//! protobuf (`convert.rs`), page tokens (`page_token.rs`), the one mapping
//! from errors to `Status` (`error.rs`), per-call logs and metrics
//! (`observe.rs`), the in-flight bound (`limit.rs`) and the health probe
//! (`health.rs`). No SQL and no business rules live here.

mod convert;
mod error;
mod fuzzing;
mod handlers;
mod health;
mod identity;
mod jwt;
mod limit;
mod observe;
mod page_token;
mod parse;
mod server;
mod unread;

/// Fuzzing support: the `fuzz/` target and a test drive request validation.
#[doc(hidden)]
pub use fuzzing::{REQUEST_KINDS, validate_encoded_request};
pub use handlers::ConversationApi;
pub use health::DATABASE_HEALTH_NAME;
pub use identity::{Authenticator, USER_ID_HEADER};
pub use jwt::JwtVerifier;
pub use observe::{ObserveLayer, REQUEST_ID_HEADER};
pub use page_token::PageTokenCodec;
pub use server::{ServeError, ServerOptions, serve};

/// Code generated from `proto/convo/v1/convo.proto` by `build.rs`.
pub mod proto {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("convo.v1");

    /// The encoded descriptor set of convo.v1, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/convo_descriptor.bin"));
}

/// The fully qualified name of the service, as health and reflection report it.
pub const SERVICE_NAME: &str = "convo.v1.ConversationService";
