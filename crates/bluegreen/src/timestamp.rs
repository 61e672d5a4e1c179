//! Event times as people read them: RFC 3339 in UTC, to the second.

/// RFC 3339 UTC time, to the second, from Unix milliseconds.
pub fn utc_time(at_ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(at_ms.max(0) as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}
