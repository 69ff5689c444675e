//! PostgreSQL plumbing shared by nodes, the CLI and tests: creating the database,
//! applying the versioned migrations in `migrations/` (embedded at build time), and
//! building a connection pool.

use crate::config::PostgresConfig;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::time::Duration;
use tokio_postgres::NoTls;

mod embedded {
    refinery::embed_migrations!("../migrations");
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("PostgreSQL: {0}")]
    Pg(#[from] tokio_postgres::Error),
    #[error("migrations: {0}")]
    Migration(#[from] refinery::Error),
    #[error("connection pool: {0}")]
    Pool(String),
}

/// Serialises migration runs of concurrent processes (an arbitrary, fixed key).
const MIGRATION_LOCK_KEY: i64 = 0x6773_6d69_6772; // "gsmigr"

/// tokio-postgres configuration for `dbname` (the session database unless overridden).
pub fn pg_config(
    cfg: &PostgresConfig,
    dbname: &str,
    server_timeouts: bool,
) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host(&cfg.host)
        .port(cfg.port)
        .user(&cfg.user)
        .dbname(dbname)
        .application_name("game-session-service")
        .connect_timeout(Duration::from_millis(cfg.connect_timeout_ms));
    if !cfg.password.is_empty() {
        c.password(&cfg.password);
    }
    if server_timeouts {
        c.options(format!(
            "-c statement_timeout={} -c idle_in_transaction_session_timeout={}",
            cfg.statement_timeout_ms, cfg.idle_in_transaction_timeout_ms
        ));
    }
    c
}

/// Creates the session database if it does not exist (connecting to `postgres`).
pub async fn ensure_database(cfg: &PostgresConfig) -> Result<bool, DbError> {
    let (client, conn) = pg_config(cfg, "postgres", false).connect(NoTls).await?;
    let task = tokio::spawn(conn);
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_database WHERE datname = $1",
            &[&cfg.dbname],
        )
        .await?
        .is_some();
    let mut created = false;
    if !exists {
        let ident = cfg.dbname.replace('"', "\"\"");
        match client
            .batch_execute(&format!("CREATE DATABASE \"{ident}\""))
            .await
        {
            Ok(()) => created = true,
            // Another process created it meanwhile.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) => {}
            Err(e) => return Err(e.into()),
        }
    }
    drop(client);
    let _ = task.await;
    Ok(created)
}

/// Drops a database (tests clean up their private databases).
pub async fn drop_database(cfg: &PostgresConfig, dbname: &str) -> Result<(), DbError> {
    let (client, conn) = pg_config(cfg, "postgres", false).connect(NoTls).await?;
    let task = tokio::spawn(conn);
    let ident = dbname.replace('"', "\"\"");
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{ident}\" WITH (FORCE)"))
        .await?;
    drop(client);
    let _ = task.await;
    Ok(())
}

/// Creates the database if needed and applies pending migrations, under an advisory
/// lock so that nodes starting together do not race. Returns the versions applied.
pub async fn migrate(cfg: &PostgresConfig) -> Result<Vec<i32>, DbError> {
    ensure_database(cfg).await?;
    let (mut client, conn) = pg_config(cfg, &cfg.dbname, false).connect(NoTls).await?;
    let task = tokio::spawn(conn);
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    let result = embedded::migrations::runner().run_async(&mut client).await;
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    let report = result?;
    drop(client);
    let _ = task.await;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| m.version())
        .collect())
}

/// A connection pool on the session database. `server_timeouts` sets the statement and
/// idle-in-transaction timeouts (nodes want them; see `PostgresConfig`).
pub fn pool(cfg: &PostgresConfig, server_timeouts: bool) -> Result<Pool, DbError> {
    let mgr = Manager::from_config(
        pg_config(cfg, &cfg.dbname, server_timeouts),
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let timeout = Some(Duration::from_millis(cfg.connect_timeout_ms));
    Pool::builder(mgr)
        .max_size(cfg.pool_size.max(1))
        .wait_timeout(timeout)
        .create_timeout(timeout)
        .recycle_timeout(timeout)
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))
}

/// SQLSTATE raised by the fencing trigger (`gs_fence`) for a stale epoch.
pub const FENCED_SQLSTATE: &str = "GSF01";

/// Whether an error is the fencing trigger refusing a stale owner.
pub fn is_fenced(e: &tokio_postgres::Error) -> bool {
    e.code()
        .map(|c| c.code() == FENCED_SQLSTATE)
        .unwrap_or(false)
}
