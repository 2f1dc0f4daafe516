//! End-to-end benchmark (not a test): `cargo bench -p worker --bench throughput`.
//!
//! The real `volume-daemon` binary against the machine's RabbitMQ and MariaDB and the project's
//! CloudStack simulator (in this process), each phase with its own prefix, database and
//! simulator, removed afterwards. Every figure is printed next to a limit measured the same way
//! in the same run, and as a ratio to it:
//!
//! 1. zero-latency creates/s at `MAX_CONCURRENT_OPERATIONS=16` (1,000 published at once), next
//!    to a bare client doing the same createVolume + job polls against the same simulator at
//!    the same concurrency, with no broker and no database. Target ≥ 0.6.
//! 2. publish → event p50/p99 at a steady 100 creates/s for 3 s with 50 ms jobs, as a ratio to
//!    the job latency. Target p99 ≤ 1.5 ×.
//! 3. makespan of 200 attaches over 25 VMs with 500 ms jobs, against the ideal
//!    0.5 s × max(⌈200/16⌉, 200/25). Target ≤ 1.10 ×.
//! 4. relay throughput on a pre-filled outbox of 20,000 events (events/s), next to a bare
//!    confirmed-publish loop of as many to the same exchange, three rounds taking turns, the
//!    median counts. Target ≥ 0.5.
//! 5. the daemon's peak RSS (VmHWM) while it works through the 1,000 commands of phase 1.
//!    Target ≤ 40 MiB.
//!
//! Then what a user of a real cloud sees: a simulator that answers every API request after
//! [`REQUEST_DELAY`] (a management server with a database behind it), and limits that obey the
//! daemon's rules (at most `MAX_CONCURRENT_OPERATIONS` at once, one attach per VM at a time,
//! the daemon's job-polling schedule):
//!
//! 6. 200 attaches over 25 VMs with 2 s jobs: makespan against the ideal
//!    2 s × max(⌈200/16⌉, 200/25), and a bare client's makespan. Target ≤ 1.10 × the ideal.
//! 7. a steady 100 creates/s with 50 ms jobs: the daemon's publish → event p99 against the p99
//!    of a bare client making the same calls at the same pace. Target ≤ 1.5 ×.
//! 8. CPU per command of phase 1 (daemon + database + broker) against an in-run floor loop: a
//!    publish, consume and ack through a quorum queue, one confirmed publish, one INSERT and
//!    one UPDATE commit, per command. Target ≤ 2 ×.
//!
//! Phases 6 and 7 also print the cloud's cost: job polls per job and API requests per
//! operation, from the simulator's call record. `BENCH_PHASES=1,8` runs only the phases it
//! lists (5 and 8 run phase 1, whose figures they read).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cloudstack::{Client, Credentials, JobPolling, RetryPolicy};
use cloudstack_sim::{CUSTOM_OFFERING_ID, RunningSim, SimConfig, ZONE_ID};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use publisher::{Subscription, VolumeClient};
use schema::command::CreateVolume;
use schema::{Command, VmId, VolumeId};
use sqlx::MySqlPool;
use tokio::process::{Child, Command as Process};

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const MYSQL: &str = "mysql://root@127.0.0.1:3306";
const CONCURRENCY: usize = 16;
/// How long the slow cloud of phases 6 and 7 takes to answer each API request.
const REQUEST_DELAY: Duration = Duration::from_millis(20);
const WAIT: Duration = Duration::from_secs(120);

/// One phase's world: a simulator, a database, a prefix, a daemon.
struct World {
    tag: String,
    /// Not one of the simulator's VMs (every attach here is remote); the same across restarts,
    /// since a database belongs to one appliance.
    host_vm: VmId,
    sim: RunningSim,
    daemon: Option<Child>,
    client: VolumeClient,
    pool: MySqlPool,
}

impl World {
    async fn new(config: SimConfig) -> Self {
        let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
        let sim = cloudstack_sim::spawn("127.0.0.1:0".parse().expect("addr"), config)
            .await
            .expect("simulator");
        let admin = MySqlPool::connect(MYSQL)
            .await
            .expect("MariaDB at 127.0.0.1:3306 (scripts/services.sh starts it)");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE vd_bench_{tag}"
        )))
        .execute(&admin)
        .await
        .expect("create the database");
        let pool = MySqlPool::connect(&format!("{MYSQL}/vd_bench_{tag}"))
            .await
            .expect("database");
        let client = VolumeClient::connect(AMQP_URL, &format!("bench{tag}"))
            .await
            .expect("RabbitMQ at 127.0.0.1:5672 (scripts/services.sh starts it)");
        client.declare_topology().await.expect("topology");
        let mut world = Self {
            tag,
            host_vm: VmId::new_random(),
            sim,
            daemon: None,
            client,
            pool,
        };
        world.start().await;
        world
    }

    fn prefix(&self) -> String {
        format!("bench{}", self.tag)
    }

    /// This phase's directory: an empty sysfs tree (no host VM here) and the persistent names.
    fn dir(&self) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("vd-bench-{}", self.tag));
        let _ = std::fs::create_dir_all(dir.join("block"));
        dir
    }

    /// Starts the daemon and waits until `/ready` answers 200.
    async fn start(&mut self) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let http: SocketAddr = ([127, 0, 0, 1], port).into();
        let (key, secret) = self.sim.sim.keys();
        let child = Process::new(env!("CARGO_BIN_EXE_volume-daemon"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("AMQP_URL", AMQP_URL)
            .env("AMQP_PREFIX", self.prefix())
            .env("DATABASE_URL", format!("{MYSQL}/vd_bench_{}", self.tag))
            .env("HTTP_ADDR", http.to_string())
            .env("CLOUDSTACK_API_URL", self.sim.api_url())
            .env("CLOUDSTACK_API_KEY", key)
            .env("CLOUDSTACK_SECRET_KEY", secret)
            .env("MAX_CONCURRENT_OPERATIONS", CONCURRENCY.to_string())
            // Configured from the environment, as a deployment without ossea_configs is (a
            // host VM that is not one of the simulator's: every attach here is remote).
            .env("CLOUDSTACK_ZONE_ID", ZONE_ID.to_string())
            .env("HOST_VM_ID", self.host_vm.to_string())
            .env("SYSFS_ROOT", self.dir())
            .env("PERSISTENT_DEVICE_DIR", self.dir().join("persistent"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("volume-daemon starts");
        self.daemon = Some(child);
        let url = format!("http://{http}/ready");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = reqwest_get(&url).await
                && r == 200
            {
                return;
            }
            assert!(Instant::now() < deadline, "the daemon did not get ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.daemon
            .as_ref()
            .and_then(Child::id)
            .expect("daemon pid")
    }

    /// SIGTERM, then wait for the process to end.
    async fn stop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = Process::new("kill")
                .args(["-TERM", &child.id().unwrap_or(0).to_string()])
                .status()
                .await;
            let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
        }
    }

    /// Stops the daemon; dropping the world removes its queues, exchanges, database and
    /// directory.
    async fn clean(mut self) {
        self.stop().await;
    }
}

/// Clean-up also when a phase panics (a bench that fails must leave nothing behind either):
/// on a thread of its own, since Drop cannot await.
impl Drop for World {
    fn drop(&mut self) {
        if let Some(daemon) = self.daemon.as_mut() {
            let _ = daemon.start_kill();
        }
        let tag = self.tag.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(remove(&tag));
        })
        .join();
    }
}

/// Removes what a world of `tag` created.
async fn remove(tag: &str) {
    let topology = schema::Topology::new(format!("bench{tag}"));
    if let Ok(conn) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await
        && let Ok(ch) = conn.create_channel().await
    {
        for q in [topology.commands_queue(), topology.dead_letter_queue()] {
            let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
        }
        for x in [
            topology.commands_exchange(),
            topology.events_exchange(),
            topology.dead_letter_exchange(),
        ] {
            let _ = ch
                .exchange_delete(x.as_str().into(), Default::default())
                .await;
        }
    }
    if let Ok(admin) = MySqlPool::connect(MYSQL).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS vd_bench_{tag}"
        )))
        .execute(&admin)
        .await;
    }
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("vd-bench-{tag}")));
}

impl World {
    /// Publishes every command (50 publishes in flight at a time) and returns, per command id,
    /// when it was published and when its terminal event came, once all have.
    async fn run(&self, commands: Vec<Command>, pace: Option<Duration>) -> Timings {
        let mut events = self
            .client
            .subscribe(Subscription::default())
            .await
            .expect("subscribe");
        let mut published = HashMap::new();
        let want = commands.len();
        let ended = tokio::spawn(async move {
            let mut ended = HashMap::new();
            while ended.len() < want {
                let next = tokio::time::timeout(WAIT, events.next()).await;
                let Ok(Some(Ok(received))) = next else {
                    panic!("events stopped after {} of {want}", ended.len());
                };
                ended.insert(received.event.data.operation_id.to_string(), Instant::now());
                let _ = received.ack().await;
            }
            ended
        });
        let started = Instant::now();
        let started_wall = chrono::Utc::now();
        match pace {
            Some(every) => {
                let mut tick = tokio::time::interval(every);
                for c in &commands {
                    tick.tick().await;
                    published.insert(c.command_id.to_string(), Instant::now());
                    self.client.publish_only(c).await.expect("publish");
                }
            }
            None => {
                for chunk in commands.chunks(50) {
                    let now = Instant::now();
                    futures_util::future::join_all(
                        chunk.iter().map(|c| self.client.publish_only(c)),
                    )
                    .await
                    .into_iter()
                    .for_each(|r| r.expect("publish"));
                    for c in chunk {
                        published.insert(c.command_id.to_string(), now);
                    }
                }
            }
        }
        let ended = ended.await.expect("event collector");
        Timings {
            started,
            started_wall,
            published,
            ended,
        }
    }
}

struct Timings {
    started: Instant,
    /// The wall clock at `started`, to place the instants next to the database's times.
    started_wall: chrono::DateTime<chrono::Utc>,
    published: HashMap<String, Instant>,
    ended: HashMap<String, Instant>,
}

impl Timings {
    fn makespan(&self) -> Duration {
        self.ended.values().max().copied().unwrap_or(self.started) - self.started
    }

    fn wall(&self, at: Instant) -> chrono::DateTime<chrono::Utc> {
        self.started_wall + chrono::TimeDelta::from_std(at - self.started).unwrap_or_default()
    }

    /// Median time of each stage of an operation's path, from the instants and the rows'
    /// timestamps: publish → accepted (`created_at`), → executing (`started_at`), → ended
    /// (`completed_at`: the CloudStack calls, the job and its polling, the outcome's commit), →
    /// the event received by the subscriber.
    async fn stages(&self, pool: &MySqlPool) -> String {
        type Row = (
            String,
            chrono::DateTime<chrono::Utc>,
            Option<chrono::DateTime<chrono::Utc>>,
            Option<chrono::DateTime<chrono::Utc>>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, created_at, started_at, completed_at FROM volume_operations",
        )
        .fetch_all(pool)
        .await
        .expect("operations");
        let mut stages: [Vec<f64>; 4] = Default::default();
        for (id, created, started, completed) in rows {
            let (Some(p), Some(e), Some(started), Some(completed)) = (
                self.published.get(&id),
                self.ended.get(&id),
                started,
                completed,
            ) else {
                continue;
            };
            let ms = |d: chrono::TimeDelta| d.num_microseconds().unwrap_or(0) as f64 / 1000.0;
            stages[0].push(ms(created - self.wall(*p)));
            stages[1].push(ms(started - created));
            stages[2].push(ms(completed - started));
            stages[3].push(ms(self.wall(*e) - completed));
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        let names = [
            "publish → accepted",
            "→ executing",
            "→ ended",
            "→ event received",
        ];
        names
            .iter()
            .zip(stages.iter_mut())
            .map(|(n, v)| format!("{n} {:.1} ms", median(v)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn latencies(&self) -> Vec<Duration> {
        let mut l: Vec<Duration> = self
            .published
            .iter()
            .filter_map(|(id, p)| self.ended.get(id).map(|e| *e - *p))
            .collect();
        l.sort();
        l
    }
}

async fn reqwest_get(url: &str) -> Result<u16, std::io::Error> {
    // A plain HTTP/1.0 GET: no client crate needed for one status line.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.trim_start_matches("http://");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = tokio::net::TcpStream::connect(host).await?;
    s.write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = vec![0; 64];
    let n = s.read(&mut buf).await?;
    let line = String::from_utf8_lossy(&buf[..n]);
    Ok(line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `n` creates naming their disk offering, as the bare client does (without one the daemon
/// asks CloudStack for the zone's offerings first: a call the limit would not make).
fn creates(n: usize, tag: &str) -> Vec<Command> {
    (0..n)
        .map(|i| {
            CreateVolume::new(format!("bench-{tag}-{i}"), "1GiB".parse().expect("size"))
                .disk_offering(CUSTOM_OFFERING_ID)
                .into()
        })
        .collect()
}

/// VmHWM of `pid`, in bytes.
fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<u64>().ok())
            })
        })
        .unwrap_or(0)
        * 1024
}

/// CPU seconds (user + system) a process has used so far, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / 100.0
}

/// The pids of the processes named `name` (`pidof`).
fn pids_of(name: &str) -> Vec<String> {
    std::process::Command::new("pidof")
        .arg(name)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Where phase 1's CPU goes: seconds per component, and the server's statement count.
#[derive(Default)]
struct Profile {
    cpu: Vec<(&'static str, f64)>,
    questions: i64,
    /// Statements the server prepared (each new statement text on a connection costs one).
    prepares: i64,
}

impl Profile {
    /// Adds what was spent from `start` to `end` (two readings of [`profile`]).
    fn add(&mut self, start: &Profile, end: &Profile) {
        for ((what, a), (_, b)) in start.cpu.iter().zip(&end.cpu) {
            match self.cpu.iter_mut().find(|(w, _)| w == what) {
                Some((_, total)) => *total += b - a,
                None => self.cpu.push((what, b - a)),
            }
        }
        self.questions += end.questions - start.questions;
        self.prepares += end.prepares - start.prepares;
    }
}

async fn profile(daemon_pid: u32, pool: &MySqlPool) -> Profile {
    let sum = |pids: Vec<String>| pids.iter().map(|p| cpu_seconds(p)).sum::<f64>();
    let status = |name: &'static str| async move {
        let value: String = sqlx::query_scalar(
            "SELECT CAST(VARIABLE_VALUE AS CHAR) FROM information_schema.GLOBAL_STATUS \
             WHERE VARIABLE_NAME = ?",
        )
        .bind(name)
        .fetch_one(pool)
        .await
        .expect("status");
        value.parse::<i64>().unwrap_or(0)
    };
    Profile {
        cpu: vec![
            ("daemon", cpu_seconds(&daemon_pid.to_string())),
            ("MariaDB", sum(pids_of("mariadbd"))),
            ("RabbitMQ", sum(pids_of("beam.smp"))),
            ("simulator + bench clients", cpu_seconds("self")),
        ],
        questions: status("Questions").await,
        prepares: status("Com_stmt_prepare").await,
    }
}

/// Rounds of figure 1: the daemon and the bare client take turns, so a burst of load from
/// the machine's neighbours falls on one round, not on one side; the median round counts.
const ROUNDS: usize = 3;

/// 1 and 5: in each round the daemon's creates/s, then the bare client's; the daemon's peak
/// RSS over all of them. Returns the rounds and the RSS.
async fn zero_latency() -> (Vec<(f64, f64)>, u64, f64) {
    let config = SimConfig {
        job_latency: Duration::ZERO,
        ..SimConfig::default()
    };
    let n = 1000;
    let world = World::new(config.clone()).await;
    let sim = cloudstack_sim::spawn("127.0.0.1:0".parse().expect("addr"), config)
        .await
        .expect("simulator");
    let mut rounds = Vec::with_capacity(ROUNDS);
    let mut busy = Profile::default();
    for round in 0..ROUNDS {
        let start = profile(world.pid(), &world.pool).await;
        let t = world.run(creates(n, &format!("z{round}")), None).await;
        busy.add(&start, &profile(world.pid(), &world.pool).await);
        let daemon = n as f64 / t.makespan().as_secs_f64();
        rounds.push((daemon, bare_creates(&sim, n).await));
    }
    let rss = peak_rss(world.pid());
    let per = |total: f64| total * 1000.0 / (n * ROUNDS) as f64;
    let cpu: Vec<String> = busy
        .cpu
        .iter()
        .map(|(what, seconds)| format!("{what} {:.2} ms", per(*seconds)))
        .collect();
    println!(
        "   profile of phase 1, per command: CPU {}; {:.1} SQL statements (the server's Questions), {:.2} statement prepares",
        cpu.join(", "),
        busy.questions as f64 / (n * ROUNDS) as f64,
        busy.prepares as f64 / (n * ROUNDS) as f64
    );
    world.clean().await;
    // Daemon, database and broker: what the floor loop of figure 8 is compared with.
    let serving: f64 = busy
        .cpu
        .iter()
        .filter(|(what, _)| matches!(*what, "daemon" | "MariaDB" | "RabbitMQ"))
        .map(|(_, s)| per(*s))
        .sum();
    (rounds, rss, serving)
}

/// The limit of figure 1: `n` createVolume + job polls against `sim`, `CONCURRENCY` at a time,
/// by the CloudStack client alone (no broker, no database): creates/s.
async fn bare_creates(sim: &cloudstack_sim::RunningSim, n: usize) -> f64 {
    let client = bare_client(sim);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers = (0..CONCURRENCY).map(|_| {
        let (client, next) = (client.clone(), next.clone());
        tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let (_, job) = client
                    .create_volume("bare", ZONE_ID, CUSTOM_OFFERING_ID, Some(1))
                    .await
                    .expect("createVolume");
                client
                    .wait_for_volume_job(&job, JobPolling::default())
                    .await
                    .expect("job");
            }
        })
    });
    for w in futures_util::future::join_all(workers).await {
        w.expect("worker");
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// 2: publish → event latencies at a steady 100 creates/s with 50 ms jobs.
async fn steady() -> (Vec<Duration>, String) {
    let world = World::new(SimConfig {
        job_latency: Duration::from_millis(50),
        ..SimConfig::default()
    })
    .await;
    let t = world
        .run(creates(300, "s"), Some(Duration::from_millis(10)))
        .await;
    let stages = t.stages(&world.pool).await;
    world.clean().await;
    (t.latencies(), stages)
}

/// The attach phases' cloud: 25 VMs taking 8 data disks each, jobs of `job`.
fn attach_cloud(job: Duration) -> (Vec<VmId>, SimConfig) {
    let vms: Vec<VmId> = (0..25).map(|_| VmId::new_random()).collect();
    let config = SimConfig {
        job_latency: job,
        vms: vms.clone(),
        // 8 per VM: a hypervisor whose limit allows it (the simulator's default is 6).
        max_data_disks: 8,
        ..SimConfig::default()
    };
    (vms, config)
}

/// 200 attaches over `vms` through the daemon of `world`: its timings.
async fn run_attaches(world: &World, vms: &[VmId]) -> Timings {
    let volumes: Vec<VolumeId> = (0..200)
        .map(|i| world.sim.sim.seed_volume(&format!("a{i}"), 1 << 30))
        .collect();
    let commands = volumes
        .iter()
        .enumerate()
        .map(|(i, v)| Command::attach(*v, vms[i % vms.len()]))
        .collect();
    world.run(commands, None).await
}

/// 3: the makespan of 200 attaches over 25 VMs with 500 ms jobs.
async fn attaches() -> Duration {
    let (vms, config) = attach_cloud(Duration::from_millis(500));
    let world = World::new(config).await;
    let t = run_attaches(&world, &vms).await;
    world.clean().await;
    t.makespan()
}

/// 4: the relay draining a pre-filled outbox, then a bare confirmed-publish loop of the same
/// messages to the same exchange. Events/s of each in the median round, and every round's
/// ratio. 20,000 events a round: with 5,000 (a tenth of a second or two) one pause of the
/// shared machine moved the ratio between 0.6 and 1.6 from one run to the next.
async fn relay() -> ((f64, f64), Vec<f64>) {
    let n = 20_000;
    let mut world = World::new(SimConfig::default()).await;
    let exchange = format!("{}.events", world.prefix());
    let payload = serde_json::to_string(&schema::CloudEvent::new(
        schema::EventId::new_random(),
        chrono::Utc::now(),
        schema::EventData::rejected(
            schema::CommandId::parse("bench").expect("id"),
            schema::OperationType::Create.into(),
            None,
            schema::EventError::new(schema::ErrorCode::InvalidCommand, "bench"),
            chrono::Utc::now(),
        ),
    ))
    .expect("payload");
    // Rounds of the relay, then the bare loop, as in figure 1: the median round counts.
    let mut rounds = Vec::with_capacity(ROUNDS);
    let (mut relaying, mut publishing) = (Profile::default(), Profile::default());
    for _ in 0..ROUNDS {
        world.stop().await;
        let (relay, (start, end)) = relay_round(&mut world, n, &exchange, &payload).await;
        let drained = profile(world.pid(), &world.pool).await;
        let bare = bare_publish(n, &exchange, &payload).await;
        let after = profile(world.pid(), &world.pool).await;
        relaying.add(&start, &end);
        publishing.add(&drained, &after);
        rounds.push((relay, bare));
    }
    let per_event = |p: &Profile| {
        let cpu: Vec<String> = p
            .cpu
            .iter()
            .map(|(what, s)| format!("{what} {:.1} µs", s * 1e6 / (n * ROUNDS) as f64))
            .collect();
        cpu.join(", ")
    };
    println!(
        "   CPU per event: relay (with the daemon's start) {}; bare publish {}",
        per_event(&relaying),
        per_event(&publishing)
    );
    world.clean().await;
    rounds.sort_by(|a, b| (a.0 / a.1).total_cmp(&(b.0 / b.1)));
    let ratios = rounds.iter().map(|(r, b)| r / b).collect();
    (rounds[rounds.len() / 2], ratios)
}

/// One round of figure 4: `n` events put in the outbox of the stopped daemon of `world`, the
/// daemon started, events/s from its first confirmed publish to its last, and the CPU spent
/// from the daemon's start until the outbox was empty.
async fn relay_round(
    world: &mut World,
    n: usize,
    exchange: &str,
    payload: &str,
) -> (f64, (Profile, Profile)) {
    sqlx::query("DELETE FROM outbox")
        .execute(&world.pool)
        .await
        .expect("empty the outbox");
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let values: Vec<String> = chunk
            .iter()
            .map(|_| format!("(UUID(), '{exchange}', 'volume.create.failed', '{payload}')"))
            .collect();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO outbox (event_id, exchange, routing_key, payload) VALUES {}",
            values.join(", ")
        )))
        .execute(&world.pool)
        .await
        .expect("pre-fill the outbox");
    }
    let before = profile(0, &world.pool).await;
    world.start().await;
    let started = Instant::now();
    loop {
        // Whether any is left, not how many: counting 20,000 rows every 20 ms would take the
        // database's time from the relay it measures.
        let left: i64 =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM outbox WHERE published_at IS NULL)")
                .fetch_one(&world.pool)
                .await
                .expect("any left");
        if left == 0 {
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "the relay did not drain the outbox"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // From the first confirmed publish to the last, as the relay marked them.
    let micros: i64 = sqlx::query_scalar(
        "SELECT TIMESTAMPDIFF(MICROSECOND, MIN(published_at), MAX(published_at)) FROM outbox",
    )
    .fetch_one(&world.pool)
    .await
    .expect("span");
    let end = profile(world.pid(), &world.pool).await;
    (n as f64 / ((micros.max(1) as f64) / 1e6), (before, end))
}

/// Figure 4's limit: `n` confirmed publishes of `payload` to `exchange` (256 in flight), per s.
async fn bare_publish(n: usize, exchange: &str, payload: &str) -> f64 {
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .expect("broker");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let bare_started = Instant::now();
    let mut confirms = Vec::with_capacity(256);
    for _ in 0..n {
        let confirm = ch
            .basic_publish(
                exchange.into(),
                "volume.create.failed".into(),
                BasicPublishOptions::default(),
                payload.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish");
        confirms.push(confirm);
        if confirms.len() == 256 {
            for c in confirms.drain(..) {
                c.await.expect("confirm");
            }
        }
    }
    for c in confirms {
        c.await.expect("confirm");
    }
    let bare = n as f64 / bare_started.elapsed().as_secs_f64();
    let _ = conn.close(200, "done".into()).await;
    bare
}

/// The cloud's cost in a phase: job polls per job and API requests per operation, from the
/// simulator's call record.
fn cloud_cost(sim: &cloudstack_sim::Sim, operations: usize) -> String {
    let calls = sim.calls();
    let jobs = calls
        .iter()
        .filter(|c| {
            matches!(
                c.command.as_str(),
                "createVolume" | "attachVolume" | "detachVolume"
            )
        })
        .count()
        .max(1);
    let polls = calls
        .iter()
        .filter(|c| c.command == "queryAsyncJobResult")
        .count();
    format!(
        "{:.1} job polls per job, {:.1} API requests per operation",
        polls as f64 / jobs as f64,
        calls.len() as f64 / operations.max(1) as f64
    )
}

/// Where an attach run's time goes, from the simulator's call record: how long after `started`
/// the first request came, the median hand-off per slot (the answer that showed a job ended →
/// the `attachVolume` of the operation taking its slot, pairing the k-th end with the
/// (k + 16)-th attach), the median from an operation's first request (its read, if any) to its
/// `attachVolume`, and the last job's end → `finished`.
fn timeline(
    sim: &cloudstack_sim::Sim,
    started: chrono::DateTime<chrono::Utc>,
    finished: chrono::DateTime<chrono::Utc>,
) -> String {
    let calls = sim.calls();
    let mut first: HashMap<&str, chrono::DateTime<chrono::Utc>> = HashMap::new();
    let mut attach: HashMap<&str, chrono::DateTime<chrono::Utc>> = HashMap::new();
    let mut ends: HashMap<&str, chrono::DateTime<chrono::Utc>> = HashMap::new();
    for c in &calls {
        match (
            c.command.as_str(),
            c.params.get("id"),
            c.params.get("jobid"),
        ) {
            ("listVolumes" | "attachVolume", Some(v), _) => {
                first.entry(v).or_insert(c.at);
                if c.command == "attachVolume" {
                    attach.insert(v, c.at);
                }
            }
            ("queryAsyncJobResult", _, Some(j)) => {
                let end = ends.entry(j).or_insert(c.answered_at);
                *end = (*end).max(c.answered_at);
            }
            _ => {}
        }
    }
    let ms_between = |a: chrono::DateTime<chrono::Utc>, b: chrono::DateTime<chrono::Utc>| {
        (b - a).num_microseconds().unwrap_or(0) as f64 / 1000.0
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let mut begins: Vec<_> = first.values().copied().collect();
    let mut attaches: Vec<_> = attach.values().copied().collect();
    let mut ended: Vec<_> = ends.values().copied().collect();
    begins.sort();
    attaches.sort();
    ended.sort();
    let handoff = median(
        ended
            .iter()
            .zip(attaches.iter().skip(CONCURRENCY))
            .map(|(e, b)| ms_between(*e, *b))
            .collect(),
    );
    let to_attach = median(
        attach
            .iter()
            .map(|(v, a)| ms_between(first[v], *a))
            .collect(),
    );
    format!(
        "first request {:.1} ms after the first publish; per slot, a job seen ended → the next attachVolume {handoff:.1} ms (median); an operation's first request → its attachVolume {to_attach:.1} ms (median); last job seen ended → last event {:.1} ms",
        begins.first().map_or(f64::NAN, |b| ms_between(started, *b)),
        ended.last().map_or(f64::NAN, |e| ms_between(*e, finished)),
    )
}

/// Makes `sim` answer every request after [`REQUEST_DELAY`].
fn slow_cloud(sim: &cloudstack_sim::Sim) {
    sim.set_faults(cloudstack_sim::Faults {
        latency_ms: u64::try_from(REQUEST_DELAY.as_millis()).unwrap_or(u64::MAX),
        ..sim.faults()
    });
}

/// A CloudStack client of `sim` alone (no broker, no database): the limits' client.
fn bare_client(sim: &cloudstack_sim::RunningSim) -> Client {
    let (key, secret) = sim.sim.keys();
    Client::new(
        Client::http().expect("http"),
        Credentials {
            api_url: sim.api_url(),
            api_key: key,
            secret_key: secret.into(),
        },
        RetryPolicy::default(),
    )
}

/// 6: 200 attaches over 25 VMs with 2 s jobs on the slow cloud: the daemon's makespan, a bare
/// client's (the same rules: 16 at a time, one per VM at a time, the same polling), and the
/// cloud's cost of the daemon's run.
async fn slow_attaches() -> (Duration, Duration, String, String) {
    let (vms, config) = attach_cloud(Duration::from_secs(2));
    let world = World::new(config.clone()).await;
    slow_cloud(&world.sim.sim);
    let t = run_attaches(&world, &vms).await;
    let cost = cloud_cost(&world.sim.sim, 200);
    let daemon_time = timeline(
        &world.sim.sim,
        t.started_wall,
        t.wall(t.started + t.makespan()),
    );
    world.clean().await;

    let sim = cloudstack_sim::spawn("127.0.0.1:0".parse().expect("addr"), config)
        .await
        .expect("simulator");
    slow_cloud(&sim.sim);
    let volumes: Vec<VolumeId> = (0..200)
        .map(|i| sim.sim.seed_volume(&format!("b{i}"), 1 << 30))
        .collect();
    let client = bare_client(&sim);
    let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let (started, started_wall) = (Instant::now(), chrono::Utc::now());
    // One task per VM, its attaches in order; the semaphore caps them all at 16.
    let per_vm = vms.iter().enumerate().map(|(k, vm)| {
        let (client, slots, vm) = (client.clone(), slots.clone(), *vm);
        let mine: Vec<VolumeId> = volumes.iter().skip(k).step_by(vms.len()).copied().collect();
        tokio::spawn(async move {
            for v in mine {
                let _slot = slots.acquire().await.expect("semaphore");
                let job = client
                    .attach_volume(v, vm, None)
                    .await
                    .expect("attachVolume");
                client
                    .wait_for_volume_job(&job, JobPolling::default())
                    .await
                    .expect("job");
            }
        })
    });
    for w in futures_util::future::join_all(per_vm).await {
        w.expect("worker");
    }
    let bare = started.elapsed();
    let bare_time = timeline(
        &sim.sim,
        started_wall,
        started_wall + chrono::TimeDelta::from_std(bare).unwrap_or_default(),
    );
    let times = format!("daemon: {daemon_time}\n   bare client: {bare_time}");
    (t.makespan(), bare, cost, times)
}

/// 7: a steady 100 creates/s with 50 ms jobs on the slow cloud: the daemon's publish → event
/// latencies, a bare client's createVolume + job latencies at the same pace (16 at a time),
/// and the cloud's cost of the daemon's run.
async fn slow_steady() -> (Vec<Duration>, Vec<Duration>, String) {
    let config = SimConfig {
        job_latency: Duration::from_millis(50),
        ..SimConfig::default()
    };
    let world = World::new(config.clone()).await;
    slow_cloud(&world.sim.sim);
    let n = 300;
    let t = world
        .run(creates(n, "ss"), Some(Duration::from_millis(10)))
        .await;
    let cost = cloud_cost(&world.sim.sim, n);
    world.clean().await;

    let sim = cloudstack_sim::spawn("127.0.0.1:0".parse().expect("addr"), config)
        .await
        .expect("simulator");
    slow_cloud(&sim.sim);
    let client = bare_client(&sim);
    let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut each = Vec::with_capacity(n);
    for _ in 0..n {
        tick.tick().await;
        let (client, slots) = (client.clone(), slots.clone());
        let asked = Instant::now();
        each.push(tokio::spawn(async move {
            let _slot = slots.acquire().await.expect("semaphore");
            let (_, job) = client
                .create_volume("bare", ZONE_ID, CUSTOM_OFFERING_ID, Some(1))
                .await
                .expect("createVolume");
            client
                .wait_for_volume_job(&job, JobPolling::default())
                .await
                .expect("job");
            asked.elapsed()
        }));
    }
    let mut bare: Vec<Duration> = futures_util::future::join_all(each)
        .await
        .into_iter()
        .map(|r| r.expect("worker"))
        .collect();
    bare.sort();
    (t.latencies(), bare, cost)
}

/// 8's floor: per command, a publish, consume and ack through a quorum queue, one confirmed
/// publish to an exchange, one INSERT and one UPDATE commit; 16 at a time. CPU seconds per
/// command of the bench process, MariaDB and RabbitMQ together.
async fn floor_loop() -> f64 {
    use futures_util::StreamExt;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};
    let n = 1000;
    let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let admin = MySqlPool::connect(MYSQL).await.expect("MariaDB");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE vd_floor_{tag}"
    )))
    .execute(&admin)
    .await
    .expect("database");
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(CONCURRENCY as u32)
        .connect(&format!("{MYSQL}/vd_floor_{tag}"))
        .await
        .expect("database");
    sqlx::query("CREATE TABLE floor (id VARCHAR(64) PRIMARY KEY, status VARCHAR(16), body JSON)")
        .execute(&pool)
        .await
        .expect("table");
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .expect("broker");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let queue = format!("floor{tag}");
    let exchange = format!("floor{tag}.events");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("quorum queue");
    ch.exchange_declare(
        exchange.as_str().into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("exchange");
    let consumer_ch = conn.create_channel().await.expect("channel");
    consumer_ch
        .basic_qos(CONCURRENCY as u16, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = consumer_ch
        .basic_consume(
            queue.as_str().into(),
            "floor".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let body = serde_json::to_vec(&creates(1, "floor")[0].to_body()).expect("json");
    let me = std::process::id().to_string();
    let reading = || {
        cpu_seconds(&me)
            + pids_of("mariadbd")
                .iter()
                .map(|p| cpu_seconds(p))
                .sum::<f64>()
            + pids_of("beam.smp")
                .iter()
                .map(|p| cpu_seconds(p))
                .sum::<f64>()
    };
    let before = reading();
    // Publishers: 16 at a time, each message confirmed.
    let publish = async {
        for chunk in (0..n).collect::<Vec<usize>>().chunks(CONCURRENCY) {
            let confirms = futures_util::future::join_all(chunk.iter().map(|_| {
                ch.basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_delivery_mode(2),
                )
            }))
            .await;
            for c in confirms {
                c.expect("publish").await.expect("confirm");
            }
        }
    };
    // The consumer: per message an INSERT, an UPDATE and a confirmed event, then the ack.
    let consume = async {
        let mut done = 0;
        let mut in_flight = futures_util::stream::FuturesUnordered::new();
        while done < n {
            tokio::select! {
                Some(delivery) = consumer.next(), if in_flight.len() < CONCURRENCY => {
                    let delivery = delivery.expect("delivery");
                    let (pool, ch, exchange, body) = (pool.clone(), ch.clone(), exchange.clone(), body.clone());
                    in_flight.push(async move {
                        let id = uuid::Uuid::new_v4().to_string();
                        sqlx::query("INSERT INTO floor (id, status, body) VALUES (?, 'pending', ?)")
                            .bind(&id)
                            .bind(&body)
                            .execute(&pool)
                            .await
                            .expect("insert");
                        delivery.ack(BasicAckOptions::default()).await.expect("ack");
                        sqlx::query("UPDATE floor SET status = 'completed' WHERE id = ?")
                            .bind(&id)
                            .execute(&pool)
                            .await
                            .expect("update");
                        ch.basic_publish(
                            exchange.as_str().into(),
                            "volume.create.completed".into(),
                            BasicPublishOptions::default(),
                            &body,
                            BasicProperties::default().with_delivery_mode(2),
                        )
                        .await
                        .expect("publish")
                        .await
                        .expect("confirm");
                    });
                }
                Some(()) = in_flight.next() => done += 1,
            }
        }
    };
    tokio::join!(publish, consume);
    let spent = reading() - before;
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE vd_floor_{tag}")))
        .execute(&admin)
        .await;
    spent * 1000.0 / n as f64
}

/// Whether phase `n` runs: all of them, unless `BENCH_PHASES` lists some (`1,8`; 5 and 8
/// come with 1, whose figures they read).
fn wanted(n: u8) -> bool {
    match std::env::var("BENCH_PHASES") {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .filter_map(|p| p.trim().parse::<u8>().ok())
            .any(|p| p == n || (n == 1 && (p == 5 || p == 8))),
        _ => true,
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        println!("volume-daemon end-to-end benchmark (MAX_CONCURRENT_OPERATIONS={CONCURRENCY})");
        let (mut rounds, rss, serving) = if wanted(1) {
            zero_latency().await
        } else {
            (Vec::new(), 0, 0.0)
        };
        if wanted(1) {
        rounds.sort_by(|a, b| (a.0 / a.1).total_cmp(&(b.0 / b.1)));
        let (daemon, bare) = rounds[rounds.len() / 2];
        let all: Vec<String> = rounds.iter().map(|(d, b)| format!("{:.2}", d / b)).collect();
        println!(
            "1. zero-latency creates/s (median of {ROUNDS} rounds): daemon {daemon:.0}, bare client {bare:.0}, ratio {:.2}  (target ≥ 0.60; rounds {})",
            daemon / bare,
            all.join(", ")
        );
        }
        if wanted(2) {
        let (l, stages) = steady().await;
        let job = 50.0;
        println!(
            "2. steady 100 creates/s, 50 ms jobs: publish → event p50 {:.1} ms, p99 {:.1} ms, p99/job {:.2}  (target ≤ 1.50)",
            ms(percentile(&l, 0.5)),
            ms(percentile(&l, 0.99)),
            ms(percentile(&l, 0.99)) / job
        );
        println!("   medians of its stages: {stages}");
        }
        if wanted(3) {
        let makespan = attaches().await;
        let ideal = 0.5 * f64::max((200.0_f64 / CONCURRENCY as f64).ceil(), 200.0 / 25.0);
        println!(
            "3. 200 attaches over 25 VMs, 500 ms jobs: makespan {:.2} s, ideal {ideal:.2} s, ratio {:.2}  (target ≤ 1.10)",
            makespan.as_secs_f64(),
            makespan.as_secs_f64() / ideal
        );
        }
        if wanted(4) {
        let ((relay, bare_publish), ratios) = relay().await;
        let all: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "4. relay (median of {ROUNDS} rounds of 20,000): {relay:.0} events/s from a pre-filled outbox (first to last publish), bare confirmed publish {bare_publish:.0}/s, ratio {:.2}  (target ≥ 0.50; rounds {})",
            relay / bare_publish,
            all.join(", ")
        );
        }
        if wanted(5) {
        println!(
            "5. peak RSS through 1,000 commands: {:.1} MiB  (target ≤ 40 MiB)",
            rss as f64 / (1 << 20) as f64
        );
        }
        let delay = ms(REQUEST_DELAY);
        if wanted(6) {
        let (makespan, bare, cost, times) = slow_attaches().await;
        let ideal = 2.0 * f64::max((200.0_f64 / CONCURRENCY as f64).ceil(), 200.0 / 25.0);
        println!(
            "6. cloud answering in {delay:.0} ms, 200 attaches over 25 VMs, 2 s jobs: makespan {:.2} s, ideal {ideal:.2} s, ratio {:.2}  (target ≤ 1.10); a bare client with the same rules {:.2} s ({:.2} × ideal)",
            makespan.as_secs_f64(),
            makespan.as_secs_f64() / ideal,
            bare.as_secs_f64(),
            bare.as_secs_f64() / ideal
        );
        println!("   the cloud's cost: {cost}");
        println!("   where the time goes, {times}");
        }
        if wanted(7) {
        let (daemon, bare, cost) = slow_steady().await;
        println!(
            "7. cloud answering in {delay:.0} ms, steady 100 creates/s, 50 ms jobs: daemon p50 {:.1} ms, p99 {:.1} ms; bare client p50 {:.1} ms, p99 {:.1} ms; p99 ratio {:.2}  (target ≤ 1.50)",
            ms(percentile(&daemon, 0.5)),
            ms(percentile(&daemon, 0.99)),
            ms(percentile(&bare, 0.5)),
            ms(percentile(&bare, 0.99)),
            ms(percentile(&daemon, 0.99)) / ms(percentile(&bare, 0.99))
        );
        println!("   the cloud's cost: {cost}");
        }
        if wanted(8) {
        let floor = floor_loop().await;
        println!(
            "8. CPU per command of phase 1 (daemon + MariaDB + RabbitMQ) {serving:.2} ms, floor loop (quorum publish/consume/ack, confirmed publish, INSERT + UPDATE) {floor:.2} ms, ratio {:.2}  (target ≤ 2.00)",
            serving / floor
        );
        }
    });
}
