//! `volumectl`: publish volume commands, wait for their events, tail events, inspect or
//! replay dead-lettered commands, and query the daemon's read API.
//!
//! Exit status: 0 completed (or done), 1 the operation failed (or the id is unknown), 2 usage,
//! 3 timed out, 4 broker error, 5 read API unreachable or refusing.

mod status;
mod tables;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use publisher::api::{ApiClient, ApiClientError, OperationQuery};
use publisher::{Error, Subscription, VolumeClient};
use schema::command::AttachVolume;
use schema::command::CreateVolume;
use schema::{
    ByteSize, CloudEvent, Command, CommandId, DiskOfferingId, OperationStatus, OperationType,
    SnapshotId, VmId, VolumeId, ZoneId,
};

#[derive(Debug, Parser)]
#[command(
    name = "volumectl",
    version,
    about = "Publish volume commands to volume-daemon, wait for their events, tail events, replay dead letters, query the daemon",
    after_help = "Exit status: 0 completed (or done), 1 the operation failed (or the id is unknown), 2 usage, 3 timed out, 4 broker error, 5 read API unreachable or refusing."
)]
struct Cli {
    /// Broker URL, or a comma-separated list of URLs tried in order (the nodes of a cluster).
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
    /// The daemon's read API (its HTTP_ADDR), for get, ops, volume, vm, devices, exports and
    /// status; `status` takes several (repeat it, or separate with commas: every instance of
    /// the appliance), the others use the first.
    #[arg(
        long,
        env = "VOLUME_API_URL",
        default_values_t = [default_api_url()],
        value_delimiter = ',',
        global = true
    )]
    api_url: Vec<String>,
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
        /// The CloudStack volume id (UUID) to attach.
        #[arg(long)]
        volume: VolumeId,
        /// The CloudStack VM id (UUID) to attach it to; the daemon's host VM gets a device.
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
        /// The CloudStack volume id (UUID) to detach from whatever VM holds it.
        #[arg(long)]
        volume: VolumeId,
        #[command(flatten)]
        common: Common,
    },
    /// Delete a volume (detaching it first if needed).
    Delete {
        /// The CloudStack volume id (UUID) to delete.
        #[arg(long)]
        volume: VolumeId,
        #[command(flatten)]
        common: Common,
    },
    /// Take a CloudStack snapshot of a volume (its name contains the command id).
    Snapshot {
        /// The CloudStack volume id (UUID).
        #[arg(long)]
        volume: VolumeId,
        /// Part of the snapshot's CloudStack name (default: vd).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Return a volume to one of its snapshots (the volume detached or its VM stopped).
    Revert {
        /// The CloudStack volume id (UUID).
        #[arg(long)]
        volume: VolumeId,
        /// The snapshot id (UUID), one of that volume's.
        #[arg(long)]
        snapshot: SnapshotId,
        #[command(flatten)]
        common: Common,
    },
    /// Delete one of a volume's snapshots.
    DeleteSnapshot {
        /// The CloudStack volume id (UUID).
        #[arg(long)]
        volume: VolumeId,
        /// The snapshot id (UUID).
        #[arg(long)]
        snapshot: SnapshotId,
        #[command(flatten)]
        common: Common,
    },
    /// Resize a volume (CloudStack rounds up to whole GiB; shrinking needs --shrink-ok).
    Resize {
        /// The CloudStack volume id (UUID).
        #[arg(long)]
        volume: VolumeId,
        /// The new size in bytes or with a unit: 20GiB.
        #[arg(long)]
        size: ByteSize,
        /// Allow a smaller size (the data past it is lost).
        #[arg(long)]
        shrink_ok: bool,
        #[command(flatten)]
        common: Common,
    },
    /// List the snapshots the daemon took of a volume (read API).
    Snapshots {
        /// The volume id.
        volume: VolumeId,
        /// The API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a pending operation: it ends `cancelled` and never reaches CloudStack (an
    /// executing one cannot be cancelled).
    Cancel {
        /// The command id of the operation to cancel.
        operation: CommandId,
        #[command(flatten)]
        common: Common,
    },
    /// Make the daemon's mappings and exports match CloudStack and the local devices (never
    /// changes anything in CloudStack); --wait prints what was repaired.
    Reconcile {
        /// Only this VM (default: every VM with mappings, and the host VM).
        #[arg(long)]
        vm: Option<VmId>,
        #[command(flatten)]
        common: Common,
    },
    /// Show one operation (read API).
    Get {
        /// The operation's command id.
        operation: CommandId,
        /// The API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List operations, newest first (read API).
    Ops {
        /// pending, executing, completed, failed or cancelled.
        #[arg(long, value_parser = parse_status)]
        status: Option<OperationStatus>,
        /// create, attach, detach, delete, cancel or reconcile.
        #[arg(long = "type", value_parser = parse_type)]
        op_type: Option<OperationType>,
        /// Only operations on this volume.
        #[arg(long)]
        volume: Option<VolumeId>,
        /// Only operations on this VM.
        #[arg(long)]
        vm: Option<VmId>,
        /// How many to show (pages are fetched as needed).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        limit: u32,
        /// One JSON object per operation, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Show a volume: its mapping, export and last operation (read API).
    Volume {
        /// The volume id.
        volume: VolumeId,
        /// The API's JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// List the volumes mapped on a VM (read API).
    Vm {
        /// The VM id.
        vm: VmId,
        /// The API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the device monitor's table: the host VM's disks and their volumes (read API).
    Devices {
        /// The API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the active NBD exports: volume, export name, URL, target (read API).
    Exports {
        /// The API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Is the appliance healthy and what is it doing: every instance's role and components
    /// (give each with --api-url), outbox, operations pending and executing, dead letters, the
    /// last failures, and the problems found. Exit 0 when an instance is active and ready, 1
    /// otherwise, 5 when no instance answers.
    Status {
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print completion events as they arrive (Ctrl-C stops).
    Watch {
        /// Routing-key pattern: volume.# (all), volume.attach.*, volume.*.failed ...
        #[arg(long = "type", default_value = "volume.#")]
        pattern: String,
        /// One JSON document per line instead of human lines.
        #[arg(long)]
        json: bool,
        /// Stop after this many events.
        #[arg(long)]
        max: Option<usize>,
    },
    /// Inspect or replay dead-lettered commands.
    #[command(subcommand)]
    DeadLetters(DeadLetters),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) for volumectl.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), as the package installs it.
    #[command(hide = true)]
    Manpage,
}

#[derive(Debug, Subcommand)]
enum DeadLetters {
    /// List dead-lettered commands with the reason (they stay in the queue).
    List {
        /// One JSON object per line: id, routing key, reason and body of each dead letter.
        #[arg(long)]
        json: bool,
    },
    /// Publish dead-lettered commands again and remove them from the dead-letter queue.
    Replay {
        /// Only the one with this message id / command id (default: all, after a confirmation).
        #[arg(long)]
        id: Option<String>,
        /// Replay all without asking (needed when not at a terminal).
        #[arg(long)]
        yes: bool,
    },
    /// Remove dead-lettered commands for good (they are not executed).
    Discard {
        /// Only the one with this message id / command id.
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        id: Option<String>,
        /// Every dead letter (after a confirmation).
        #[arg(long)]
        all: bool,
        /// Discard all without asking (needed when not at a terminal).
        #[arg(long)]
        yes: bool,
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
    match &cli.command {
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            let mut command = Cli::command();
            clap_complete::generate(*shell, &mut command, "volumectl", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Cmd::Manpage => {
            use clap::CommandFactory;
            let mut page = Vec::new();
            if let Err(e) = clap_mangen::Man::new(Cli::command()).render(&mut page) {
                eprintln!("error: rendering the manual page: {e}");
                return ExitCode::from(4);
            }
            // A reader that stops early (`| head`) is not an error.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &page);
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let result = match cli.command {
        Cmd::Watch { pattern, json, max } => {
            watch(&cli.amqp_url, &cli.prefix, pattern, json, max).await
        }
        Cmd::DeadLetters(d) => dead_letters(&cli.amqp_url, &cli.prefix, d).await,
        Cmd::Status { json } => {
            return status::run(&cli.api_url, &cli.amqp_url, &cli.prefix, json).await;
        }
        query @ (Cmd::Get { .. }
        | Cmd::Exports { .. }
        | Cmd::Ops { .. }
        | Cmd::Volume { .. }
        | Cmd::Snapshots { .. }
        | Cmd::Vm { .. }
        | Cmd::Devices { .. }) => return read(first(&cli.api_url), query).await,
        command => {
            let (command, common) = match build(command) {
                Ok(c) => c,
                Err(message) => {
                    eprintln!("error: {message}");
                    return ExitCode::from(2);
                }
            };
            send(&cli.amqp_url, &cli.prefix, &command, &common).await
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        match e {
            Error::Timeout { .. } => ExitCode::from(3),
            _ => ExitCode::from(4),
        }
    })
}

fn build(command: Cmd) -> Result<(Command, Common), String> {
    let (mut cmd, common) = match command {
        Cmd::Create {
            size,
            name,
            disk_offering,
            zone,
            common,
        } => {
            let mut create = CreateVolume::new(name.unwrap_or_default(), size);
            create.disk_offering_id = disk_offering;
            create.zone_id = zone;
            (Command::from(create), common)
        }
        Cmd::Attach {
            volume,
            vm,
            device_id,
            common,
        } => {
            let mut attach = AttachVolume::new(volume, vm);
            if let Some(d) = device_id {
                attach = attach
                    .device_id(d)
                    .map_err(|e| format!("--device-id: {e}"))?;
            }
            (Command::from(attach), common)
        }
        Cmd::Detach { volume, common } => (Command::detach(volume), common),
        Cmd::Delete { volume, common } => (Command::delete(volume), common),
        Cmd::Cancel { operation, common } => (Command::cancel(operation), common),
        Cmd::Reconcile { vm, common } => (Command::reconcile(vm), common),
        Cmd::Snapshot {
            volume,
            name,
            common,
        } => (Command::snapshot(volume, name), common),
        Cmd::Revert {
            volume,
            snapshot,
            common,
        } => (Command::revert_snapshot(volume, snapshot), common),
        Cmd::DeleteSnapshot {
            volume,
            snapshot,
            common,
        } => (Command::delete_snapshot(volume, snapshot), common),
        Cmd::Resize {
            volume,
            size,
            shrink_ok,
            common,
        } => (Command::resize(volume, size, shrink_ok), common),
        _ => return Err("not a command".into()),
    };
    if let Some(id) = common.command_id.clone() {
        cmd = cmd.with_command_id(id);
    }
    // The caller's trace (W3C Trace Context), as OpenTelemetry's environment carriers name it.
    if let Ok(parent) = std::env::var("TRACEPARENT") {
        let state = std::env::var("TRACESTATE").ok();
        let trace = schema::trace::TraceContext::parse(&parent, state.as_deref())
            .map_err(|e| format!("TRACEPARENT: {e}"))?;
        cmd = cmd.with_trace(trace);
    }
    if let Some(c) = common.correlation_id.clone() {
        if c.len() > 255 {
            return Err("--correlation-id is longer than 255 bytes".into());
        }
        cmd = cmd.with_correlation_id(c);
    }
    if let schema::Action::Create(c) = &mut cmd.action
        && c.name.is_empty()
    {
        c.name = format!("volumectl-{}", cmd.command_id);
    }
    Ok((cmd, common))
}

async fn send(
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
    let spinner = Spinner::start(format!(
        "{} {}",
        command.operation_type(),
        command.command_id
    ));
    let event = pending.wait(Duration::from_secs(common.timeout)).await;
    spinner.stop();
    let event = event?;
    print_event(&event, common.json);
    Ok(if event.data.status == OperationStatus::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Elapsed time on the terminal while waiting; nothing when stderr is not a terminal.
struct Spinner {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Spinner {
    fn start(what: String) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self { task: None };
        }
        let started = Instant::now();
        let task = tokio::spawn(async move {
            const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
            for i in 0.. {
                eprint!(
                    "\r{} waiting for {what}  {:.1}s ",
                    FRAMES[i % FRAMES.len()],
                    started.elapsed().as_secs_f64()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self { task: Some(task) }
    }

    fn stop(self) {
        if let Some(task) = self.task {
            task.abort();
            // Clear the spinner line.
            eprint!("\r\x1b[2K");
        }
    }
}

fn print_event(event: &CloudEvent, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(event).unwrap_or_default()
        );
    } else {
        println!("{}", human(event));
        if let Some(e) = &event.data.error {
            println!("  {}: {}", e.code, e.message);
            println!("  hint: {}", e.hint);
        }
    }
}

/// One line per event.
fn human(event: &CloudEvent) -> String {
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
    if let Some(vm) = d.vm_id {
        line.push_str(&format!("  vm {vm}"));
    }
    if let Some(p) = &d.device_path {
        line.push_str(&format!("  device {p}"));
    }
    if d.already_detached == Some(true) {
        line.push_str("  (was not attached)");
    }
    if d.already_absent == Some(true) {
        line.push_str("  (did not exist)");
    }
    if let Some(s) = &d.snapshot {
        line.push_str(&format!("  snapshot {} ({}, {})", s.id, s.name, s.state));
    }
    if let Some(s) = d.snapshot_id {
        line.push_str(&format!("  snapshot {s}"));
    }
    if let Some(p) = d.previous_size {
        line.push_str(&format!("  (was {p} bytes)"));
    }
    if let Some(t) = &d.target {
        line.push_str(&format!("  target {t}"));
    }
    if let Some(changes) = &d.changes {
        line.push_str(&format!("  {} change(s)", changes.len()));
        for c in changes {
            line.push_str(&format!(
                "\n    {} volume {}: {} -> {}",
                c.what.as_str(),
                c.volume_id,
                c.before.as_deref().unwrap_or("-"),
                c.after.as_deref().unwrap_or("-")
            ));
        }
    }
    if let Some(e) = &d.error {
        line.push_str(&format!("  {}", e.code));
    }
    line.push_str(&format!("  in {} ms", d.duration_ms));
    line
}

/// The first of the `--api-url`s (there is always one: the default).
fn first(urls: &[String]) -> &str {
    urls.first().map_or("", String::as_str)
}

/// `HTTP_ADDR` when set (the daemon's own setting), else its default.
fn default_api_url() -> String {
    let addr = std::env::var("HTTP_ADDR").unwrap_or_else(|_| "127.0.0.1:8090".into());
    format!("http://{addr}")
}

fn parse_status(s: &str) -> Result<OperationStatus, String> {
    let all: Vec<&str> = OperationStatus::ALL.iter().map(|s| s.as_str()).collect();
    OperationStatus::parse(s).ok_or_else(|| format!("expected one of {}", all.join(", ")))
}

fn parse_type(s: &str) -> Result<OperationType, String> {
    let all: Vec<&str> = OperationType::ALL.iter().map(|t| t.as_str()).collect();
    OperationType::parse(s).ok_or_else(|| format!("expected one of {}", all.join(", ")))
}

/// The read-API queries.
async fn read(api_url: &str, query: Cmd) -> ExitCode {
    let result = match ApiClient::new(api_url) {
        Ok(api) => run_query(&api, query).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(text) => {
            if !text.is_empty() {
                println!("{text}");
            }
            ExitCode::SUCCESS
        }
        Err(e @ ApiClientError::NotFound { .. }) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(5)
        }
    }
}

fn pretty<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

async fn run_query(api: &ApiClient, query: Cmd) -> Result<String, ApiClientError> {
    Ok(match query {
        Cmd::Get { operation, json } => {
            let o = api.operation(&operation).await?;
            if json {
                pretty(&o)
            } else {
                tables::operation(&o)
            }
        }
        Cmd::Ops {
            status,
            op_type,
            volume,
            vm,
            limit,
            json,
        } => {
            let q = OperationQuery {
                status,
                op_type,
                volume_id: volume,
                vm_id: vm,
            };
            let ops = all_operations(api, &q, limit).await?;
            if json {
                ops.iter()
                    .map(|o| serde_json::to_string(o).unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("\n")
            } else {
                tables::operations(&ops)
            }
        }
        Cmd::Volume { volume, json } => {
            let v = api.volume(volume).await?;
            if json { pretty(&v) } else { tables::volume(&v) }
        }
        Cmd::Snapshots { volume, json } => {
            let v = api.volume(volume).await?;
            if json {
                pretty(&v.snapshots)
            } else {
                tables::snapshots(&v.snapshots)
            }
        }
        Cmd::Vm { vm, json } => {
            let v = api.vm_volumes(vm).await?;
            if json {
                pretty(&v)
            } else {
                tables::mappings(&v.items)
            }
        }
        Cmd::Exports { json } => {
            let e = api.exports().await?;
            if json {
                pretty(&e)
            } else {
                tables::exports(&e.items)
            }
        }
        Cmd::Devices { json } => {
            let d = api.devices().await?;
            if json {
                pretty(&d)
            } else {
                tables::devices(&d)
            }
        }
        _ => String::new(),
    })
}

/// Up to `limit` operations, following the cursor page by page.
async fn all_operations(
    api: &ApiClient,
    q: &OperationQuery,
    limit: u32,
) -> Result<Vec<schema::api::OperationView>, ApiClientError> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    while out.len() < limit as usize {
        let want = (limit as usize - out.len()).min(schema::api::MAX_PAGE as usize) as u32;
        let page = api.operations(q, want, cursor.as_deref()).await?;
        out.extend(page.items);
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    Ok(out)
}

async fn watch(
    url: &str,
    prefix: &str,
    pattern: String,
    json: bool,
    max: Option<usize>,
) -> Result<ExitCode, Error> {
    let client = VolumeClient::connect(url, prefix).await?;
    client.declare_topology().await?;
    let mut events = client
        .subscribe(Subscription {
            patterns: vec![pattern],
            ..Subscription::default()
        })
        .await?;
    // Said on stderr even on a pipe: once it is printed, nothing published is missed.
    eprintln!("watching {prefix}.events (Ctrl-C stops)");
    let mut seen = 0;
    loop {
        let next = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            next = events.next() => next,
        };
        let Some(received) = next else {
            return Ok(ExitCode::SUCCESS);
        };
        let received = received?;
        if json {
            println!(
                "{}",
                serde_json::to_string(&received.event).unwrap_or_default()
            );
        } else {
            println!(
                "{}  {}",
                received.event.time.format("%H:%M:%S%.3f"),
                human(&received.event)
            );
        }
        received.ack().await?;
        seen += 1;
        if max.is_some_and(|m| seen >= m) {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

async fn dead_letters(url: &str, prefix: &str, what: DeadLetters) -> Result<ExitCode, Error> {
    let client = VolumeClient::connect(url, prefix).await?;
    client.declare_topology().await?;
    match what {
        DeadLetters::List { json } => {
            // One message at a time: a queue of large messages is never held in memory.
            let shown = client
                .each_dead_letter(|l| {
                    let body = String::from_utf8_lossy(&l.body);
                    if json {
                        let v = serde_json::json!({"id": l.id, "routing_key": l.routing_key, "reason": l.reason, "body": body});
                        println!("{v}");
                    } else {
                        let preview: String = body.chars().take(120).collect();
                        println!(
                            "{}  {}  {}\n    {}",
                            l.id.as_deref().unwrap_or("-"),
                            l.routing_key,
                            l.reason,
                            preview
                        );
                    }
                })
                .await?;
            if !json && std::io::stderr().is_terminal() {
                eprintln!("{shown} dead-lettered command(s) in {prefix}.commands.dead");
            }
            Ok(ExitCode::SUCCESS)
        }
        DeadLetters::Replay { id, yes } => {
            if id.is_none()
                && !confirmed("Replay every dead-lettered command", yes, &client).await?
            {
                return Ok(ExitCode::from(2));
            }
            let replayed = client
                .replay_dead_letters(|l| {
                    id.as_deref()
                        .is_none_or(|want| l.id.as_deref() == Some(want))
                })
                .await?;
            done_with("replayed", &replayed, id.as_deref())
        }
        DeadLetters::Discard { id, all, yes } => {
            if all
                && !confirmed("Discard every dead-lettered command for good", yes, &client).await?
            {
                return Ok(ExitCode::from(2));
            }
            let discarded = client
                .discard_dead_letters(|l| {
                    id.as_deref()
                        .is_none_or(|want| l.id.as_deref() == Some(want))
                })
                .await?;
            done_with("discarded", &discarded, id.as_deref())
        }
    }
}

/// Prints each dead letter `what` was done to; exit 1 when `id` named one that is not there.
fn done_with(
    what: &str,
    letters: &[publisher::Replayed],
    id: Option<&str>,
) -> Result<ExitCode, Error> {
    for l in letters {
        println!(
            "{what} {}  {}",
            l.id.as_deref().unwrap_or("-"),
            l.routing_key
        );
    }
    if let (true, Some(id)) = (letters.is_empty(), id) {
        eprintln!("error: no dead letter with id {id}");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks at the terminal before acting on every dead letter (`--yes` skips the question; away
/// from a terminal it is required). Says how many there are.
async fn confirmed(action: &str, yes: bool, client: &VolumeClient) -> Result<bool, Error> {
    if yes {
        return Ok(true);
    }
    let n = client.dead_letter_count().await?;
    if !std::io::stdin().is_terminal() {
        eprintln!(
            "error: {action}: {n} message(s) in {}; not at a terminal to confirm, pass --yes",
            client.topology().dead_letter_queue()
        );
        return Ok(false);
    }
    eprint!("{action}: {n} message(s)? [y/N] ");
    let mut answer = String::new();
    let _ = std::io::stdin().read_line(&mut answer);
    let yes = matches!(answer.trim(), "y" | "Y" | "yes");
    if !yes {
        eprintln!("nothing done");
    }
    Ok(yes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// `--help` on everything: every option and argument of every subcommand says what it is.
    #[test]
    fn every_option_of_every_subcommand_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} --{}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (no about)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "volumectl", &mut missing);
        assert!(missing.is_empty(), "without help text: {missing:?}");
    }
}
