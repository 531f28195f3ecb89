//! convo's API tests: a real server per test over a real gRPC channel, against
//! a real PostgreSQL database of the test's own.

// The tests read rows to check them and acknowledge nothing, so the rule
// of clippy.toml (wait for a write's commit before using its row) is not
// theirs.
#![allow(clippy::disallowed_methods)]

mod helpers;

mod citus;
mod concurrency;
mod conversations;
mod erasure;
mod fault_harness;
mod faults;
mod fork;
mod identity;
mod messages;
mod operability;
mod operations;
mod parts;
mod plans;
mod private_postgres;
mod search;
mod security;
mod sizes;
mod watch;
