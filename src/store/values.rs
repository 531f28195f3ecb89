//! Domain values to column values and back, shared by every table's queries.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::domain::Metadata;

/// Metadata is stored as a JSON object of strings (the schema CHECKs that it
/// is an object).
pub(super) fn metadata_to_json(metadata: &Metadata) -> serde_json::Value {
    serde_json::Value::Object(
        metadata
            .pairs()
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    )
}

/// Anything but a string read back is kept as its JSON text rather than dropped.
pub(super) fn metadata_from_json(value: serde_json::Value) -> Metadata {
    let pairs = match value {
        serde_json::Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect(),
        _ => BTreeMap::new(),
    };
    Metadata::from_stored(pairs)
}

/// The current time at PostgreSQL's precision (microseconds), so what a call
/// returns is exactly what a later read returns.
pub(super) fn now_micros() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}
