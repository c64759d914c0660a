//! The operator's series that the alert rules read, with the label names a scrape of a running
//! operator shows (the `instance` and `job` labels Prometheus adds aside). The promtool test of the
//! alerts (tests/install.rs) builds its input series with exactly these label sets, and the test
//! that scrapes a running operator (tests/cli.rs) checks that the scrape shows them, so the alert
//! test cannot feed a series the operator never exports.

pub const ALERT_INPUTS: &[(&str, &[&str])] = &[
    (
        "mailintegration_access_token_expiry_timestamp_seconds",
        &["name", "namespace"],
    ),
    (
        "mailintegration_next_refresh_timestamp_seconds",
        &["name", "namespace"],
    ),
    ("mailintegration_suspended", &["name", "namespace"]),
    (
        "mailintegration_ready_status",
        &["condition", "name", "namespace"],
    ),
    (
        "mailintegration_ready_reason_info",
        &["name", "namespace", "reason"],
    ),
    (
        "mailintegration_mailbox_connected_status",
        &["condition", "name", "namespace"],
    ),
    (
        "mailintegration_client_secret_expiry_timestamp_seconds",
        &["name", "namespace"],
    ),
];

/// Series the alerts read that the scrape of tests/cli.rs cannot show: the grant's announced end
/// exists only for Google apps in Testing status. Served by the same loop as
/// `mailintegration_access_token_expiry_timestamp_seconds` (TIME_GAUGES in src/metrics/objects.rs,
/// whose unit test shows its series), so with its labels.
pub const ALERT_INPUTS_NOT_SCRAPED: &[(&str, &[&str])] = &[(
    "mailintegration_grant_expiry_timestamp_seconds",
    &["name", "namespace"],
)];

/// The metric name and sorted label names of one series in the exposition (or promtool) format,
/// e.g. `up{job="a",namespace="b"} 1` gives `("up", ["job", "namespace"])`. Label values may hold
/// escaped quotes; `None` for comments and blank lines.
pub fn series_labels(line: &str) -> Option<(String, Vec<String>)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = line[..name_end].to_owned();
    let mut labels = Vec::new();
    if line[name_end..].starts_with('{') {
        let mut rest = &line[name_end + 1..];
        loop {
            rest = rest.trim_start_matches([',', ' ']);
            if rest.starts_with('}') || rest.is_empty() {
                break;
            }
            let eq = rest.find('=')?;
            labels.push(rest[..eq].trim().to_owned());
            // Skip the quoted value.
            let value = rest[eq + 1..].strip_prefix('"')?;
            let mut end = None;
            let mut escaped = false;
            for (i, c) in value.char_indices() {
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '"' => {
                        end = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            rest = &value[end? + 1..];
        }
    }
    labels.sort();
    Some((name, labels))
}
