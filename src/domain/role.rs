use super::FieldViolation;

/// Who wrote a message. There is no "unspecified" role: every stored message
/// has one of these five.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    User,
    Assistant,
    System,
    Tool,
    Developer,
}

impl Role {
    /// Parses the wire number of `convo.v1.Role` (also the stored value).
    pub fn parse(field: &str, number: i32) -> Result<Self, FieldViolation> {
        match number {
            1 => Ok(Self::User),
            2 => Ok(Self::Assistant),
            3 => Ok(Self::System),
            4 => Ok(Self::Tool),
            5 => Ok(Self::Developer),
            0 => Err(FieldViolation::new(
                field,
                "role is required: ROLE_USER, ROLE_ASSISTANT, ROLE_SYSTEM, ROLE_TOOL or ROLE_DEVELOPER",
            )),
            other => Err(FieldViolation::new(
                field,
                format!(
                    "unknown role {other}: expected ROLE_USER, ROLE_ASSISTANT, ROLE_SYSTEM, ROLE_TOOL or ROLE_DEVELOPER"
                ),
            )),
        }
    }

    /// The wire number of `convo.v1.Role`, which is also the stored value.
    pub fn number(self) -> i32 {
        match self {
            Self::User => 1,
            Self::Assistant => 2,
            Self::System => 3,
            Self::Tool => 4,
            Self::Developer => 5,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_round_trips_through_its_number() {
        for role in [
            Role::User,
            Role::Assistant,
            Role::System,
            Role::Tool,
            Role::Developer,
        ] {
            assert_eq!(Role::parse("role", role.number()).unwrap(), role);
        }
    }

    #[test]
    fn unspecified_and_unknown_numbers_are_rejected() {
        for bad in [0, 6, -1, i32::MAX] {
            assert_eq!(Role::parse("role", bad).unwrap_err().field, "role");
        }
    }
}
