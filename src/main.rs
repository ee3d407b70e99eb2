//! Parses the configuration, builds the node and runs it until SIGTERM/SIGINT; or runs the
//! `doctor` check, which needs neither the node's settings nor its logging.

use sse_fanout::KeyError;
use sse_fanout::config::{Cli, Command, Config, DoctorArgs};
use sse_fanout::redis_tls::RedisTlsError;
use sse_fanout::{server, shutdown, telemetry};

#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    match Cli::from_args().command {
        Command::Serve(config) => serve(*config),
        Command::Doctor(args) => doctor(args),
    }
}

fn serve(config: Config) -> std::process::ExitCode {
    if let Err(e) = config.validate() {
        eprintln!("error: {e}");
        return std::process::ExitCode::from(2);
    }
    // Checked by `validate`; the exporter is built before the runtime, because its blocking
    // HTTP client is made on a thread of its own.
    let settings = config.traces().ok().flatten();
    let (exporter, layer) = match settings.as_ref().map(telemetry::start).transpose() {
        Ok(started) => started.unzip(),
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Err(e) = sse_fanout::logging::init(config.log_format, &config.log_level, layer) {
        eprintln!("error: {e:#}");
        return std::process::ExitCode::from(2);
    }
    if let Some(settings) = &settings {
        tracing::info!(url = %settings.url, service = %settings.service_name, sampler = ?settings.sampler, "exporting traces");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(config));
    // After the drain (the last span): what the batch still holds goes out before the exit.
    if let Some(exporter) = exporter {
        exporter.shutdown();
    }
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // A key or certificate that cannot be read or used is a wrong setting like any other: exit 2, which
        // supervisors and operators read as "fix the configuration", not "restart".
        Err(e) if e.downcast_ref::<KeyError>().is_some() || e.downcast_ref::<RedisTlsError>().is_some() => {
            // `{e}`, not `{e:#}`: the key error's text already names its cause.
            tracing::error!("{e}");
            eprintln!("error: {e}");
            std::process::ExitCode::from(2)
        }
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The first signal starts the drain; a second one skips the rest of it.
async fn run(config: Config) -> anyhow::Result<()> {
    use anyhow::Context;
    let address = config.listen;
    let listener = server::listen(address).with_context(|| format!("cannot listen on {address}"))?;
    let node = server::Server::build(config)?;
    let (first, second) = (tokio::sync::oneshot::channel::<()>(), tokio::sync::oneshot::channel::<()>());
    tokio::spawn(async move {
        let signal = shutdown::signal().await;
        tracing::info!(signal, "shutting down");
        let _ = first.0.send(());
        let signal = shutdown::signal().await;
        tracing::warn!(signal, "second signal");
        let _ = second.0.send(());
    });
    node.serve(listener, async { first.1.await.unwrap_or(()) }, async { second.1.await.unwrap_or(()) }).await
}

/// One connection at a time: a single-threaded runtime is all the doctor needs.
fn doctor(args: DoctorArgs) -> std::process::ExitCode {
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(sse_fanout::doctor::run(args)),
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
