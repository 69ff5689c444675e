//! `gs-node`: a worker node. Thin: parse the command line, load the config, start
//! logging, run the library until SIGINT/SIGTERM.

use clap::Parser;
use std::path::PathBuf;

/// mimalloc instead of glibc's malloc: the services allocate many small, short-lived
/// buffers per message (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "gs-node", about = "Game Session Service worker node")]
struct Args {
    /// TOML configuration file (defaults < file < GS_* environment).
    #[arg(long, env = "GS_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    gs_shared::alloc::keep_freed_memory();
    let args = Args::parse();
    // Errors may quote a URL holding a password: it is redacted before printing.
    let redacted = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!(gs_shared::config::redact_secrets(&format!("{e:#}")))
    };
    let cfg = gs_shared::Config::load(args.config.as_deref()).map_err(|e| redacted(&e))?;
    // The runtime is sized by the config (0: tokio's default, one thread per CPU).
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if cfg.node.worker_threads > 0 {
        runtime.worker_threads(cfg.node.worker_threads);
    }
    runtime.build()?.block_on(async move {
        gs_shared::telemetry::init(&cfg.log);
        if let Err(e) = gs_node::run(cfg, gs_shared::telemetry::shutdown_signal()).await {
            let e = redacted(&format!("{e:#}"));
            tracing::error!(error = %e, "node failed");
            return Err(e);
        }
        Ok(())
    })
}
