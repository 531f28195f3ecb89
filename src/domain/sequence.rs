use std::fmt;

use super::FieldViolation;

/// A position in a conversation: 0 is before the first message, `n` is the
/// message with sequence `n`. Requests name positions (`after_sequence`,
/// `expected_last_sequence`, `up_to_sequence`); none can be negative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sequence(i64);

impl Sequence {
    /// Before the first message.
    pub const START: Self = Self(0);

    /// Accepts any non-negative position; `zero_means` tells the client what
    /// 0 asks for, since each field gives it its own meaning.
    pub fn parse(field: &str, value: i64, zero_means: &str) -> Result<Self, FieldViolation> {
        if value < 0 {
            return Err(FieldViolation::new(
                field,
                format!("{field} must not be negative (0 {zero_means})"),
            ));
        }
        Ok(Self(value))
    }

    pub fn get(self) -> i64 {
        self.0
    }

    /// The position of a stored message.
    pub fn of(message: &super::Message) -> Self {
        Self(message.sequence)
    }

    /// The position just before this one (0 stays 0).
    pub fn before(position: Self) -> Self {
        Self((position.0 - 1).max(0))
    }

    /// True for position 0.
    pub fn is_start(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Sequence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_positions_are_refused_with_what_zero_means() {
        assert_eq!(
            Sequence::parse("after_sequence", 0, "x").unwrap(),
            Sequence::START
        );
        assert_eq!(Sequence::parse("after_sequence", 7, "x").unwrap().get(), 7);
        assert_eq!(
            Sequence::parse("after_sequence", i64::MAX, "x")
                .unwrap()
                .get(),
            i64::MAX
        );
        let refused = Sequence::parse("up_to_sequence", -1, "copies every message").unwrap_err();
        assert_eq!(refused.field, "up_to_sequence");
        assert_eq!(
            refused.description,
            "up_to_sequence must not be negative (0 copies every message)"
        );
        assert!(Sequence::parse("after_sequence", i64::MIN, "x").is_err());
    }
}
