//! The event schema, `docs/events.schema.json`: every line an [`Agent`] of
//! the lab writes is held against it, so every integration test checks the
//! stream's format for free.
//!
//! [`Agent`]: crate::Agent

use std::sync::LazyLock;

use serde_json::Value;

/// The schema file, as the agent's users get it.
pub const SCHEMA: &str = include_str!("../../docs/events.schema.json");

/// The compiled schema, formats (`date-time`, `ipv4`, `ipv6`) checked.
pub fn validator() -> &'static jsonschema::Validator {
    static VALIDATOR: LazyLock<jsonschema::Validator> = LazyLock::new(|| {
        let schema: Value = serde_json::from_str(SCHEMA).expect("events.schema.json is JSON");
        jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&schema)
            .unwrap_or_else(|e| panic!("events.schema.json is not a valid schema: {e}"))
    });
    &VALIDATOR
}

/// One stdout line of the agent, parsed and validated; the error names
/// the line and every violation.
pub fn check_line(line: &str) -> Result<Value, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON ({e}): {line}"))?;
    let errors: Vec<String> = validator()
        .iter_errors(&value)
        .map(|e| {
            format!(
                "{e} at /{}",
                e.instance_path().as_str().trim_start_matches('/')
            )
        })
        .collect();
    if errors.is_empty() {
        Ok(value)
    } else {
        Err(format!(
            "does not match docs/events.schema.json: {}\n  line: {line}",
            errors.join("; ")
        ))
    }
}
