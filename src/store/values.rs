//! Domain values to column values and back, shared by every table's queries.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use diesel::{
    deserialize::{FromSql, FromSqlRow},
    pg::{Pg, PgValue},
    sql_types::{Jsonb, Timestamptz},
};

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

/// A `timestamptz` read from a row. PostgreSQL sends microseconds since
/// 2000-01-01 UTC; diesel turns them into a `DateTime` by calendar
/// arithmetic, which was 2.5 % of the server's time under ListConversations
/// (two per row); this is one addition. Rows use it with
/// `#[diesel(deserialize_as = StoredTime)]`.
#[derive(Debug, Clone, Copy, FromSqlRow)]
pub(super) struct StoredTime(DateTime<Utc>);

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC).
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

impl StoredTime {
    fn from_postgres_micros(micros: i64) -> Option<Self> {
        micros
            .checked_add(POSTGRES_EPOCH_MICROS)
            .and_then(DateTime::from_timestamp_micros)
            .map(Self)
    }
}

impl FromSql<Timestamptz, Pg> for StoredTime {
    fn from_sql(value: PgValue<'_>) -> diesel::deserialize::Result<Self> {
        let bytes: [u8; 8] = value
            .as_bytes()
            .try_into()
            .map_err(|_| "a timestamptz of other than 8 bytes")?;
        Self::from_postgres_micros(i64::from_be_bytes(bytes))
            .ok_or_else(|| "a timestamptz out of chrono's range (infinity?)".into())
    }
}

impl From<StoredTime> for DateTime<Utc> {
    fn from(time: StoredTime) -> Self {
        time.0
    }
}

/// A `metadata` column read from a row. Most rows hold `{}`, which is taken
/// as it comes, without parsing JSON: read as a `serde_json::Value`, then
/// walked into a map, every message's empty metadata cost about 5 % of the
/// server's instructions under ResumeConversation. Rows use it with
/// `#[diesel(deserialize_as = StoredMetadata)]`.
#[derive(Debug, FromSqlRow)]
pub(super) struct StoredMetadata(Metadata);

impl FromSql<Jsonb, Pg> for StoredMetadata {
    fn from_sql(value: PgValue<'_>) -> diesel::deserialize::Result<Self> {
        // jsonb's binary form: a version byte (1), then the JSON text.
        if value.as_bytes() == b"\x01{}" {
            return Ok(Self(Metadata::from_stored(BTreeMap::new())));
        }
        let json = <serde_json::Value as FromSql<Jsonb, Pg>>::from_sql(value)?;
        Ok(Self(metadata_from_json(json)))
    }
}

impl From<StoredMetadata> for Metadata {
    fn from(metadata: StoredMetadata) -> Self {
        metadata.0
    }
}

/// The size of a message as every byte bound counts it: its content and its
/// encoded parts, in bytes, given the SQL of the two values. Resume's stored
/// running totals (`bytes_through`, `total_bytes`) are sums of it.
pub(super) fn size_of(content: &str, parts: &str) -> String {
    format!("octet_length({content}) + coalesce(octet_length({parts}), 0)")
}

/// [`size_of`] the message in `row` (a table name or alias).
pub(super) fn message_size(row: &str) -> String {
    size_of(&format!("{row}.content"), &format!("{row}.parts"))
}

/// A row of `messages`' usage and size, the columns [`tally_of`] sums: what
/// a statement that writes or removes messages returns, or what a read of
/// them selects.
pub(super) fn tally_columns() -> String {
    let size = message_size("messages");
    format!("input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, {size} AS bytes")
}

/// The count of the rows of `rows` (a CTE of [`tally_columns`]), their
/// usage and their size summed, as one row.
pub(super) fn tally_of(rows: &str) -> String {
    format!(
        "SELECT count(*) AS count, \
                coalesce(sum(input_tokens), 0)::bigint AS input_tokens, \
                coalesce(sum(output_tokens), 0)::bigint AS output_tokens, \
                coalesce(sum(cached_input_tokens), 0)::bigint AS cached_input_tokens, \
                coalesce(sum(reasoning_tokens), 0)::bigint AS reasoning_tokens, \
                coalesce(sum(bytes), 0)::bigint AS bytes \
         FROM {rows}"
    )
}

#[cfg(test)]
mod tests {
    use chrono::{NaiveDate, TimeDelta};

    use super::*;

    /// What diesel computes: the epoch of 2000 plus the microseconds.
    fn by_calendar(micros: i64) -> DateTime<Utc> {
        let epoch = NaiveDate::from_ymd_opt(2000, 1, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .expect("2000-01-01");
        (epoch + TimeDelta::microseconds(micros)).and_utc()
    }

    #[test]
    fn stored_times_read_as_diesel_reads_them() {
        for micros in [
            0,
            1,
            -1,
            851_299_200_123_456,       // 2026-12-22T00:00:00.123456
            -946_684_800_000_000,      // the Unix epoch
            -31_557_600_000_000_007,   // before 1000 AD
            4_102_444_800_000_000_999, // after 2100
        ] {
            let read = StoredTime::from_postgres_micros(micros).map(DateTime::from);
            assert_eq!(read, Some(by_calendar(micros)), "{micros}");
        }
        assert!(StoredTime::from_postgres_micros(i64::MAX).is_none());
    }
}
