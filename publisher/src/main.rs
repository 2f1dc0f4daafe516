//! `volumectl`: publish volume commands and wait for their completion events.
//!
//! Exit status: 0 completed (or published without `--wait`), 1 failed, 2 usage, 3 timed out,
//! 4 broker error.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use publisher::{Error, VolumeClient};
use schema::command::{Action, AttachVolume, CreateVolume};
use schema::{
    ByteSize, CloudEvent, Command, CommandId, DiskOfferingId, OperationStatus, VmId, VolumeId,
    ZoneId,
};

#[derive(Debug, Parser)]
#[command(
    name = "volumectl",
    version,
    about = "Publish volume commands to volume-daemon and wait for their events"
)]
struct Cli {
    /// Broker URL.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true,
        global = true
    )]
    amqp_url: String,
    /// Prefix of the daemon's exchanges and queues.
    #[arg(long, env = "AMQP_PREFIX", default_value = "volume", global = true)]
    prefix: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a volume.
    Create {
        /// Size in bytes or with a unit: 10GiB, 512MiB (CloudStack rounds up to whole GiB).
        #[arg(long)]
        size: ByteSize,
        /// Volume name (default: volumectl-<command id>).
        #[arg(long)]
        name: Option<String>,
        /// Disk offering (default: the zone's first customized offering).
        #[arg(long)]
        disk_offering: Option<DiskOfferingId>,
        /// Zone (default: the daemon's).
        #[arg(long)]
        zone: Option<ZoneId>,
        #[command(flatten)]
        common: Common,
    },
    /// Attach a volume to a VM.
    Attach {
        #[arg(long)]
        volume: VolumeId,
        #[arg(long)]
        vm: VmId,
        /// CloudStack device id (0 = root disk; 3 is never valid).
        #[arg(long)]
        device_id: Option<u32>,
        #[command(flatten)]
        common: Common,
    },
    /// Detach a volume from its VM.
    Detach {
        #[arg(long)]
        volume: VolumeId,
        #[command(flatten)]
        common: Common,
    },
    /// Delete a volume (detaching it first if needed).
    Delete {
        #[arg(long)]
        volume: VolumeId,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Debug, Args)]
struct Common {
    /// Wait for the terminal event and print it.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits, in seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Print the event as JSON.
    #[arg(long)]
    json: bool,
    /// Command id (default: a random UUID); reuse one to retry safely.
    #[arg(long)]
    command_id: Option<CommandId>,
    /// Correlation id echoed in the event.
    #[arg(long)]
    correlation_id: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let (action, common) = match cli.command {
        Cmd::Create {
            size,
            name,
            disk_offering,
            zone,
            common,
        } => (
            Action::Create(CreateVolume {
                name: name.unwrap_or_default(),
                size,
                disk_offering_id: disk_offering,
                zone_id: zone,
            }),
            common,
        ),
        Cmd::Attach {
            volume,
            vm,
            device_id,
            common,
        } => {
            if device_id == Some(3) {
                eprintln!("error: --device-id 3 is the CD-ROM and never valid");
                return ExitCode::from(2);
            }
            (
                Action::Attach(AttachVolume {
                    volume_id: volume,
                    vm_id: vm,
                    device_id,
                }),
                common,
            )
        }
        Cmd::Detach { volume, common } => (Action::Detach { volume_id: volume }, common),
        Cmd::Delete { volume, common } => (Action::Delete { volume_id: volume }, common),
    };
    let mut command = Command::new(action);
    if let Some(id) = common.command_id.clone() {
        command.command_id = id;
    }
    command.correlation_id = common.correlation_id.clone();
    if let Action::Create(c) = &mut command.action
        && c.name.is_empty()
    {
        c.name = format!("volumectl-{}", command.command_id);
    }
    match run(&cli.amqp_url, &cli.prefix, &command, &common).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            match e {
                Error::Timeout { .. } => ExitCode::from(3),
                _ => ExitCode::from(4),
            }
        }
    }
}

async fn run(
    url: &str,
    prefix: &str,
    command: &Command,
    common: &Common,
) -> Result<ExitCode, Error> {
    let client = VolumeClient::connect(url, prefix).await?;
    client.declare_topology().await?;
    if !common.wait {
        client.publish_only(command).await?;
        println!("{}", command.command_id);
        return Ok(ExitCode::SUCCESS);
    }
    let pending = client.publish(command).await?;
    eprintln!(
        "published {} {}; waiting for its event…",
        command.operation_type(),
        command.command_id
    );
    let event = pending.wait(Duration::from_secs(common.timeout)).await?;
    print_event(&event, common.json);
    Ok(if event.data.status == OperationStatus::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_event(event: &CloudEvent, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(event).unwrap_or_default()
        );
        return;
    }
    let d = &event.data;
    let mut line = format!("{}  operation {}", event.event_type, d.operation_id);
    if let Some(v) = &d.volume {
        line.push_str(&format!(
            "  volume {} ({}, {}, {} bytes)",
            v.id, v.name, v.state, v.size
        ));
    } else if let Some(v) = d.volume_id {
        line.push_str(&format!("  volume {v}"));
    }
    if let Some(p) = &d.device_path {
        line.push_str(&format!("  device {p}"));
    }
    line.push_str(&format!("  in {} ms", d.duration_ms));
    println!("{line}");
    if let Some(e) = &d.error {
        println!("  {}: {}", e.code, e.message);
        println!("  hint: {}", e.hint);
    }
}
