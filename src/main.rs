//! Parses the configuration, builds the node and runs it until shutdown; or runs the
//! `doctor` check, which needs neither the node's settings nor its logging.

use clap::Parser;
use sse_fanout::config::{Cli, Command, Config, DoctorArgs};

#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(cli.config),
        Command::Doctor(args) => doctor(args),
    }
}

fn serve(config: Config) -> std::process::ExitCode {
    if let Err(e) = config.validate() {
        eprintln!("error: {e}");
        return std::process::ExitCode::from(2);
    }
    if let Err(e) = sse_fanout::logging::init(config.log_format, &config.log_level) {
        eprintln!("error: {e:#}");
        return std::process::ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(sse_fanout::node::run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
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
