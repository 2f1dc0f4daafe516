//! `cloudstack-sim`: serve the CloudStack API simulator on a port.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

/// A CloudStack API simulator: signed requests, async jobs and CloudStack's JSON shapes.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "SIM_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// API key clients must send.
    #[arg(long, env = "SIM_API_KEY", default_value = "sim-api-key")]
    api_key: String,
    /// Secret key requests are signed with.
    #[arg(
        long,
        env = "SIM_SECRET_KEY",
        default_value = "sim-secret-key",
        hide_env_values = true
    )]
    secret_key: String,
    /// How long async jobs stay in progress, in milliseconds.
    #[arg(long, env = "SIM_JOB_LATENCY_MS", default_value_t = 200)]
    job_latency_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let config = cloudstack_sim::SimConfig {
        api_key: args.api_key,
        secret_key: args.secret_key,
        job_latency: Duration::from_millis(args.job_latency_ms),
    };
    let running = cloudstack_sim::spawn(args.listen, config).await?;
    println!("cloudstack-sim listening on {}", running.api_url());
    println!(
        "zone {}  custom disk offering {}",
        cloudstack_sim::ZONE_ID,
        cloudstack_sim::CUSTOM_OFFERING_ID
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
