//! The error of a value that breaks a rule: which field, which rule. The core crates return it
//! (or an error that wraps it) wherever an input, a parameter or a command is refused, so that
//! callers can name the field to the user and match on it, rather than parse a message.

use std::fmt;

/// A refused value: the field (a path such as `target.power_w` or `waiting[1].id`) and the rule
/// it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Invalid {
    pub field: String,
    pub rule: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, rule: impl Into<String>) -> Self {
        Invalid { field: field.into(), rule: rule.into() }
    }

    /// The same error with its field under `parent` (`parent.field`).
    pub fn within(self, parent: &str) -> Self {
        Invalid { field: format!("{parent}.{}", self.field), rule: self.rule }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.rule)
    }
}
