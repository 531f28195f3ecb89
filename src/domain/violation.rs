use std::fmt;

/// One reason a request field was rejected, named the way a client sees it
/// (`messages[2].content`), with a sentence a person can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

impl fmt::Display for FieldViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.description)
    }
}

/// A request refused for what it holds: every violation found, each naming
/// its field. The gRPC edge turns it into `INVALID_ARGUMENT` with
/// `google.rpc.BadRequest` details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest(Vec<FieldViolation>);

impl BadRequest {
    pub fn violations(&self) -> &[FieldViolation] {
        &self.0
    }
}

impl From<FieldViolation> for BadRequest {
    fn from(violation: FieldViolation) -> Self {
        Self(vec![violation])
    }
}

/// Collects every violation of a request, so a client learns all that is wrong
/// with it in one reply instead of one round trip per mistake.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps the parsed value, or records why it could not be parsed.
    pub fn check<T>(&mut self, parsed: Result<T, FieldViolation>) -> Option<T> {
        match parsed {
            Ok(value) => Some(value),
            Err(violation) => {
                self.0.push(violation);
                None
            }
        }
    }

    pub fn push(&mut self, violation: FieldViolation) {
        self.0.push(violation);
    }

    /// How many violations were recorded so far.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(value)` when nothing was recorded; every recorded violation otherwise.
    /// `value` is only built when there is nothing to report, so it may unwrap
    /// the options that `check` returned.
    pub fn finish<T>(self, value: impl FnOnce() -> Option<T>) -> Result<T, BadRequest> {
        if !self.0.is_empty() {
            return Err(BadRequest(self.0));
        }
        value().ok_or_else(|| {
            BadRequest::from(FieldViolation::new(
                "request",
                "the request could not be read",
            ))
        })
    }
}
