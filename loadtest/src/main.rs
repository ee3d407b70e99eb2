//! `sse-loadtest`: load scenarios for sse-fanout and, through URL templates and a generic
//! HTTP publisher, for Nchan and Pushpin — so `scripts/bench` can run the same scenario
//! against all three. See docs/benchmarks.md for how it is used and what it found.
//!
//! The parent process publishes, coordinates and reports; the clients live in worker
//! processes (this binary, hidden `worker` subcommand) because one process may hold at most
//! 20,000 open files here. Every run is bounded in time and count and targets loopback only.

mod awake;
mod cli;
mod client;
mod cluster;
mod floor;
mod gunzip;
mod histogram;
mod http_stream;
mod jwt;
mod origin;
mod payload;
mod pool;
mod protocol;
mod publisher;
mod render;
mod report;
mod scenario;
mod server_stats;
mod target;
mod tracking;
mod worker;

use std::net::SocketAddr;

use anyhow::Result;
use clap::{Parser, Subcommand};

use scenario::churn::ChurnArgs;
use scenario::conns::ConnsArgs;
use scenario::delivery::{DeliveryArgs, Mode};
use scenario::reconnect::ReconnectArgs;

#[derive(Debug, Parser)]
#[command(name = "sse-loadtest", version, about = "Load tester for SSE fan-out servers (loopback only)")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Open N idle streams at a rate, hold them; connect rate, failures, server RSS per stream.
    Conns(ConnsArgs),
    /// N subscribers on the broadcast channel; publish at a list of rates.
    Fanout(DeliveryArgs),
    /// One stream per user; publish to random users at a list of rates.
    Unicast(DeliveryArgs),
    /// Drop all resumable streams at once while publishing; time to recover, exactness.
    Reconnect(ReconnectArgs),
    /// Constant connect/disconnect rate while publishing.
    Churn(ChurnArgs),
    /// The minimal GRIP origin Pushpin needs (see docs/benchmarks.md).
    Origin {
        #[arg(long, default_value = "127.0.0.1:8099")]
        listen: SocketAddr,
    },
    /// The cheapest SSE fan-out possible, measured beside the servers as this machine's floor.
    Floor {
        #[arg(long, default_value = "127.0.0.1:8093")]
        listen: SocketAddr,
        #[arg(long, default_value = "redis://127.0.0.1:6379")]
        redis_url: String,
        /// Redis channel whose messages go to every stream.
        #[arg(long, default_value = "sse:broadcast")]
        channel: String,
    },
    /// Print an HS256 token for sse-fanout (scripts/cluster mints its demo tokens so).
    Token(jwt::TokenArgs),
    /// Render JSON result lines into the tables of docs/benchmarks.md.
    Render {
        #[arg(long)]
        results: std::path::PathBuf,
        #[arg(long)]
        docs: std::path::PathBuf,
    },
    /// Internal: a client-holding worker process driven over stdin/stdout.
    #[command(hide = true)]
    Worker,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match &cli.scenario {
        Scenario::Worker => return worker::main(),
        Scenario::Render { results, docs } => return render::run(results, docs),
        Scenario::Token(args) => return jwt::print_token(args),
        _ => {}
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        match cli.scenario {
            Scenario::Conns(a) => scenario::conns::run(a).await,
            Scenario::Fanout(a) => scenario::delivery::run(a, Mode::Fanout).await,
            Scenario::Unicast(a) => scenario::delivery::run(a, Mode::Unicast).await,
            Scenario::Reconnect(a) => scenario::reconnect::run(a).await,
            Scenario::Churn(a) => scenario::churn::run(a).await,
            Scenario::Origin { listen } => origin::serve(listen).await,
            Scenario::Floor { listen, redis_url, channel } => floor::serve(listen, &redis_url, &channel).await,
            Scenario::Worker | Scenario::Render { .. } | Scenario::Token(_) => unreachable!("handled above"),
        }
    })
}
