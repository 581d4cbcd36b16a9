//! What a run measures: waves of one command per host (latency per host, time until the last
//! answer) and samples of the processes underneath (node, broker, the loadtest itself).

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{json, Value};

/// One command to every host and what came back.
pub struct Wave {
    pub name: String,
    pub expected: usize,
    pub answered: usize,
    /// Answered, but not `ok` (injected failures, API errors).
    pub failed: usize,
    /// From the first command sent to the last answer.
    pub elapsed: Duration,
    /// Microseconds per host, from its command's send (or scheduled start) to its answer.
    pub latency: Histogram<u64>,
    /// (seconds since the wave began, latency in ms) per answer, for the latency-over-time plot.
    pub points: Vec<(f64, f64)>,
    /// CPU time per answer of the processes underneath, over the wave ([`CpuMeter`]).
    pub cpu: Option<CpuPerAnswer>,
    /// What happened underneath ([`crate::probe::Probe`]), where it was read.
    pub underneath: Option<Value>,
}

/// Milliseconds of CPU time per answer over one wave: the broker's, this process's (the
/// simulated fleet and the driver or API client), the node(s)' (absent in bare waves).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct CpuPerAnswer {
    pub broker_ms: Option<f64>,
    pub loadtest_ms: f64,
    pub node_ms: Option<f64>,
}

/// Reads the CPU time of the broker, this process and the node(s) at the start of a wave; `end`
/// divides what each used by the wave's answers.
pub struct CpuMeter {
    broker: Option<(u32, u64)>,
    me: u64,
    nodes: Vec<u32>,
    nodes_at: u64,
}

impl CpuMeter {
    pub fn start(nodes: &[u32]) -> CpuMeter {
        let broker = broker_pid().and_then(|p| proc_stat(p).map(|(t, _)| (p, t)));
        CpuMeter {
            broker,
            me: proc_stat(std::process::id()).map_or(0, |x| x.0),
            nodes: nodes.to_vec(),
            nodes_at: ticks_of(nodes),
        }
    }

    pub fn end(&self, answers: usize) -> CpuPerAnswer {
        let ms = |ticks: u64| ticks as f64 / ticks_per_s() * 1000.0 / answers.max(1) as f64;
        let me = proc_stat(std::process::id()).map_or(0, |x| x.0);
        CpuPerAnswer {
            broker_ms: self
                .broker
                .and_then(|(p, t)| proc_stat(p).map(|(now, _)| ms(now.saturating_sub(t)))),
            loadtest_ms: ms(me.saturating_sub(self.me)),
            node_ms: (!self.nodes.is_empty())
                .then(|| ms(ticks_of(&self.nodes).saturating_sub(self.nodes_at))),
        }
    }
}

fn ticks_of(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| proc_stat(*p)).map(|x| x.0).sum()
}

impl Wave {
    pub fn new(name: &str, expected: usize) -> Wave {
        Wave {
            name: name.to_owned(),
            expected,
            answered: 0,
            failed: 0,
            elapsed: Duration::ZERO,
            latency: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
            points: Vec::with_capacity(expected),
            cpu: None,
            underneath: None,
        }
    }

    pub fn record(&mut self, at: Duration, latency: Duration, ok: bool) {
        let us = (latency.as_micros() as u64).max(1);
        let _ = self.latency.record(us.min(3_600_000_000));
        self.points
            .push((at.as_secs_f64(), latency.as_secs_f64() * 1000.0));
        self.answered += 1;
        if !ok {
            self.failed += 1;
        }
    }

    /// The wave ends at its last answer; `otherwise` (the time spent) when none came.
    pub fn end_at_last_answer(&mut self, otherwise: Duration) {
        self.elapsed = self
            .points
            .iter()
            .map(|p| Duration::from_secs_f64(p.0))
            .max()
            .unwrap_or(otherwise);
    }

    /// Answers per second over the whole wave.
    pub fn throughput(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.answered as f64 / s
        } else {
            0.0
        }
    }

    /// "<name>: <answered> of <expected> answered in <s> s (<n>/s)": what a scenario prints when
    /// a wave ends.
    pub fn done_line(&self) -> String {
        format!(
            "{}: {} of {} answered in {:.2} s ({:.0}/s)",
            self.name,
            self.answered,
            self.expected,
            self.elapsed.as_secs_f64(),
            self.throughput()
        )
    }

    pub fn summary(&self) -> Value {
        json!({
            "name": self.name,
            "expected": self.expected,
            "answered": self.answered,
            "unanswered": self.expected.saturating_sub(self.answered),
            "failed": self.failed,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "throughput_per_s": self.throughput(),
            "latency_ms": percentiles(&self.latency),
            "cpu_ms_per_answer": self.cpu,
            "underneath": self.underneath,
        })
    }
}

/// The wave of median duration (the shorter of the two middle ones for an even count). Panics
/// on an empty slice.
pub fn median_wave(waves: &[Wave]) -> &Wave {
    let mut by_time: Vec<&Wave> = waves.iter().collect();
    by_time.sort_by_key(|w| w.elapsed);
    by_time[(by_time.len() - 1) / 2]
}

/// `base` alone for a single wave, `base i/n` (from 1) when there are several.
pub fn wave_name(base: &str, i: usize, n: usize) -> String {
    if n <= 1 {
        base.to_owned()
    } else {
        format!("{base} {}/{n}", i + 1)
    }
}

/// p50/p90/p99/p99.9/max/mean of a histogram of microseconds, in milliseconds.
pub fn percentiles(h: &Histogram<u64>) -> Value {
    let ms = |v: u64| v as f64 / 1000.0;
    if h.is_empty() {
        return json!({"count": 0});
    }
    json!({
        "count": h.len(),
        "p50": ms(h.value_at_quantile(0.5)),
        "p90": ms(h.value_at_quantile(0.9)),
        "p99": ms(h.value_at_quantile(0.99)),
        "p999": ms(h.value_at_quantile(0.999)),
        "max": ms(h.max()),
        "mean": h.mean() / 1000.0,
    })
}

/// One look at the processes.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Sample {
    pub t_s: f64,
    /// CPU used since the previous sample, in % of one core; RSS in bytes.
    pub node_cpu_pct: f64,
    pub node_rss: u64,
    pub broker_cpu_pct: f64,
    pub broker_rss: u64,
    pub self_cpu_pct: f64,
    pub self_rss: u64,
    /// What the scenario says is connected / alive at that moment (hosts).
    pub hosts: u64,
}

/// CPU ticks (user + system) and RSS of a process, from `/proc`.
pub fn proc_stat(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?;
    Some((ticks, rss_kb * 1024))
}

/// The broker's Erlang VM (`beam.smp`), found by its command name.
pub fn broker_pid() -> Option<u32> {
    let mut found = None;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim() == "beam.smp")
        {
            // `rabbitmqctl` runs in a beam.smp too; the server is the one booting `rabbit`.
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd).contains("-s\0rabbit\0boot") {
                found = Some(pid);
            }
        }
    }
    found
}

fn ticks_per_s() -> f64 {
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Samples node(s), broker and self every `every` into a shared vector until stopped.
pub struct Sampler {
    pub samples: std::sync::Arc<std::sync::Mutex<Vec<Sample>>>,
    pub hosts: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pids: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
    stop: tokio_util::sync::CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Sampler {
    /// Samples every `every`; `t_s` of a sample counts from `base` (the run's start, so the
    /// scenarios' phase windows and the samples share one clock).
    pub fn start(node_pids: Vec<u32>, every: Duration, base: Instant) -> Sampler {
        let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let hosts = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let pids = std::sync::Arc::new(std::sync::Mutex::new(node_pids));
        let stop = tokio_util::sync::CancellationToken::new();
        let (s, h, p, st) = (samples.clone(), hosts.clone(), pids.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let hz = ticks_per_s();
            let me = std::process::id();
            let broker = broker_pid();
            let start = base;
            let read = |pids: &[u32]| -> (u64, u64) {
                pids.iter()
                    .filter_map(|p| proc_stat(*p))
                    .fold((0, 0), |(t, r), (t2, r2)| (t + t2, r + r2))
            };
            let mut last_t = Instant::now();
            let mut last = (
                read(&p.lock().unwrap_or_else(|e| e.into_inner())).0,
                broker.and_then(proc_stat).map_or(0, |x| x.0),
                proc_stat(me).map_or(0, |x| x.0),
            );
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = st.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let pids = p.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let node = read(&pids);
                let b = broker.and_then(proc_stat).unwrap_or_default();
                let me_now = proc_stat(me).unwrap_or_default();
                let dt = last_t.elapsed().as_secs_f64().max(1e-3);
                last_t = Instant::now();
                let pct =
                    |now: u64, before: u64| now.saturating_sub(before) as f64 / hz / dt * 100.0;
                let sample = Sample {
                    t_s: start.elapsed().as_secs_f64(),
                    node_cpu_pct: pct(node.0, last.0),
                    node_rss: node.1,
                    broker_cpu_pct: pct(b.0, last.1),
                    broker_rss: b.1,
                    self_cpu_pct: pct(me_now.0, last.2),
                    self_rss: me_now.1,
                    hosts: h.load(std::sync::atomic::Ordering::Relaxed),
                };
                last = (node.0, b.0, me_now.0);
                s.lock().unwrap_or_else(|e| e.into_inner()).push(sample);
            }
        });
        Sampler {
            samples,
            hosts,
            pids,
            stop,
            task: Some(task),
        }
    }

    /// The node processes to sample from now on (after a restart). The sample that spans the
    /// change reads no node CPU rather than a difference between two processes.
    pub fn set_node_pids(&self, node_pids: Vec<u32>) {
        *self.pids.lock().unwrap_or_else(|e| e.into_inner()) = node_pids;
    }

    /// The samples taken between `from_s` and `to_s` (seconds since the sampler started).
    pub fn window(&self, from_s: f64, to_s: f64) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|s| s.t_s >= from_s && s.t_s <= to_s)
            .cloned()
            .collect()
    }

    pub fn all(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub async fn stop(mut self) -> Vec<Sample> {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        self.all()
    }
}

/// Mean of `f` over samples (0 when empty).
pub fn mean(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.iter().map(f).sum::<f64>() / samples.len() as f64
}

/// Least-squares slope of y over x (0 with fewer than two distinct x).
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx == 0.0 {
        return 0.0;
    }
    points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>() / sxx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line() {
        let pts: Vec<(f64, f64)> = (0..10).map(|x| (x as f64, 3.0 * x as f64 + 7.0)).collect();
        assert!((slope(&pts) - 3.0).abs() < 1e-9);
        assert_eq!(slope(&[(1.0, 1.0)]), 0.0);
    }

    #[test]
    fn the_median_wave_is_the_middle_one_by_duration() {
        let wave = |name: &str, ms: u64| {
            let mut w = Wave::new(name, 1);
            w.elapsed = Duration::from_millis(ms);
            w
        };
        let waves = [wave("a", 900), wave("b", 300), wave("c", 500)];
        assert_eq!(median_wave(&waves).name, "c");
        // Even count: the shorter of the two middle ones.
        assert_eq!(median_wave(&waves[..2]).name, "b");
        assert_eq!(median_wave(&waves[..1]).name, "a");
        assert_eq!(wave_name("api_run", 0, 1), "api_run");
        assert_eq!(wave_name("api_run", 1, 3), "api_run 2/3");
    }

    #[test]
    fn own_process_is_readable() {
        let (ticks, rss) = proc_stat(std::process::id()).expect("own /proc entry");
        assert!(rss > 0);
        let _ = ticks;
    }

    #[test]
    fn wave_counts_and_summarizes() {
        let mut w = Wave::new("x", 3);
        w.record(Duration::from_millis(10), Duration::from_millis(5), true);
        w.record(Duration::from_millis(20), Duration::from_millis(7), false);
        w.elapsed = Duration::from_millis(20);
        let s = w.summary();
        assert_eq!(s["answered"], 2);
        assert_eq!(s["unanswered"], 1);
        assert_eq!(s["failed"], 1);
        assert_eq!(s["latency_ms"]["count"], 2);
    }
}
