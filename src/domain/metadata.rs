use std::collections::BTreeMap;

use super::{FieldViolation, Limits};

/// Caller-defined labels on a conversation or message: string pairs within the
/// configured limits. Kept sorted so equal maps compare and serialize equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata(BTreeMap<String, String>);

impl Metadata {
    /// An upper bound of the map's protobuf encoding, in bytes: each pair is
    /// an entry message holding a key and a value.
    pub fn wire_size_bound(&self) -> usize {
        self.0
            .iter()
            .map(|(k, v)| k.len() + v.len() + 3 * super::message::FIELD_OVERHEAD)
            .sum()
    }

    pub fn parse(
        field: &str,
        pairs: BTreeMap<String, String>,
        limits: &Limits,
    ) -> Result<Self, FieldViolation> {
        if pairs.len() > limits.max_metadata_pairs {
            return Err(FieldViolation::new(
                field,
                format!(
                    "metadata has {} pairs; the limit is {}",
                    pairs.len(),
                    limits.max_metadata_pairs
                ),
            ));
        }
        for (key, value) in &pairs {
            let key_chars = key.chars().count();
            if key_chars == 0 || key_chars > limits.max_metadata_key_chars {
                return Err(FieldViolation::new(
                    field,
                    format!(
                        "metadata keys must be 1-{} characters long",
                        limits.max_metadata_key_chars
                    ),
                ));
            }
            if value.chars().count() > limits.max_metadata_value_chars {
                return Err(FieldViolation::new(
                    field,
                    format!(
                        "the value of metadata key {key:?} is longer than {} characters",
                        limits.max_metadata_value_chars
                    ),
                ));
            }
            if key.contains('\0') || value.contains('\0') {
                return Err(FieldViolation::new(
                    field,
                    "metadata must not contain U+0000",
                ));
            }
        }
        Ok(Self(pairs))
    }

    /// Rebuilds metadata read back from storage, which was validated on the way in.
    pub fn from_stored(pairs: BTreeMap<String, String>) -> Self {
        Self(pairs)
    }

    pub fn pairs(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    pub fn into_pairs(self) -> BTreeMap<String, String> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits::CONTRACT;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn accepts_up_to_sixteen_pairs_at_the_limits() {
        let pairs: BTreeMap<_, _> = (0..16)
            .map(|i| (format!("{i:0>64}"), "v".repeat(512)))
            .collect();
        assert_eq!(
            Metadata::parse("metadata", pairs, &LIMITS)
                .unwrap()
                .pairs()
                .len(),
            16
        );
        assert!(Metadata::parse("metadata", BTreeMap::new(), &LIMITS).is_ok());
    }

    #[test]
    fn rejects_each_limit() {
        let seventeen: BTreeMap<_, _> = (0..17).map(|i| (i.to_string(), String::new())).collect();
        assert!(Metadata::parse("metadata", seventeen, &LIMITS).is_err());
        assert!(Metadata::parse("metadata", map(&[("", "v")]), &LIMITS).is_err());
        assert!(Metadata::parse("metadata", map(&[(&"k".repeat(65), "v")]), &LIMITS).is_err());
        assert!(Metadata::parse("metadata", map(&[("k", &"v".repeat(513))]), &LIMITS).is_err());
        assert!(Metadata::parse("metadata", map(&[("k", "a\0")]), &LIMITS).is_err());
    }

    #[test]
    fn limits_count_characters() {
        assert!(
            Metadata::parse(
                "metadata",
                map(&[(&"键".repeat(64), &"值".repeat(512))]),
                &LIMITS
            )
            .is_ok()
        );
    }
}
