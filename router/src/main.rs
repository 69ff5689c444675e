//! `gs-router`: an edge router. Thin: parse the command line, load the config, start
//! logging, run the library until SIGINT/SIGTERM.

use clap::Parser;
use std::path::PathBuf;

/// mimalloc instead of glibc's malloc: the services allocate many small, short-lived
/// buffers per message (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "gs-router",
    about = "Game Session Service router (REST + WebSocket edge)"
)]
struct Args {
    /// TOML configuration file (defaults < file < GS_* environment).
    #[arg(long, env = "GS_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    gs_shared::alloc::keep_freed_memory();
    let args = Args::parse();
    // Errors may quote a URL holding a password: it is redacted before printing.
    let redacted = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!(gs_shared::config::redact_secrets(&format!("{e:#}")))
    };
    let cfg = gs_shared::Config::load(args.config.as_deref()).map_err(|e| redacted(&e))?;
    gs_shared::telemetry::init(&cfg.log);
    if let Err(e) = gs_router::run(cfg, gs_shared::telemetry::shutdown_signal()).await {
        let e = redacted(&format!("{e:#}"));
        tracing::error!(error = %e, "router failed");
        return Err(e);
    }
    Ok(())
}
