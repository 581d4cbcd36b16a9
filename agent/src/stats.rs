//! The agent's counters, in Prometheus text format.
//!
//! The agent listens on no port (DESIGN §12), so its metrics are written as a Prometheus textfile
//! (`<state_dir>/metrics.prom`, for node_exporter's textfile collector) and are readable in-process by
//! tests. Names follow `comodit_agent_<name>_total`.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// A counter's name and its label pairs.
type Key = (String, Vec<(String, String)>);

#[derive(Default)]
pub struct Stats {
    counters: Mutex<BTreeMap<Key, u64>>,
}

impl Stats {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one to `comodit_agent_<name>_total{labels}`.
    pub fn inc(&self, name: &str, labels: &[(&str, &str)]) {
        let key = (
            name.to_owned(),
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        *self.counters.lock().unwrap().entry(key).or_default() += 1;
    }

    /// The value of one counter (0 if never incremented).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let key = (
            name.to_owned(),
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>(),
        );
        self.counters
            .lock()
            .unwrap()
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    /// The sum of a counter over all its labels.
    pub fn sum(&self, name: &str) -> u64 {
        self.counters
            .lock()
            .unwrap()
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(_, v)| *v)
            .sum()
    }

    pub fn render(&self) -> String {
        let counters = self.counters.lock().unwrap();
        let mut out = String::new();
        let mut last = "";
        for ((name, labels), value) in counters.iter() {
            if name != last {
                out.push_str(&format!("# TYPE comodit_agent_{name}_total counter\n"));
                last = name;
            }
            let labels: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
                .collect();
            if labels.is_empty() {
                out.push_str(&format!("comodit_agent_{name}_total {value}\n"));
            } else {
                out.push_str(&format!(
                    "comodit_agent_{name}_total{{{}}} {value}\n",
                    labels.join(",")
                ));
            }
        }
        out
    }

    /// Writes the textfile atomically.
    pub fn write_textfile(&self, path: &std::path::Path) -> std::io::Result<()> {
        let tmp = path.with_extension("prom.tmp");
        std::fs::write(&tmp, self.render())?;
        std::fs::rename(tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let s = Stats::new();
        s.inc("rejected", &[("reason", "malformed")]);
        s.inc("rejected", &[("reason", "malformed")]);
        s.inc("rejected", &[("reason", "stale_epoch")]);
        s.inc("commands", &[]);
        assert_eq!(s.get("rejected", &[("reason", "malformed")]), 2);
        assert_eq!(s.sum("rejected"), 3);
        let text = s.render();
        assert!(
            text.contains("comodit_agent_rejected_total{reason=\"malformed\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("comodit_agent_commands_total 1\n"), "{text}");
        assert_eq!(
            text.matches("# TYPE comodit_agent_rejected_total").count(),
            1
        );
    }
}
