//! Domain values to column values and back, shared by every table's queries.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use diesel::{QueryableByName, sql_types::BigInt};

use crate::domain::{Metadata, Usage};

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

/// How many messages a statement wrote or removed, and the usage they carry:
/// what `… RETURNING` rows summed in SQL come back as.
#[derive(QueryableByName)]
pub(super) struct Tally {
    #[diesel(sql_type = BigInt)]
    pub count: i64,
    #[diesel(sql_type = BigInt)]
    input_tokens: i64,
    #[diesel(sql_type = BigInt)]
    output_tokens: i64,
    #[diesel(sql_type = BigInt)]
    cached_input_tokens: i64,
    #[diesel(sql_type = BigInt)]
    reasoning_tokens: i64,
}

impl Tally {
    pub fn usage(&self) -> Usage {
        Usage {
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            cached_input_tokens: self.cached_input_tokens,
            reasoning_tokens: self.reasoning_tokens,
        }
    }
}

/// The select list that sums the usage of a CTE named `rows` into a [`Tally`].
pub(super) const TALLY_OF_ROWS: &str = "\
    SELECT count(*) AS count, \
           coalesce(sum(input_tokens), 0)::bigint AS input_tokens, \
           coalesce(sum(output_tokens), 0)::bigint AS output_tokens, \
           coalesce(sum(cached_input_tokens), 0)::bigint AS cached_input_tokens, \
           coalesce(sum(reasoning_tokens), 0)::bigint AS reasoning_tokens \
    FROM rows";
