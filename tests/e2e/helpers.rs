//! The test harness: [`TestEnv`] (isolated services + the daemon as a child process),
//! [`EventTap`] (a subscriber on the events exchange) and [`TcpProxy`] (a link the test cuts).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Once;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, Consumer};
use sqlx::mysql::MySqlPoolOptions;
use sqlx::{MySqlPool, Row};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use cloudstack_sim::{RunningSim, SimConfig};
use publisher::VolumeClient;
use schema::CloudEvent;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const MYSQL_SERVER: &str = "mysql://root@127.0.0.1:3306";

static TRACING: Once = Once::new();

/// `TEST_LOG=1` shows the harness's own logs.
fn init_tracing() {
    TRACING.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt().with_env_filter("info").try_init();
        }
    });
}

/// One test's world.
pub struct TestEnv {
    pub prefix: String,
    pub db_name: String,
    pub sim: RunningSim,
    /// The broker URL the daemon uses (a [`TcpProxy`] in outage tests).
    pub daemon_amqp_url: String,
    /// The broker URL (or list) the test's own clients use.
    pub client_amqp_url: String,
    pub http_addr: SocketAddr,
    daemon: Option<Child>,
    /// Log files of every daemon process this test started, oldest first.
    logs: std::sync::Mutex<Vec<PathBuf>>,
    log_dir: PathBuf,
    tag: String,
    pool: Option<MySqlPool>,
    /// Extra environment for the daemon.
    pub extra_env: Vec<(String, String)>,
    /// This test's sysfs root: the daemon's `SYSFS_ROOT` (never the machine's `/sys`), where
    /// the simulator creates the host VM's devices.
    pub sysfs: PathBuf,
    /// The host VM, when the test has one (`HOST_VM_ID`).
    pub host_vm: Option<schema::VmId>,
    /// Leave `CLOUDSTACK_*` unset: the daemon reads `ossea_configs`.
    pub cloudstack_from_db: bool,
    /// The database URL the daemon uses (a [`TcpProxy`] in outage tests); the test itself
    /// always talks to the database directly.
    pub daemon_database_url: Option<String>,
    /// More daemons on the same prefix and database (hot standbys).
    pub others: Vec<Child>,
    /// The daemon binary the next processes run: this build's unless set (the rolling upgrade
    /// test's old build).
    pub daemon_binary: Option<PathBuf>,
    /// The daemon built in this process by [`TestEnv::spawn_app`].
    app: Option<InProcess>,
}

/// A daemon running as a task of the test's own process.
struct InProcess {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), worker::app::StartError>>,
}

impl TestEnv {
    pub async fn new() -> Self {
        Self::with_sim(SimConfig::default()).await
    }

    /// A test whose daemon runs on a host VM: attachments to it get guest devices.
    pub async fn with_host_vm(config: SimConfig) -> Self {
        Self::with_sim(SimConfig {
            host_vm_id: Some(schema::VmId::new_random()),
            ..config
        })
        .await
    }

    pub async fn with_sim(mut config: SimConfig) -> Self {
        init_tracing();
        require_services().await;
        let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let sysfs = std::env::temp_dir().join(format!("volume-daemon-e2e-sysfs-{tag}"));
        std::fs::create_dir_all(sysfs.join("block")).expect("sysfs root");
        let host_vm = config.host_vm_id;
        if host_vm.is_some() {
            config.sysfs_root = Some(sysfs.clone());
            config.by_id_dir = Some(sysfs.join("by-id"));
        }
        let sim = cloudstack_sim::spawn("127.0.0.1:0".parse().expect("addr"), config)
            .await
            .expect("the simulator binds a port");
        let log_dir = std::env::temp_dir().join("volume-daemon-e2e");
        std::fs::create_dir_all(&log_dir).expect("log dir");
        Self {
            prefix: format!("t{tag}"),
            db_name: format!("vd_test_{tag}"),
            sim,
            daemon_amqp_url: AMQP_URL.into(),
            client_amqp_url: AMQP_URL.into(),
            http_addr: "127.0.0.1:0".parse().expect("addr"),
            daemon: None,
            logs: Default::default(),
            log_dir,
            tag,
            pool: None,
            extra_env: Vec::new(),
            sysfs,
            host_vm,
            cloudstack_from_db: false,
            daemon_database_url: None,
            daemon_binary: None,
            others: Vec::new(),
            app: None,
        }
    }

    /// The daemon's settings, as environment variables (a process gets them so; the in-process
    /// daemon as the flags of the same names).
    pub fn daemon_env(&self) -> Vec<(String, String)> {
        let database_url = self
            .daemon_database_url
            .clone()
            .unwrap_or_else(|| self.database_url());
        let dir = |d: &str| self.sysfs.join(d).display().to_string();
        let mut env: Vec<(String, String)> = [
            ("AMQP_URL", self.daemon_amqp_url.clone()),
            ("AMQP_PREFIX", self.prefix.clone()),
            ("DATABASE_URL", database_url),
            ("HTTP_ADDR", "127.0.0.1:0".to_owned()),
            ("LOG_FORMAT", "json".to_owned()),
            ("SHUTDOWN_GRACE_S", "5".to_owned()),
            ("SYSFS_ROOT", self.sysfs.display().to_string()),
            ("DEVICE_BY_ID_DIR", dir("by-id")),
            ("DEVICE_NODE_DIR", dir("dev")),
            // Resumed creates look for their volume after 1 s, not 35: the simulator answers
            // at once (a test of the wait sets its own).
            ("CREATE_RESUME_SETTLE_S", "1".to_owned()),
            ("PERSISTENT_DEVICE_DIR", dir("persistent")),
        ]
        .into_iter()
        .chain(self.cloudstack_env())
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        env.extend(
            self.host_vm
                .map(|vm| ("HOST_VM_ID".to_owned(), vm.to_string())),
        );
        env.extend(self.extra_env.iter().cloned());
        env
    }

    /// Builds the daemon in this process (`Application::build` with HTTP on port 0, the
    /// settings a process would get) and runs it as a task until [`TestEnv::stop_app`] or the
    /// end of the test; waits until `/ready` answers 200. The middle of the test pyramid:
    /// everything but a process boundary (no SIGKILL, no SIGTERM).
    pub async fn spawn_app(&mut self) {
        use clap::Parser;
        assert!(self.app.is_none(), "in-process daemon already running");
        let mut args = vec!["volume-daemon".to_owned()];
        for (k, v) in self.daemon_env() {
            args.push(format!("--{}", k.to_lowercase().replace('_', "-")));
            args.push(v);
        }
        let settings = worker::Settings::try_parse_from(args).expect("the daemon's settings");
        let app = worker::Application::build(settings)
            .await
            .expect("the daemon builds");
        self.http_addr = app.http_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        self.app = Some(InProcess { stop, task });
        self.wait_ready(Duration::from_secs(30)).await;
    }

    /// Stops the in-process daemon as SIGTERM would and waits for it (20 s at most).
    pub async fn stop_app(&mut self) {
        let app = self.app.take().expect("in-process daemon running");
        let _ = app.stop.send(());
        tokio::time::timeout(Duration::from_secs(20), app.task)
            .await
            .expect("the in-process daemon stops")
            .expect("its task did not panic")
            .expect("it stopped cleanly");
    }

    pub fn database_url(&self) -> String {
        format!("{MYSQL_SERVER}/{}", self.db_name)
    }

    /// Starts `volume-daemon` and waits until `/ready` answers 200.
    pub async fn start_daemon(&mut self) {
        assert!(self.daemon.is_none(), "daemon already running");
        let (child, addr) = self.spawn_process().await;
        self.daemon = Some(child);
        self.http_addr = addr;
        self.wait_ready(Duration::from_secs(30)).await;
    }

    /// Starts another daemon on the same prefix and database; returns its HTTP address.
    pub async fn spawn_other(&mut self) -> SocketAddr {
        self.spawn_other_with(&[]).await
    }

    /// [`Self::spawn_other`] with more environment, overriding the rest (its own
    /// `DATABASE_URL`, its own CloudStack key...).
    pub async fn spawn_other_with(&mut self, env: &[(&str, String)]) -> SocketAddr {
        // Another daemon is a standby only once the first holds the lease: `start_daemon`
        // returns at `/ready` 200, which a daemon still acquiring the lease answers too.
        if self.daemon.is_some() {
            self.wait_active(Duration::from_secs(30)).await;
        }
        let (child, addr) = self.spawn_process_with(env).await;
        self.others.push(child);
        addr
    }

    /// A MySQL user of this test only (with a password, allowed on the test database), for a
    /// daemon whose sessions the test must tell apart; its `DATABASE_URL`.
    pub async fn db_user(&mut self, name: &str) -> (String, String) {
        let user = format!("vd_{}_{name}", self.tag);
        let password = format!("pw-{}", self.tag);
        let admin = MySqlPoolOptions::new()
            .max_connections(1)
            .connect(MYSQL_SERVER)
            .await
            .expect("database server");
        for sql in [
            format!("CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY '{password}'"),
            format!(
                "GRANT ALL PRIVILEGES ON `{}`.* TO '{user}'@'127.0.0.1'",
                self.db_name
            ),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&admin)
                .await
                .expect("create the test user");
        }
        admin.close().await;
        let url = format!("mysql://{user}:{password}@127.0.0.1:3306/{}", self.db_name);
        (user, url)
    }

    /// `KILL`s every session of `user` (what a DBA, a failover or a proxy restart does);
    /// returns how many there were.
    pub async fn kill_sessions_of(&mut self, user: &str) -> usize {
        let pool = self.db().await;
        let ids: Vec<i64> =
            sqlx::query_scalar("SELECT id FROM information_schema.processlist WHERE user = ?")
                .bind(user)
                .fetch_all(&pool)
                .await
                .expect("processlist");
        for id in &ids {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("KILL {id}")))
                .execute(&pool)
                .await;
        }
        ids.len()
    }

    /// Waits until the test's main daemon reports `role: active`.
    pub async fn wait_active(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let (_, body) = get_json(self.http_addr, "/ready").await;
            if body["role"] == "active" {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the daemon did not become active within {within:?}: {body}\n{}",
                self.daemon_log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts a daemon process (HTTP on a port of its own choosing) and waits until it says
    /// where it listens.
    async fn spawn_process(&self) -> (Child, SocketAddr) {
        self.spawn_process_with(&[]).await
    }

    async fn spawn_process_with(&self, env: &[(&str, String)]) -> (Child, SocketAddr) {
        let log_path = {
            let mut logs = self.logs.lock().expect("logs");
            let path = self
                .log_dir
                .join(format!("daemon-{}-{}.log", self.tag, logs.len()));
            logs.push(path.clone());
            path
        };
        let log = std::fs::File::create(&log_path).expect("daemon log file");
        let binary = self
            .daemon_binary
            .clone()
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_volume-daemon")));
        let mut cmd = Command::new(binary);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info,worker=debug")
            .envs(self.daemon_env())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("volume-daemon starts");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let found = std::fs::read_to_string(&log_path)
                .unwrap_or_default()
                .lines()
                .find_map(|line| {
                    let v: serde_json::Value = serde_json::from_str(line).ok()?;
                    v.get("http_addr")?.as_str()?.parse::<SocketAddr>().ok()
                });
            if let Some(addr) = found {
                return (child, addr);
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "volume-daemon exited with {status} before listening:\n{}",
                    self.daemon_log()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "volume-daemon never said where it listens:\n{}",
                self.daemon_log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The daemon's peak resident memory so far (`VmHWM`), in bytes.
    pub fn daemon_peak_rss(&self) -> u64 {
        let pid = self
            .daemon
            .as_ref()
            .and_then(Child::id)
            .expect("daemon running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .expect("VmHWM")
    }

    /// The main daemon's process id.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().and_then(Child::id)
    }

    /// Makes the other daemon `index` (from [`Self::spawn_other_with`], listening on `addr`)
    /// the test's main daemon: after the main one was killed and it took over.
    pub fn promote_other(&mut self, index: usize, addr: SocketAddr) {
        assert!(self.daemon.is_none(), "the main daemon still runs");
        self.daemon = Some(self.others.remove(index));
        self.http_addr = addr;
    }

    /// SIGKILL: no clean-up, no released lease, unacknowledged deliveries return to the queue.
    pub async fn kill_daemon(&mut self) {
        let mut child = self.daemon.take().expect("daemon running");
        child.start_kill().expect("kill");
        let _ = child.wait().await;
    }

    fn cloudstack_env(&self) -> Vec<(&'static str, String)> {
        if self.cloudstack_from_db {
            return Vec::new();
        }
        let (key, secret) = self.sim.sim.keys();
        vec![
            ("CLOUDSTACK_API_URL", self.sim.api_url()),
            ("CLOUDSTACK_API_KEY", key),
            ("CLOUDSTACK_SECRET_KEY", secret),
        ]
    }

    pub async fn wait_ready(&mut self, within: Duration) {
        let url = format!("http://{}/ready", self.http_addr);
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok(r) = http().get(&url).send().await
                && r.status().as_u16() == 200
            {
                return;
            }
            if let Some(child) = self.daemon.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "volume-daemon exited with {status} before it was ready:\n{}",
                    self.daemon_log()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "volume-daemon not ready within {within:?}:\n{}",
                self.daemon_log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then waits for the exit; returns how long it took.
    pub async fn stop_daemon(&mut self) -> Duration {
        let mut child = self.daemon.take().expect("daemon running");
        let started = tokio::time::Instant::now();
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .expect("volume-daemon exits after SIGTERM")
            .expect("wait");
        assert!(
            status.success(),
            "volume-daemon exited with {status}:\n{}",
            self.daemon_log()
        );
        started.elapsed()
    }

    /// The logs of every daemon process of this test, one after the other.
    pub fn daemon_log(&self) -> String {
        let logs = self.logs.lock().map(|l| l.clone()).unwrap_or_default();
        logs.iter()
            .map(|p| {
                format!(
                    "=== {} ===\n{}",
                    p.display(),
                    std::fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A publishing client on this test's prefix, topology declared.
    pub async fn client(&self) -> VolumeClient {
        let client = VolumeClient::connect(&self.client_amqp_url, &self.prefix)
            .await
            .expect("broker reachable");
        client.declare_topology().await.expect("topology declared");
        client
    }

    /// Publishes `command` and returns its terminal event (30 s at most).
    pub async fn execute(&self, command: &schema::Command) -> CloudEvent {
        let client = self.client().await;
        client
            .publish(command)
            .await
            .expect("published")
            .wait(Duration::from_secs(30))
            .await
            .expect("terminal event")
    }

    /// A pool on the test database (which the daemon created).
    pub async fn db(&mut self) -> MySqlPool {
        if let Some(p) = &self.pool {
            return p.clone();
        }
        let pool = MySqlPoolOptions::new()
            .max_connections(2)
            .connect(&self.database_url())
            .await
            .expect("the test database exists (the daemon creates it)");
        self.pool = Some(pool.clone());
        pool
    }

    pub async fn operation(&mut self, id: &str) -> Option<OperationRow> {
        let pool = self.db().await;
        let row = sqlx::query(
            "SELECT CAST(status AS CHAR) AS status, volume_id, vm_id, CAST(request AS CHAR) AS request, \
             CAST(response AS CHAR) AS response, error_code, cloudstack_job_id, event_id, attempts \
             FROM volume_operations WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&pool)
        .await
        .expect("query volume_operations")?;
        let json = |col: &str| -> Option<serde_json::Value> {
            row.try_get::<Option<String>, _>(col)
                .expect("column")
                .map(|s| serde_json::from_str(&s).expect("valid JSON column"))
        };
        Some(OperationRow {
            status: row.try_get("status").expect("status"),
            volume_id: row.try_get("volume_id").expect("volume_id"),
            vm_id: row.try_get("vm_id").expect("vm_id"),
            request: json("request"),
            response: json("response"),
            error_code: row.try_get("error_code").expect("error_code"),
            cloudstack_job_id: row.try_get("cloudstack_job_id").expect("job"),
            event_id: row.try_get("event_id").expect("event_id"),
            attempts: row.try_get("attempts").expect("attempts"),
        })
    }

    /// Polls until `check` holds for the operation row.
    pub async fn wait_for_operation(
        &mut self,
        id: &str,
        within: Duration,
        check: impl Fn(&OperationRow) -> bool,
    ) -> OperationRow {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(row) = self.operation(id).await
                && check(&row)
            {
                return row;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "operation {id} did not reach the expected state within {within:?}; now {:?}\n{}",
                self.operation(id).await,
                self.daemon_log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Outbox rows: (event_id, routing_key, published?).
    pub async fn outbox(&mut self) -> Vec<(String, String, bool)> {
        let pool = self.db().await;
        sqlx::query("SELECT event_id, routing_key, published_at IS NOT NULL AS published FROM outbox ORDER BY id")
            .fetch_all(&pool)
            .await
            .expect("query outbox")
            .into_iter()
            .map(|r| {
                (
                    r.get::<String, _>("event_id"),
                    r.get::<String, _>("routing_key"),
                    r.get::<i64, _>("published") == 1,
                )
            })
            .collect()
    }

    /// The outbox once every row is marked published, or as it is after `within`. A row is
    /// marked only after the broker's confirm, so possibly just after a subscriber got the
    /// event.
    pub async fn outbox_once_published(&mut self, within: Duration) -> Vec<(String, String, bool)> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let outbox = self.outbox().await;
            if outbox.iter().all(|r| r.2) || tokio::time::Instant::now() > deadline {
                return outbox;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `device_mappings` rows: volume id → (vm, mode, device_path, linux_state, cloudstack_state).
    pub async fn mappings(&mut self) -> std::collections::BTreeMap<String, MappingRow> {
        let pool = self.db().await;
        sqlx::query(
            "SELECT volume_id, vm_id, CAST(operation_mode AS CHAR) AS mode, device_path, linux_state, cloudstack_state, serial \
             FROM device_mappings",
        )
        .fetch_all(&pool)
        .await
        .expect("query device_mappings")
        .into_iter()
        .map(|r| {
            (
                r.get::<String, _>("volume_id"),
                MappingRow {
                    vm_id: r.get("vm_id"),
                    mode: r.get("mode"),
                    device_path: r.get("device_path"),
                    linux_state: r.get("linux_state"),
                    cloudstack_state: r.get("cloudstack_state"),
                    serial: r.get("serial"),
                },
            )
        })
        .collect()
    }

    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        get_json(self.http_addr, path).await
    }

    /// Every row of `volume_operations`: id → status.
    pub async fn statuses(&mut self) -> std::collections::HashMap<String, String> {
        let pool = self.db().await;
        sqlx::query("SELECT id, CAST(status AS CHAR) AS status FROM volume_operations")
            .fetch_all(&pool)
            .await
            .expect("query volume_operations")
            .into_iter()
            .map(|r| (r.get::<String, _>("id"), r.get::<String, _>("status")))
            .collect()
    }
}

/// GET a JSON document from a daemon's HTTP server.
pub async fn get_json(addr: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let r = http()
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .expect("HTTP request");
    let status = r.status().as_u16();
    (status, r.json().await.expect("JSON body"))
}

/// GET a text document (metrics).
pub async fn get_text(addr: SocketAddr, path: &str) -> String {
    let r = http()
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .expect("HTTP request");
    r.text().await.expect("text body")
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.start_kill();
        }
        for child in &mut self.others {
            let _ = child.start_kill();
        }
        if std::thread::panicking() {
            eprintln!("--- volume-daemon logs ---\n{}", self.daemon_log());
        }
        let prefix = self.prefix.clone();
        let db = self.db_name.clone();
        let tag = self.tag.clone();
        let logs = self.logs.lock().map(|l| l.clone()).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&self.sysfs);
        // Async clean-up on a thread of its own: Drop cannot await, and this runtime may be
        // shutting down.
        let cleaned = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(cleanup(&prefix, &db, &tag));
            for log in logs {
                let _ = std::fs::remove_file(log);
            }
        })
        .join();
        if cleaned.is_err() {
            eprintln!("clean-up of {} failed", self.prefix);
        }
    }
}

async fn cleanup(prefix: &str, db: &str, tag: &str) {
    let topology = schema::Topology::new(prefix);
    if let Ok(conn) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await {
        for q in [topology.commands_queue(), topology.dead_letter_queue()] {
            if let Ok(ch) = conn.create_channel().await {
                let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
            }
        }
        for x in [
            topology.commands_exchange(),
            topology.events_exchange(),
            topology.dead_letter_exchange(),
        ] {
            if let Ok(ch) = conn.create_channel().await {
                let _ = ch
                    .exchange_delete(x.as_str().into(), Default::default())
                    .await;
            }
        }
        let _ = conn.close(200, "".into()).await;
    }
    if let Ok(pool) = MySqlPoolOptions::new()
        .max_connections(1)
        .connect(MYSQL_SERVER)
        .await
    {
        // Sessions a proxy of the test still holds open would make DROP wait for their locks.
        let sessions: Vec<i64> =
            sqlx::query_scalar("SELECT id FROM information_schema.processlist WHERE db = ?")
                .bind(db)
                .fetch_all(&pool)
                .await
                .unwrap_or_default();
        for id in sessions {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("KILL {id}")))
                .execute(&pool)
                .await;
        }
        let drop = format!("DROP DATABASE IF EXISTS `{db}`");
        let _ = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&pool).await;
        let users: Vec<String> =
            sqlx::query_scalar("SELECT CAST(user AS CHAR) FROM mysql.user WHERE user LIKE ?")
                .bind(format!("vd\\_{tag}\\_%"))
                .fetch_all(&pool)
                .await
                .unwrap_or_default();
        for user in users {
            let drop = format!("DROP USER IF EXISTS '{user}'@'127.0.0.1'");
            let _ = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&pool).await;
        }
        pool.close().await;
    }
}

/// Fails loudly, naming the fix, when the broker or the database is not running.
async fn require_services() {
    if let Err(e) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await {
        panic!(
            "RabbitMQ is not reachable at 127.0.0.1:5672 ({e}); start it with `rabbitmq-server -detached`"
        );
    }
    if let Err(e) = MySqlPoolOptions::new()
        .max_connections(1)
        .connect(MYSQL_SERVER)
        .await
    {
        panic!(
            "MariaDB is not reachable at 127.0.0.1:3306 ({e}); start it with \
             `start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd`"
        );
    }
}

/// A validator for `schemas/<file>` (the generated JSON Schemas of commands and events).
pub fn schema_validator(file: &str) -> jsonschema::Validator {
    let path = format!("{}/../schemas/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(path).expect("schema file");
    jsonschema::validator_for(&serde_json::from_str(&text).expect("schema JSON"))
        .expect("a valid schema")
}

/// Starts an `attachVolume` of `volume` to `vm` in the simulator directly, behind the
/// daemon's back, as another tool (or the old daemon) would; its job ends after the
/// simulator's job latency.
pub fn attach_outside(
    sim: &std::sync::Arc<cloudstack_sim::Sim>,
    volume: impl std::fmt::Display,
    vm: impl std::fmt::Display,
) {
    let params = std::collections::HashMap::from([
        ("id".to_owned(), volume.to_string()),
        ("virtualmachineid".to_owned(), vm.to_string()),
    ]);
    sim.attach_volume(&params)
        .expect("attached outside the daemon");
}

/// An HTTP client (rustls needs its crypto provider installed first, which this does).
pub fn http() -> reqwest::Client {
    cloudstack::Client::http().expect("HTTP client")
}

#[derive(Debug, Clone)]
pub struct OperationRow {
    pub status: String,
    pub volume_id: Option<String>,
    pub vm_id: Option<String>,
    pub request: Option<serde_json::Value>,
    pub response: Option<serde_json::Value>,
    pub error_code: Option<String>,
    pub cloudstack_job_id: Option<String>,
    pub event_id: Option<String>,
    pub attempts: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MappingRow {
    pub vm_id: String,
    pub mode: String,
    pub device_path: Option<String>,
    pub linux_state: String,
    pub cloudstack_state: String,
    pub serial: Option<String>,
}

/// A subscriber bound to every event of a prefix, from the moment it is created.
pub struct EventTap {
    _conn: Connection,
    consumer: Consumer,
}

impl EventTap {
    pub async fn new(prefix: &str) -> Self {
        Self::bound(
            prefix,
            &schema::Topology::new(prefix).events_exchange(),
            "#",
        )
        .await
    }

    /// Bound to `exchange` with `key` (for the dead-letter exchange, too).
    pub async fn bound(prefix: &str, exchange: &str, key: &str) -> Self {
        let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .expect("broker");
        let ch = conn.create_channel().await.expect("channel");
        schema::amqp::declare(&ch, &schema::Topology::new(prefix))
            .await
            .expect("topology");
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("tap queue");
        ch.queue_bind(
            q.name().clone(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind tap");
        let consumer = consume_no_ack(&ch, q.name().as_str()).await;
        Self {
            _conn: conn,
            consumer,
        }
    }

    /// The next raw message within `within`.
    pub async fn next_raw(&mut self, within: Duration) -> Option<(BasicProperties, Vec<u8>)> {
        match tokio::time::timeout(within, self.consumer.next()).await {
            Ok(Some(Ok(d))) => Some((d.properties, d.data)),
            Ok(Some(Err(e))) => panic!("tap failed: {e}"),
            Ok(None) | Err(_) => None,
        }
    }

    /// The next event within `within`.
    pub async fn next(&mut self, within: Duration) -> Option<(BasicProperties, CloudEvent)> {
        let (props, body) = self.next_raw(within).await?;
        let event = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!("not a CloudEvent ({e}): {}", String::from_utf8_lossy(&body))
        });
        Some((props, event))
    }

    /// The next event, or a panic naming what was awaited.
    pub async fn expect(&mut self, what: &str, within: Duration) -> (BasicProperties, CloudEvent) {
        self.next(within)
            .await
            .unwrap_or_else(|| panic!("no event within {within:?}: expected {what}"))
    }
}

/// Consumes `queue` without acknowledgements (the test reads, nothing to redeliver).
async fn consume_no_ack(ch: &lapin::Channel, queue: &str) -> Consumer {
    ch.basic_consume(
        queue.into(),
        "".into(),
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("consume")
}

/// How many messages wait in `queue` (a passive declare: the queue must exist).
pub async fn queue_depth(ch: &lapin::Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("passive declare")
    .message_count()
}

/// A server-named exclusive queue (`amq.gen-…`) to name as a command's `reply_to`.
pub struct ReplyQueue {
    _conn: Connection,
    pub name: String,
    consumer: Consumer,
}

impl ReplyQueue {
    pub async fn new() -> Self {
        let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .expect("broker");
        let ch = conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("reply queue");
        let consumer = consume_no_ack(&ch, q.name().as_str()).await;
        Self {
            _conn: conn,
            name: q.name().to_string(),
            consumer,
        }
    }

    /// The next event in the queue, with its AMQP properties, or a panic naming what was awaited.
    pub async fn expect(&mut self, what: &str, within: Duration) -> (BasicProperties, CloudEvent) {
        let d = match tokio::time::timeout(within, self.consumer.next()).await {
            Ok(Some(Ok(d))) => d,
            other => panic!("no reply within {within:?} ({what}): {other:?}"),
        };
        let event = serde_json::from_slice(&d.data).expect("a CloudEvent in the reply queue");
        (d.properties, event)
    }

    /// Whether anything arrives within `within`.
    pub async fn is_silent(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, self.consumer.next())
            .await
            .is_err()
    }
}

/// A TCP link between the daemon and a service that the test can cut and restore.
/// The state of a [`TcpProxy`]'s link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Up,
    /// Connections dropped, new ones refused.
    Cut,
    /// Nothing forwarded, nothing closed: what a silent partition looks like from both ends.
    Frozen,
}

/// A TCP proxy that holds everything the server sends for the current delay before passing
/// it on: each round trip through it takes that much longer (a slow or distant database).
pub struct DelayProxy {
    pub addr: SocketAddr,
    delay: watch::Sender<Duration>,
    task: tokio::task::JoinHandle<()>,
}

impl DelayProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr");
        let (delay, _) = watch::channel(Duration::ZERO);
        let delay_rx = delay.subscribe();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                let delay = delay_rx.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut client_rx, mut client_tx) = inbound.into_split();
                    let (mut server_rx, mut server_tx) = outbound.into_split();
                    let up = tokio::io::copy(&mut client_rx, &mut server_tx);
                    let down = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match server_rx.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            let hold = *delay.borrow();
                            tokio::time::sleep(hold).await;
                            if client_tx.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        () = down => {}
                    }
                });
            }
        });
        Self { addr, delay, task }
    }

    /// From now on, every answer waits `delay` more.
    pub fn set_delay(&self, delay: Duration) {
        self.delay.send_replace(delay);
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct TcpProxy {
    pub addr: SocketAddr,
    up: watch::Sender<Link>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr");
        let (up, _) = watch::channel(Link::Up);
        let up_rx = up.subscribe();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                let mut state = up_rx.clone();
                let link = *state.borrow();
                match link {
                    Link::Cut => {
                        drop(inbound); // refused while cut
                        continue;
                    }
                    Link::Frozen => {
                        // Accepted, never answered, never closed.
                        tokio::spawn(async move {
                            let _held = inbound;
                            let _ = state.wait_for(|l| *l == Link::Cut).await;
                        });
                        continue;
                    }
                    Link::Up => {}
                }
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut a, mut b) = (inbound, outbound);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => return,
                        _ = state.wait_for(|l| *l != Link::Up) => {}
                    }
                    // Frozen: keep both sockets open and silent (a half-open link: no FIN,
                    // no RST) until the link is cut or the proxy goes.
                    if *state.borrow() == Link::Frozen {
                        let _ = state.wait_for(|l| *l == Link::Cut).await;
                    }
                });
            }
        });
        Self { addr, up, task }
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.up.send_replace(Link::Cut);
    }

    /// Stops forwarding without closing anything, for open and new connections alike.
    pub fn freeze(&self) {
        self.up.send_replace(Link::Frozen);
    }

    pub fn restore(&self) {
        self.up.send_replace(Link::Up);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A MySQL link that behaves as MySQL 8 (8.0.24 and later) does past `wait_timeout`: a
/// connection silent for `idle` gets, on the next packet its client sends, error 4031
/// (`ER_CLIENT_INTERACTION_TIMEOUT`, "disconnected by the server because of inactivity"), and
/// is closed. MariaDB closes such a connection without a word; MySQL 8 cannot run here.
pub struct IdleKillProxy {
    pub addr: SocketAddr,
    kills: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl IdleKillProxy {
    pub async fn start(target: SocketAddr, idle: Duration) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr");
        let kills = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = kills.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut from_client, mut from_server) = (vec![0; 65536], vec![0; 65536]);
                    let mut last = tokio::time::Instant::now();
                    loop {
                        tokio::select! {
                            n = client.read(&mut from_client) => {
                                let Ok(n) = n else { return };
                                if n == 0 {
                                    return;
                                }
                                if last.elapsed() > idle && n >= 4 {
                                    // The answer to this packet: sequence id + 1.
                                    let seq = from_client[3].wrapping_add(1);
                                    let _ = client.write_all(&error_4031(seq)).await;
                                    counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                    return;
                                }
                                if server.write_all(&from_client[..n]).await.is_err() {
                                    return;
                                }
                                last = tokio::time::Instant::now();
                            }
                            n = server.read(&mut from_server) => {
                                let Ok(n) = n else { return };
                                if n == 0 || client.write_all(&from_server[..n]).await.is_err() {
                                    return;
                                }
                                last = tokio::time::Instant::now();
                            }
                        }
                    }
                });
            }
        });
        Self { addr, kills, task }
    }

    /// How many connections got error 4031.
    pub fn kills(&self) -> usize {
        self.kills.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for IdleKillProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// MySQL's ERR packet for error 4031 with sequence id `seq`.
fn error_4031(seq: u8) -> Vec<u8> {
    let mut payload = vec![0xff];
    payload.extend_from_slice(&4031u16.to_le_bytes());
    payload.extend_from_slice(b"#HY000");
    payload.extend_from_slice(
        b"The client was disconnected by the server because of inactivity. See wait_timeout and interactive_timeout for configuring this behavior.",
    );
    let len = u32::try_from(payload.len()).expect("short").to_le_bytes();
    let mut packet = vec![len[0], len[1], len[2], seq];
    packet.extend_from_slice(&payload);
    packet
}

/// A MySQL link that loses one commit acknowledgement: once armed with a marker (a command
/// id), the first connection that sends a packet carrying the marker gets the server's answer
/// to it thrown away and both sockets closed. For an autocommit statement (accepting a command
/// is one) that answer is the commit's acknowledgement: the commit happened; the client never
/// learns it (a connection reset right after the server's OK).
pub struct CommitDropProxy {
    pub addr: SocketAddr,
    armed: std::sync::Arc<std::sync::Mutex<Option<Vec<u8>>>>,
    fired: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl CommitDropProxy {
    pub async fn start(target: SocketAddr) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr");
        let armed: std::sync::Arc<std::sync::Mutex<Option<Vec<u8>>>> = Default::default();
        let fired = std::sync::Arc::new(AtomicBool::new(false));
        let (armed2, fired2) = (armed.clone(), fired.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                let Ok(outbound) = TcpStream::connect(target).await else {
                    continue;
                };
                let (armed, fired) = (armed2.clone(), fired2.clone());
                tokio::spawn(async move {
                    // The marker went by: its answer is to be lost.
                    let marked = AtomicBool::new(false);
                    let (mut client_r, mut client_w) = inbound.into_split();
                    let (mut server_r, mut server_w) = outbound.into_split();
                    let upstream = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = client_r.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            let chunk = &buf[..n];
                            let marker = armed.lock().expect("armed").clone();
                            if marker.is_some_and(|m| contains(chunk, &m)) {
                                marked.store(true, Ordering::SeqCst);
                            }
                            if server_w.write_all(chunk).await.is_err() {
                                return;
                            }
                        }
                    };
                    let downstream = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = server_r.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            if marked.load(Ordering::SeqCst) {
                                // The answer to the marked statement: lost, and the link
                                // with it.
                                *armed.lock().expect("armed") = None;
                                fired.store(true, Ordering::SeqCst);
                                return;
                            }
                            if client_w.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        () = upstream => {}
                        () = downstream => {}
                    }
                });
            }
        });
        Self {
            addr,
            armed,
            fired,
            task,
        }
    }

    /// Loses the answer to the next statement that sends `marker`.
    pub fn arm(&self, marker: &str) {
        *self.armed.lock().expect("armed") = Some(marker.as_bytes().to_vec());
    }

    /// Whether an acknowledgement was lost.
    pub fn fired(&self) -> bool {
        self.fired.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for CommitDropProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Command builders.
pub mod cmd {
    use schema::command::{Action, AttachVolume, CreateVolume};
    use schema::{Command, VmId, VolumeId};

    pub fn create(name: &str, size: &str) -> Command {
        Command::new(Action::Create(CreateVolume {
            name: name.into(),
            size: size.parse().expect("size"),
            disk_offering_id: None,
            zone_id: None,
        }))
    }

    pub fn attach(volume_id: VolumeId, vm_id: VmId) -> Command {
        Command::new(Action::Attach(AttachVolume {
            volume_id,
            vm_id,
            device_id: None,
        }))
    }

    pub fn detach(volume_id: VolumeId) -> Command {
        Command::new(Action::Detach { volume_id })
    }

    pub fn delete(volume_id: VolumeId) -> Command {
        Command::new(Action::Delete { volume_id })
    }
}

/// Collects every event of a prefix in the background, in arrival order.
pub struct Collector {
    events: std::sync::Arc<std::sync::Mutex<Vec<CloudEvent>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    pub async fn start(prefix: &str) -> Self {
        let mut tap = EventTap::new(prefix).await;
        let events: std::sync::Arc<std::sync::Mutex<Vec<CloudEvent>>> = Default::default();
        let sink = events.clone();
        let task = tokio::spawn(async move {
            while let Some((_, e)) = tap.next(Duration::from_secs(3600)).await {
                sink.lock().expect("collector").push(e);
            }
        });
        Self { events, task }
    }

    pub fn events(&self) -> Vec<CloudEvent> {
        self.events.lock().expect("collector").clone()
    }

    /// Waits until every command in `ids` has a terminal event; panics naming the missing.
    pub async fn wait_all(&self, ids: &[String], within: Duration) -> Vec<CloudEvent> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let events = self.events();
            let seen: std::collections::HashSet<&str> =
                events.iter().map(|e| e.data.command_id.as_str()).collect();
            let missing: Vec<&String> = ids
                .iter()
                .filter(|id| !seen.contains(id.as_str()))
                .collect();
            if missing.is_empty() {
                return events;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {} commands have no terminal event after {within:?}: {:?}",
                missing.len(),
                ids.len(),
                missing.iter().take(10).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `volumectl` binary, built (or brought up to date) once per test process: it belongs to
/// another package, so Cargo does not build it for this test target.
/// Runs `volumectl` on this test's broker prefix and against its daemon's read API:
/// (exit code, stdout, stderr).
pub async fn run_volumectl(env: &TestEnv, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(volumectl())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("AMQP_URL", &env.client_amqp_url)
        .env("AMQP_PREFIX", &env.prefix)
        .env("VOLUME_API_URL", format!("http://{}", env.http_addr))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("volumectl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn volumectl() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let daemon = PathBuf::from(env!("CARGO_BIN_EXE_volume-daemon"));
            let target = daemon
                .parent()
                .and_then(|p| p.parent())
                .expect("target dir")
                .to_path_buf();
            let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = std::process::Command::new(cargo)
                .current_dir(&workspace)
                .env("CARGO_TARGET_DIR", &target)
                .args(["build", "--quiet", "-p", "publisher", "--bin", "volumectl"])
                .status()
                .expect("cargo runs");
            assert!(status.success(), "building volumectl failed");
            daemon.with_file_name("volumectl")
        })
        .clone()
}
