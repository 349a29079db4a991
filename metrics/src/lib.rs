//! The Prometheus text exposition (format 0.0.4) that control, gateways and agents serve at
//! `/metrics`: writing families and samples with escaped labels ([`Exposition`]), a latency
//! histogram of atomics ([`Histogram`]), the names a scrape exports ([`exported_names`], for
//! tests that hold a dashboard to what the processes really export) and the process's resident
//! memory ([`resident_memory_bytes`]).
//!
//! This crate formats text and must never serve it or know a process's state: each process
//! owns its counters and its listener (`kakuremichi_node::metrics` serves nodes' metrics,
//! control serves its own from its API router). Its one read is `/proc/self/status`.

use std::collections::BTreeSet;
use std::fmt::{Display, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Upper bounds (seconds) of the latency histograms.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// The type of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (resets when the process restarts).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Cumulative buckets, a sum and a count.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// The text of one scrape, written family by family.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines. Its samples follow.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {}", kind.as_str());
        self
    }

    /// One sample of the family begun last (or, for a histogram, of its `_bucket`, `_sum` or
    /// `_count` series). Label values are escaped.
    pub fn sample(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        value: impl Display,
    ) -> &mut Self {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                self.text.push_str(k);
                self.text.push_str("=\"");
                for c in v.chars() {
                    match c {
                        '\\' => self.text.push_str("\\\\"),
                        '"' => self.text.push_str("\\\""),
                        '\n' => self.text.push_str("\\n"),
                        c => self.text.push(c),
                    }
                }
                self.text.push('"');
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
        self
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: impl Display) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    /// The samples of one histogram series (`_bucket` per bound and `+Inf`, `_sum`, `_count`)
    /// of the family `name` (begun with [`Exposition::family`] and [`Kind::Histogram`]).
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) -> &mut Self {
        let bucket = format!("{name}_bucket");
        let bounds: Vec<String> = h
            .bounds
            .iter()
            .map(ToString::to_string)
            .chain(std::iter::once("+Inf".to_owned()))
            .collect();
        let mut cumulative = 0;
        for (i, le) in bounds.iter().enumerate() {
            cumulative += h.counts[i].load(Ordering::Relaxed);
            let mut with_le: Vec<(&str, &str)> = labels.to_vec();
            with_le.push(("le", le));
            self.sample(&bucket, &with_le, cumulative);
        }
        self.sample(
            &format!("{name}_sum"),
            labels,
            h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        );
        self.sample(&format!("{name}_count"), labels, cumulative)
    }

    /// The text.
    pub fn into_text(self) -> String {
        self.text
    }
}

/// A histogram of durations: a count per bucket (the last is `+Inf`) and the sum, all atomics,
/// so that recording takes no lock.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Box<[AtomicU64]>,
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new(&LATENCY_BUCKETS)
    }
}

impl Histogram {
    /// An empty histogram with these upper bounds (seconds, ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// How many durations were recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// Every metric name an exposition exports: each family named on a `# TYPE` line (with
/// `_bucket`, `_sum` and `_count` for a histogram, `_sum` and `_count` for a summary) and each
/// sample's name.
pub fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            let (Some(name), kind) = (words.next(), words.next()) else {
                continue;
            };
            names.insert(name.to_owned());
            let suffixes: &[&str] = match kind {
                Some("histogram") => &["_bucket", "_sum", "_count"],
                Some("summary") => &["_sum", "_count"],
                _ => &[],
            };
            for s in suffixes {
                names.insert(format!("{name}{s}"));
            }
        } else if !line.is_empty() && !line.starts_with('#') {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// The resident memory of this process (`VmRSS` in `/proc/self/status`), where there is one.
pub fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// [`resident_memory_bytes`] as the usual `process_resident_memory_bytes` gauge (nothing where
/// it cannot be read).
pub fn write_resident_memory(e: &mut Exposition) {
    if let Some(rss) = resident_memory_bytes() {
        e.single(
            "process_resident_memory_bytes",
            Kind::Gauge,
            "Resident memory of the process.",
            rss,
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn families_samples_and_escaped_labels() {
        let mut e = Exposition::new();
        e.family("x_total", Kind::Counter, "Things,\nby name.")
            .sample("x_total", &[("name", "a\"b\\c\nd"), ("class", "2xx")], 3)
            .sample("x_total", &[], 4);
        e.single("y", Kind::Gauge, "A gauge.", 1.5);
        assert_eq!(
            e.into_text(),
            "# HELP x_total Things,\\nby name.\n# TYPE x_total counter\n\
             x_total{name=\"a\\\"b\\\\c\\nd\",class=\"2xx\"} 3\nx_total 4\n\
             # HELP y A gauge.\n# TYPE y gauge\ny 1.5\n"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_sum_and_count() {
        static BOUNDS: [f64; 2] = [0.01, 1.0];
        let h = Histogram::new(&BOUNDS);
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_secs(3));
        assert_eq!(h.count(), 3);
        let mut e = Exposition::new();
        e.family("lat_seconds", Kind::Histogram, "Latency.")
            .histogram("lat_seconds", &[("route", "r")], &h);
        let text = e.into_text();
        for line in [
            "lat_seconds_bucket{route=\"r\",le=\"0.01\"} 1\n",
            "lat_seconds_bucket{route=\"r\",le=\"1\"} 2\n",
            "lat_seconds_bucket{route=\"r\",le=\"+Inf\"} 3\n",
            "lat_seconds_sum{route=\"r\"} 3.505\n",
            "lat_seconds_count{route=\"r\"} 3\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn exported_names_include_typed_families_and_their_series() {
        let text = "# HELP a_total A.\n# TYPE a_total counter\n\
                    # TYPE h_seconds histogram\n\
                    # TYPE s summary\n\
                    b{x=\"1\"} 2\nc 3\n";
        let names: Vec<String> = exported_names(text).into_iter().collect();
        assert_eq!(
            names,
            [
                "a_total",
                "b",
                "c",
                "h_seconds",
                "h_seconds_bucket",
                "h_seconds_count",
                "h_seconds_sum",
                "s",
                "s_count",
                "s_sum"
            ]
        );
    }

    #[test]
    fn resident_memory_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            let rss = resident_memory_bytes().unwrap();
            assert!(rss > 1024 * 1024, "{rss}");
            let mut e = Exposition::new();
            write_resident_memory(&mut e);
            assert!(e.into_text().contains("\nprocess_resident_memory_bytes "));
        }
    }
}
