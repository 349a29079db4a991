//! Times as the API writes them: RFC 3339 in UTC with milliseconds (`2026-05-02T12:00:00.000Z`).
//! The store keeps unix milliseconds; the API's views serialize them with [`ms`] and
//! [`opt_ms`] (`#[serde(serialize_with = "crate::times::ms")]`).

pub use kakuremichi_proto::time::{parse_time_ms, rfc3339, rfc3339_ms};

/// The schema of a time the API writes: a string in the `date-time` format (RFC 3339).
/// (`#[schemars(with = "crate::times::DateTime")]`.)
#[derive(Debug)]
pub struct DateTime;

impl schemars::JsonSchema for DateTime {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "DateTime".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "format": "date-time"})
    }
}

/// serde: a unix-ms time as RFC 3339.
pub fn ms<S: serde::Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339_ms(*ms))
}

/// serde: an optional unix-ms time as RFC 3339 or `null`.
pub fn opt_ms<S: serde::Serializer>(ms: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    match ms {
        Some(ms) => s.serialize_str(&rfc3339_ms(*ms)),
        None => s.serialize_none(),
    }
}

/// serde: an optional time given as RFC 3339 or as unix ms (a query's `since`).
pub fn de_opt_ms<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    use serde::Deserialize as _;
    let raw: Option<String> = Option::deserialize(d)?;
    raw.map(|s| {
        parse_time_ms(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{s:?} is not a time: give RFC 3339 (2026-05-02T12:00:00Z) or unix milliseconds"
            ))
        })
    })
    .transpose()
}
