//! Reading Prometheus text exposition: series name with labels → value.

use std::collections::BTreeMap;

/// Parses Prometheus text format into `series → value`, where `series` is written
/// exactly as in the text (`name{label="v",...}` or just `name`). Comment and blank
/// lines are skipped; timestamps after the value are ignored.
pub fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // The series ends at the closing brace if there are labels (label values may
        // contain spaces), else at the first space.
        let split = match (line.find('{'), line.rfind('}')) {
            (Some(open), Some(close)) if open < close => close + 1,
            _ => match line.find(' ') {
                Some(i) => i,
                None => continue,
            },
        };
        let (series, rest) = line.split_at(split);
        let Some(value) = rest.split_whitespace().next() else {
            continue;
        };
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => match v.parse() {
                Ok(v) => v,
                Err(_) => continue,
            },
        };
        out.insert(series.trim().to_string(), value);
    }
    out
}

/// The lines of `text` whose metric name is `family` (or starts with it), for error
/// messages that show what *is* there when an expected series is missing.
pub fn family_lines(text: &str, series: &str) -> String {
    let family = series.split('{').next().unwrap_or(series);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(family))
        .collect();
    if lines.is_empty() {
        format!("(no `{family}` series at all)")
    } else {
        lines.join("\n")
    }
}

/// Asserts that every metric family on a `/stats` page is documented: in
/// docs/metrics.md (a cluster's and an endpoint's by counter name, without the
/// `legate_cluster_` / `legate_endpoint_` prefix), or, for a first-party plugin's
/// own `legate_plugin_*` metric, in that plugin's README; and that each has a
/// `# HELP` line on the page (the cluster and endpoint families with text).
/// Tests whose
/// configurations register families the default config does not (Redis KV, the
/// compile cache, proxy-wasm gRPC streams) call it too, so a family added
/// without its documentation fails a test.
pub fn assert_families_documented(stats: &str) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let read = |p: &str| {
        std::fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("reading {p}: {e}"))
    };
    let docs = read("docs/metrics.md");
    let readmes: String = ["auth", "ratelimit", "grpc-web", "grpc-json"]
        .iter()
        .map(|p| read(&format!("plugins/{p}/README.md")))
        .collect();
    let mut missing = Vec::new();
    let mut no_help = Vec::new();
    for line in stats.lines() {
        let Some(family) = line
            .strip_prefix("# TYPE ")
            .and_then(|t| t.split(' ').next())
        else {
            continue;
        };
        let found = if let Some(c) = family
            .strip_prefix("legate_cluster_")
            .or_else(|| family.strip_prefix("legate_endpoint_"))
        {
            docs.contains(&format!("`{c}`"))
        } else {
            docs.contains(&format!("`{family}`"))
                || family
                    .strip_prefix("legate_plugin_")
                    .is_some_and(|own| readmes.contains(own))
        };
        if !found {
            missing.push(family);
        }
        // And on the page itself: a `# HELP` line (with text for the host's
        // cluster and endpoint families, whose help is their doc comment).
        let help = stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("# HELP {family} ")));
        let needs_text =
            family.starts_with("legate_cluster_") || family.starts_with("legate_endpoint_");
        if help.is_none() || (needs_text && help.is_some_and(|h| h.trim().is_empty())) {
            no_help.push(family);
        }
    }
    assert!(
        missing.is_empty(),
        "metric families on /stats not in docs/metrics.md: {missing:?}"
    );
    assert!(
        no_help.is_empty(),
        "metric families on /stats without a # HELP line: {no_help:?}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_series() {
        let text = "# HELP a A.\n# TYPE a counter\na{x=\"1 2\",y=\"z\"} 3\nb 4.5\nc{le=\"+Inf\"} +Inf\n\nd 7 1700000000\n";
        let m = parse_prometheus(text);
        assert_eq!(m["a{x=\"1 2\",y=\"z\"}"], 3.0);
        assert_eq!(m["b"], 4.5);
        assert!(m["c{le=\"+Inf\"}"].is_infinite());
        assert_eq!(m["d"], 7.0);
        assert_eq!(m.len(), 4);
        assert_eq!(family_lines(text, "a{x=\"9\"}"), "a{x=\"1 2\",y=\"z\"} 3");
    }
}
