//! The report of a run: `report.json` (everything, for machines), `report.md` (the summary a
//! person reads: figures beside their bare ceiling, percentiles, counts, plots) and SVG plots
//! written by hand (a polyline per series on linear axes; no plotting dependency).

use std::fmt::Write as _;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};

use crate::measure::Sample;

/// One headline number, beside the matching bare figure of the same run when there is one.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: String,
    /// The bare (no node) figure it compares with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bare: Option<f64>,
    /// `value / bare` (for times: how many times longer than the ceiling).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub goal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub met: Option<bool>,
}

impl Figure {
    pub fn new(name: &str, value: f64, unit: &str) -> Figure {
        Figure {
            name: name.into(),
            value,
            unit: unit.into(),
            bare: None,
            ratio: None,
            goal: None,
            met: None,
        }
    }

    pub fn vs_bare(mut self, bare: f64) -> Figure {
        self.bare = Some(bare);
        self.ratio = (bare > 0.0).then(|| self.value / bare);
        self
    }

    pub fn goal(mut self, text: &str, met: bool) -> Figure {
        self.goal = Some(text.into());
        self.met = Some(met);
        self
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Plot {
    pub file: String,
    pub title: String,
    pub x: String,
    pub y: String,
    pub series: Vec<Series>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub started_at: DateTime<Utc>,
    pub duration_s: f64,
    pub machine: Value,
    pub params: Value,
    /// `expected` hosts, how many were `counted` (answered / connected) and what went wrong.
    pub counts: Value,
    pub figures: Vec<Figure>,
    /// Summaries of the waves (one command per host) of the run, fleet and bare.
    pub waves: Vec<Value>,
    /// Scenario-specific phases (steady: with and without routed heartbeats).
    pub phases: Vec<Value>,
    pub notes: Vec<String>,
    pub plots: Vec<Plot>,
    pub samples: Vec<Sample>,
}

impl Report {
    pub fn new(scenario: &str, params: Value) -> Report {
        Report {
            scenario: scenario.into(),
            started_at: Utc::now(),
            duration_s: 0.0,
            machine: Value::Null,
            params,
            counts: json!({}),
            figures: Vec::new(),
            waves: Vec::new(),
            phases: Vec::new(),
            notes: Vec::new(),
            plots: Vec::new(),
            samples: Vec::new(),
        }
    }

    /// Writes `report.json`, `report.md` and one SVG per plot into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(self)?)?;
        for p in &self.plots {
            std::fs::write(dir.join(&p.file), svg(p))?;
        }
        std::fs::write(dir.join("report.md"), self.markdown())?;
        Ok(())
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# comodit-loadtest: `{}`\n", self.scenario);
        let _ = writeln!(
            md,
            "Started {} and ran {:.1} s. Machine: {}.\n",
            self.started_at.format("%Y-%m-%d %H:%M:%S UTC"),
            self.duration_s,
            machine_line(&self.machine)
        );
        let _ = writeln!(md, "Parameters: `{}`\n", self.params);
        let _ = writeln!(md, "## Figures\n");
        let _ = writeln!(md, "| figure | value | bare (same run) | ratio | goal |");
        let _ = writeln!(md, "|---|---|---|---|---|");
        for f in &self.figures {
            let _ = writeln!(
                md,
                "| {} | {} {} | {} | {} | {} |",
                f.name,
                num(f.value),
                f.unit,
                f.bare
                    .map_or("—".into(), |b| format!("{} {}", num(b), f.unit)),
                f.ratio.map_or("—".into(), |r| format!("{r:.2}×")),
                match (&f.goal, f.met) {
                    (Some(g), Some(true)) => format!("{g}: met"),
                    (Some(g), Some(false)) => format!("{g}: **not met**"),
                    (Some(g), None) => g.clone(),
                    _ => "—".into(),
                }
            );
        }
        let _ = writeln!(md, "\n## Hosts counted\n\n`{}`\n", self.counts);
        if !self.waves.is_empty() {
            let _ = writeln!(md, "## Waves (one command per host)\n");
            let _ = writeln!(
                md,
                "| wave | answered / expected | failed | until the last answer | throughput | p50 | p90 | p99 | p99.9 | max (ms) | CPU ms per answer: broker / loadtest / node |"
            );
            let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|");
            for w in &self.waves {
                let l = &w["latency_ms"];
                let _ = writeln!(
                    md,
                    "| {} | {} / {} | {} | {:.2} s | {:.0}/s | {} | {} | {} | {} | {} | {} / {} / {} |",
                    w["name"].as_str().unwrap_or("?"),
                    w["answered"],
                    w["expected"],
                    w["failed"],
                    w["elapsed_s"].as_f64().unwrap_or(0.0),
                    w["throughput_per_s"].as_f64().unwrap_or(0.0),
                    ms(&l["p50"]),
                    ms(&l["p90"]),
                    ms(&l["p99"]),
                    ms(&l["p999"]),
                    ms(&l["max"]),
                    cpu(&w["cpu_ms_per_answer"]["broker_ms"]),
                    cpu(&w["cpu_ms_per_answer"]["loadtest_ms"]),
                    cpu(&w["cpu_ms_per_answer"]["node_ms"]),
                );
            }
            md.push('\n');
            let under: Vec<_> = self
                .waves
                .iter()
                .filter(|w| !w["underneath"].is_null())
                .collect();
            if !under.is_empty() {
                let _ = writeln!(
                    md,
                    "### Underneath each wave\n\nThe fleet since the previous wave ended, the node over the wave, the broker at its end.\n"
                );
                for w in under {
                    let _ = writeln!(
                        md,
                        "- {}: `{}`",
                        w["name"].as_str().unwrap_or("?"),
                        w["underneath"]
                    );
                }
                md.push('\n');
            }
        }
        if !self.phases.is_empty() {
            let _ = writeln!(md, "## Phases\n");
            for p in &self.phases {
                let _ = writeln!(md, "- `{p}`");
            }
            md.push('\n');
        }
        if !self.notes.is_empty() {
            let _ = writeln!(md, "## Notes\n");
            for n in &self.notes {
                let _ = writeln!(md, "- {n}");
            }
            md.push('\n');
        }
        if !self.plots.is_empty() {
            let _ = writeln!(md, "## Plots\n");
            for p in &self.plots {
                let _ = writeln!(md, "![{}]({})\n", p.title, p.file);
            }
        }
        md
    }
}

fn ms(v: &Value) -> String {
    v.as_f64().map_or("—".into(), |x| format!("{x:.1}"))
}

/// A CPU time per answer (ms), to three decimals; "—" when not measured.
fn cpu(v: &Value) -> String {
    v.as_f64().map_or("—".into(), |x| format!("{x:.3}"))
}

/// A number with a sensible number of digits.
fn num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn machine_line(m: &Value) -> String {
    format!(
        "{} CPUs, {:.1} GiB, {}, kernel {}, RabbitMQ {}, {} build",
        m["cpus"],
        m["memory_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64,
        m["os"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?"),
        m["rabbitmq"].as_str().unwrap_or("?"),
        m["build"].as_str().unwrap_or("?"),
    )
}

/// What this machine is, for the report.
pub fn machine(broker: &crate::rig::Broker) -> Value {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .unwrap_or("?")
        .trim_matches('"')
        .to_owned();
    let overview = broker.mgmt_get("/api/overview").unwrap_or(Value::Null);
    json!({
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "memory_bytes": mem_kb * 1024,
        "os": os,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "rabbitmq": overview["rabbitmq_version"],
        "erlang": overview["erlang_version"],
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

const W: f64 = 760.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// A line plot of every series of `p` on shared linear axes that start at 0.
pub fn svg(p: &Plot) -> String {
    let pts = p.series.iter().flat_map(|s| s.points.iter());
    let (mut xmax, mut ymax) = (0.0f64, 0.0f64);
    for (x, y) in pts {
        if x.is_finite() {
            xmax = xmax.max(*x);
        }
        if y.is_finite() {
            ymax = ymax.max(*y);
        }
    }
    let xmax = nice(xmax);
    let ymax = nice(ymax);
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let sx = |x: f64| LEFT + x / xmax * pw;
    let sy = |y: f64| TOP + ph - y / ymax * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        W / 2.0,
        esc(&p.title)
    );
    for i in 0..=5 {
        let fx = xmax * i as f64 / 5.0;
        let fy = ymax * i as f64 / 5.0;
        let _ = writeln!(
            s,
            r##"<line x1="{x}" y1="{TOP}" x2="{x}" y2="{b}" stroke="#eee"/><text x="{x}" y="{t}" text-anchor="middle">{l}</text>"##,
            x = sx(fx),
            b = TOP + ph,
            t = TOP + ph + 16.0,
            l = num(fx)
        );
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y}" x2="{r}" y2="{y}" stroke="#eee"/><text x="{t}" y="{ty}" text-anchor="end">{l}</text>"##,
            y = sy(fy),
            r = LEFT + pw,
            t = LEFT - 6.0,
            ty = sy(fy) + 4.0,
            l = num(fy)
        );
    }
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        H - 12.0,
        esc(&p.x)
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        esc(&p.y)
    );
    for (i, series) in p.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = series
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        if path.len() == 1 {
            let _ = writeln!(
                s,
                r#"<circle cx="{}" cy="{}" r="3" fill="{color}"/>"#,
                path[0].split(',').next().unwrap_or("0"),
                path[0].split(',').nth(1).unwrap_or("0")
            );
        } else {
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
                path.join(" ")
            );
        }
        let ly = TOP + 14.0 + 16.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{}" y="{}" width="12" height="3" fill="{color}"/><text x="{}" y="{}">{}</text>"#,
            LEFT + 10.0,
            ly - 4.0,
            LEFT + 28.0,
            ly,
            esc(&series.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The next "round" number ≥ v (1, 2 or 5 × 10^k), and 1 for nothing.
fn nice(v: f64) -> f64 {
    if v.is_nan() || v <= 0.0 {
        return 1.0;
    }
    let e = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * e >= v {
            return m * e;
        }
    }
    10.0 * e
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Latency over time: per time bucket, the median and the max latency of the answers in it.
pub fn latency_over_time(name: &str, points: &[(f64, f64)], buckets: usize) -> Vec<Series> {
    if points.is_empty() {
        return Vec::new();
    }
    let tmax = points.iter().map(|p| p.0).fold(0.0, f64::max).max(1e-3);
    let width = tmax / buckets.max(1) as f64;
    let mut by: Vec<Vec<f64>> = vec![Vec::new(); buckets.max(1) + 1];
    for (t, l) in points {
        by[((t / width) as usize).min(buckets)].push(*l);
    }
    let mut p50 = Vec::new();
    let mut max = Vec::new();
    for (i, mut b) in by.into_iter().enumerate() {
        if b.is_empty() {
            continue;
        }
        b.sort_by(f64::total_cmp);
        let t = (i as f64 + 0.5) * width;
        p50.push((t, b[b.len() / 2]));
        max.push((t, b[b.len() - 1]));
    }
    vec![
        Series {
            name: format!("{name} p50"),
            points: p50,
        },
        Series {
            name: format!("{name} max"),
            points: max,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_rounds_up() {
        assert_eq!(nice(0.0), 1.0);
        assert_eq!(nice(7.0), 10.0);
        assert_eq!(nice(130.0), 200.0);
        assert_eq!(nice(0.03), 0.05);
    }

    #[test]
    fn svg_has_one_line_per_series() {
        let p = Plot {
            file: "x.svg".into(),
            title: "a <b>".into(),
            x: "x".into(),
            y: "y".into(),
            series: vec![
                Series {
                    name: "s1".into(),
                    points: vec![(0.0, 1.0), (1.0, 2.0)],
                },
                Series {
                    name: "s2".into(),
                    points: vec![(0.0, 3.0), (2.0, 1.0)],
                },
            ],
        };
        let s = svg(&p);
        assert_eq!(s.matches("<polyline").count(), 2);
        assert!(s.contains("a &lt;b&gt;"));
        assert!(s.starts_with("<svg"));
    }

    #[test]
    fn ratios_and_goals_show_in_markdown() {
        let mut r = Report::new("apply", json!({"hosts": 10}));
        r.figures.push(
            Figure::new("last answer", 5.0, "s")
                .vs_bare(4.0)
                .goal("≤ 1.25× bare", true),
        );
        let md = r.markdown();
        assert!(md.contains("1.25×"), "{md}");
        assert!(
            md.contains("| last answer | 5.00 s | 4.00 s | 1.25× | ≤ 1.25× bare: met |"),
            "{md}"
        );
    }

    #[test]
    fn buckets_give_median_and_max() {
        let pts = vec![(0.1, 1.0), (0.2, 3.0), (0.3, 2.0), (9.9, 10.0)];
        let s = latency_over_time("x", &pts, 10);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].points[0].1, 2.0);
        assert_eq!(s[1].points[0].1, 3.0);
        assert_eq!(s[1].points.last().unwrap().1, 10.0);
    }
}
