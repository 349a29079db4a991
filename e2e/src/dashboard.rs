//! Holding the Grafana dashboard (`deploy/grafana/kakuremichi.json`) to what the processes
//! export: the metric names each PromQL query reads ([`metric_names`]), every query of a
//! dashboard with where it stands ([`queries`]), and the names no scrape exported
//! ([`unexported`]).
//!
//! The extractor is a small PromQL lexer, not a full parser: it passes over strings, numbers and
//! durations, Grafana variables (`$__rate_interval`, `${gateway}`), label matchers in `{}`, ranges
//! in `[]`, the label lists of `by`, `without`, `on`, `ignoring`, `group_left` and
//! `group_right`, operators and keywords; every other identifier is a function (when one of
//! PromQL's) or a metric name. An identifier called like a function that PromQL does not have is
//! an error, so a misspelled function does not pass as a metric either.

use std::collections::BTreeSet;

use serde_json::Value;

/// PromQL's aggregation operators (they may take `by (...)` before their parentheses).
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// PromQL's functions.
const FUNCTIONS: &[&str] = &[
    "abs",
    "absent",
    "absent_over_time",
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atanh",
    "avg_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "cos",
    "cosh",
    "count_over_time",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "deg",
    "delta",
    "deriv",
    "exp",
    "floor",
    "histogram_avg",
    "histogram_count",
    "histogram_fraction",
    "histogram_quantile",
    "histogram_stddev",
    "histogram_stdvar",
    "histogram_sum",
    "holt_winters",
    "hour",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log10",
    "log2",
    "mad_over_time",
    "max_over_time",
    "min_over_time",
    "minute",
    "month",
    "pi",
    "predict_linear",
    "present_over_time",
    "quantile_over_time",
    "rad",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sin",
    "sinh",
    "sort",
    "sort_by_label",
    "sort_by_label_desc",
    "sort_desc",
    "sqrt",
    "stddev_over_time",
    "stdvar_over_time",
    "sum_over_time",
    "tan",
    "tanh",
    "time",
    "timestamp",
    "vector",
    "year",
];

/// Keywords followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Other words that are not metric names.
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "start", "end",
];

/// The metric names a PromQL expression reads, or why it cannot be read.
pub fn metric_names(expr: &str) -> Result<BTreeSet<String>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => i = skip_string(&chars, i)?,
            '{' => {
                let end = skip_group(&chars, i, '{', '}')?;
                // `{__name__="x"}` names a metric inside the braces.
                let inside: String = chars[i + 1..end - 1].iter().collect();
                if let Some(rest) = inside.trim_start().strip_prefix("__name__") {
                    if let Some(value) = rest.trim_start().strip_prefix('=') {
                        let value = value.trim_start();
                        if let Some(q) = value.chars().next().filter(|q| *q == '"' || *q == '\'') {
                            if let Some(name) = value[1..].split(q).next() {
                                names.insert(name.to_owned());
                            }
                        }
                    }
                }
                i = end;
            }
            '[' => i = skip_group(&chars, i, '[', ']')?,
            '$' => {
                // Grafana variables: $name, ${name}, ${name:format}.
                i += 1;
                if chars.get(i) == Some(&'{') {
                    i = skip_group(&chars, i, '{', '}')?;
                } else {
                    while i < chars.len() && is_word(chars[i]) {
                        i += 1;
                    }
                }
            }
            c if c.is_ascii_digit()
                || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                // Numbers, hex, exponents and durations such as 1h30m.
                while i < chars.len() && (is_word(chars[i]) || chars[i] == '.') {
                    if (chars[i] == 'e' || chars[i] == 'E')
                        && matches!(chars.get(i + 1), Some('+' | '-'))
                    {
                        i += 1;
                    }
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len() && is_word(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let next = next_non_space(&chars, i);
                let called = next.is_some_and(|j| chars[j] == '(');
                let lower = word.to_ascii_lowercase();
                if LABEL_LISTS.contains(&lower.as_str()) {
                    if let Some(j) = next.filter(|_| called) {
                        i = skip_group(&chars, j, '(', ')')?;
                    }
                } else if AGGREGATIONS.contains(&lower.as_str())
                    || KEYWORDS.contains(&lower.as_str())
                {
                    // An operator or keyword, never a metric.
                } else if called {
                    if !FUNCTIONS.contains(&word.as_str()) {
                        return Err(format!("{word}() is not a PromQL function"));
                    }
                } else {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    Ok(names)
}

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn next_non_space(chars: &[char], mut i: usize) -> Option<usize> {
    while i < chars.len() && chars[i].is_whitespace() {
        i += 1;
    }
    (i < chars.len()).then_some(i)
}

/// The index after the string that starts at `start`.
fn skip_string(chars: &[char], start: usize) -> Result<usize, String> {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' if quote != '`' => i += 2,
            c if c == quote => return Ok(i + 1),
            _ => i += 1,
        }
    }
    Err("a string is not closed".into())
}

/// The index after the group that opens at `start` (strings inside are passed over).
fn skip_group(chars: &[char], start: usize, open: char, close: char) -> Result<usize, String> {
    let mut depth = 0;
    let mut i = start;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(chars, i)?;
            continue;
        }
        if c == open {
            depth += 1;
        } else if c == close {
            depth -= 1;
            if depth == 0 {
                return Ok(i + 1);
            }
        }
        i += 1;
    }
    Err(format!("a {open} is not closed"))
}

/// One query of a dashboard: where it stands (a panel's title, or a variable's name) and its
/// PromQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The panel or variable.
    pub place: String,
    /// The PromQL.
    pub expr: String,
}

/// Every query of a Grafana dashboard: each `expr` of each panel's targets (rows' nested panels
/// too), and each query variable's `label_values(metric, label)` or `query_result(expr)`.
pub fn queries(dashboard: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    collect_exprs(dashboard, "dashboard", &mut out);
    let variables = dashboard
        .pointer("/templating/list")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for v in variables {
        if v.get("type").and_then(Value::as_str) != Some("query") {
            continue;
        }
        let name = v.get("name").and_then(Value::as_str).unwrap_or("?");
        let query = match v.get("query") {
            Some(Value::String(q)) => q.clone(),
            Some(q) => q
                .get("query")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            None => String::new(),
        };
        let query = query.trim();
        let expr = if let Some(args) = query
            .strip_prefix("label_values(")
            .and_then(|a| a.strip_suffix(')'))
        {
            // label_values(label) names no metric; label_values(selector, label) does.
            args.rsplit_once(',')
                .map(|(selector, _)| selector.to_owned())
        } else {
            query
                .strip_prefix("query_result(")
                .and_then(|a| a.strip_suffix(')'))
                .map(str::to_owned)
        };
        if let Some(expr) = expr {
            out.push(Query {
                place: format!("variable {name}"),
                expr,
            });
        }
    }
    out
}

fn collect_exprs(v: &Value, place: &str, out: &mut Vec<Query>) {
    match v {
        Value::Object(map) => {
            let place = map
                .get("title")
                .and_then(Value::as_str)
                .filter(|_| map.contains_key("gridPos"))
                .unwrap_or(place);
            if let Some(Value::String(expr)) = map.get("expr") {
                out.push(Query {
                    place: place.to_owned(),
                    expr: expr.clone(),
                });
            }
            for (key, child) in map {
                if key != "templating" {
                    collect_exprs(child, place, out);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                collect_exprs(item, place, out);
            }
        }
        _ => {}
    }
}

/// Each query of `dashboard` that reads a metric not in `exported`, or cannot be read, with the
/// name (or the reason).
pub fn unexported(dashboard: &Value, exported: &BTreeSet<String>) -> Vec<(Query, String)> {
    let mut out = Vec::new();
    for q in queries(dashboard) {
        match metric_names(&q.expr) {
            Ok(names) if names.is_empty() => out.push((q, "reads no metric".into())),
            Ok(names) => {
                for name in names {
                    if !exported.contains(&name) {
                        out.push((q.clone(), name));
                    }
                }
            }
            Err(why) => out.push((q, why)),
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names(expr: &str) -> Vec<String> {
        metric_names(expr).unwrap().into_iter().collect()
    }

    #[test]
    fn metric_names_leave_out_functions_labels_variables_and_literals() {
        assert_eq!(
            names(
                "histogram_quantile(0.99, sum by (le, resource_id) \
                 (rate(kakuremichi_gateway_resource_response_seconds_bucket{instance=~\"$gateway\", class!=\"5xx\"}[$__rate_interval])))"
            ),
            ["kakuremichi_gateway_resource_response_seconds_bucket"]
        );
        assert_eq!(
            names(
                "scalar(max(kakuremichi_config_version)) - kakuremichi_agent_config_version{instance=~\"${agent:regex}\"} offset 1h30m"
            ),
            ["kakuremichi_agent_config_version", "kakuremichi_config_version"]
        );
        assert_eq!(
            names(
                "process_resident_memory_bytes and on (instance) group_left(job) up > bool 1e3 \
                 or sum without (le) (x:recorded:rate5m) * 0.5 unless vector(1)"
            ),
            ["process_resident_memory_bytes", "up", "x:recorded:rate5m"]
        );
        assert_eq!(
            names(
                "label_replace(a_total, \"dst\", \"$1 by (x)\", \"src\", \"(.*)\") / ignoring(z) \
                 {__name__=\"b_total\", job='j'} + min_over_time(c[5m:30s]) - time()"
            ),
            ["a_total", "b_total", "c"]
        );
        assert_eq!(
            names("sum(rate(m[5m])) by (kind) / count(n) BY (kind)"),
            ["m", "n"]
        );
    }

    #[test]
    fn a_misspelled_function_or_a_broken_expression_is_an_error() {
        assert!(metric_names("rat(x[5m])").unwrap_err().contains("rat()"));
        assert!(metric_names("sum(x{a=\"b})").is_err());
        assert!(metric_names("rate(x[5m)").is_err());
    }

    #[test]
    fn a_dashboard_naming_a_metric_nobody_exports_is_caught() {
        let dashboard = json!({
            "panels": [
                {"type": "row", "title": "Row", "gridPos": {}, "panels": [
                    {"title": "Nested", "gridPos": {}, "targets": [
                        {"expr": "sum(rate(kakuremichi_gateway_no_such_metric_total[5m]))"}
                    ]}
                ]},
                {"title": "Good", "gridPos": {}, "targets": [
                    {"expr": "histogram_quantile(0.5, sum by (le) (rate(h_seconds_bucket[5m])))"},
                    {"expr": "h_seconds_sum / h_seconds_count"}
                ]},
                {"title": "Typo", "gridPos": {}, "targets": [{"expr": "rat(a_total[5m])"}]},
                {"title": "Constant", "gridPos": {}, "targets": [{"expr": "vector(1)"}]}
            ],
            "templating": {"list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {"name": "gw", "type": "query",
                 "query": {"query": "label_values(missing_gauge{job=\"x\"}, instance)"}},
                {"name": "all", "type": "query", "query": "label_values(instance)"}
            ]}
        });
        let exported = kakuremichi_metrics::exported_names(
            "# TYPE h_seconds histogram\n# TYPE a_total counter\na_total 1\n",
        );
        let bad: Vec<(String, String)> = unexported(&dashboard, &exported)
            .into_iter()
            .map(|(q, name)| (q.place, name))
            .collect();
        assert_eq!(
            bad,
            [
                (
                    "Nested".to_owned(),
                    "kakuremichi_gateway_no_such_metric_total".to_owned()
                ),
                (
                    "Typo".to_owned(),
                    "rat() is not a PromQL function".to_owned()
                ),
                ("Constant".to_owned(), "reads no metric".to_owned()),
                ("variable gw".to_owned(), "missing_gauge".to_owned()),
            ]
        );
    }
}
