//! Logging set-up shared by the binaries (`tracing`, text or JSON).

use crate::config::LogConfig;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `RUST_LOG` overrides `log.filter`. Safe to call
/// twice (the second call is a no-op), which tests rely on.
pub fn init(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colours only on a terminal: log files stay plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = if cfg.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Latency histograms an autoscaler (or an alert) reads across processes: exported as
/// Prometheus histograms with these buckets (seconds), so `histogram_quantile` can
/// aggregate them over nodes; the other timings stay summaries (per-process quantiles).
pub const LATENCY_HISTOGRAMS: [&str; 2] = ["gs_node_commit_seconds", "gs_node_commit_wait_seconds"];

/// Bucket bounds (seconds) of [`LATENCY_HISTOGRAMS`]: from a fast local commit
/// (about a millisecond) to a stalled one.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// How often the recorder drains its histograms' samples when nobody scrapes.
const METRICS_UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the process-wide Prometheus recorder (once) and returns its handle, which
/// renders `/metrics`, and a thread that drains its samples every few seconds.
pub fn metrics_recorder() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let mut builder = metrics_exporter_prometheus::PrometheusBuilder::new();
            for name in LATENCY_HISTOGRAMS {
                builder = builder
                    .set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(name.to_string()),
                        &LATENCY_BUCKETS,
                    )
                    .expect("the bucket list is not empty");
            }
            let handle = builder
                .install_recorder()
                .expect("the metrics recorder is installed once");
            // Histogram and summary samples are held until drained, by a scrape of
            // `/metrics` or by upkeep; without a scraper (a bench, a deployment without
            // Prometheus) they piled up: a node grew ~1 MB a minute under load.
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(METRICS_UPKEEP_EVERY);
                    upkeep.run_upkeep();
                })
                .expect("the metrics upkeep thread starts");
            metrics::describe_gauge!(
                PROCESS_CPU_SECONDS,
                metrics::Unit::Seconds,
                "CPU time (user + system) this process has used since it started"
            );
            handle
        })
        .clone()
}

/// The process's CPU time, under the name Prometheus' own clients use, so dashboards
/// and autoscaler rules (`rate(process_cpu_seconds_total[1m])`) work unchanged. It is
/// a gauge set from `getrusage` at each scrape (the `metrics` crate's counters take
/// integers).
pub const PROCESS_CPU_SECONDS: &str = "process_cpu_seconds_total";

/// CPU seconds (user + system) used by this process so far.
pub fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass; RUSAGE_SELF is valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Refreshes the per-process gauges (CPU); called by each `/metrics` handler just
/// before it renders.
pub fn record_process_metrics() {
    metrics::gauge!(PROCESS_CPU_SECONDS).set(process_cpu_seconds());
}

/// Resolves on SIGINT or SIGTERM: what the binaries run until.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler can be installed");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Installs the ring crypto provider for rustls once per process. Two providers
/// (ring via async-nats, aws-lc-rs via others) would make rustls panic at start-up.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
