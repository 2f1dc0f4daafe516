//! The daemon's settings (docs/configuration.md), read once at start from the environment.
//! `volume-daemon --help` lists every variable with its default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use schema::{SecretString, SecretUrl, Topology, VmId, ZoneId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// volume-daemon executes volume commands from RabbitMQ against CloudStack, records each in
/// MySQL with an outbox, and publishes completion events.
///
/// Secrets are typed ([`SecretUrl`], [`SecretString`]), so the derived `Debug` shows URLs
/// without passwords and keys not at all.
#[derive(Debug, Clone, Parser)]
#[command(name = "volume-daemon", version, about, long_about = None)]
pub struct Settings {
    /// A one-off task instead of running the daemon.
    #[command(subcommand)]
    pub task: Option<Task>,
    /// Broker URL, or a comma-separated list of full AMQP URLs tried in order on connect and on
    /// every reconnect (the nodes of a cluster).
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true,
        value_parser = parse_amqp_urls
    )]
    pub amqp_url: SecretUrl,
    /// PEM file of CA certificates to trust for `amqps://` besides the public roots.
    #[arg(long, env = "AMQP_TLS_CA_FILE")]
    pub amqp_tls_ca_file: Option<std::path::PathBuf>,
    /// Prefix of every exchange and queue name.
    #[arg(long, env = "AMQP_PREFIX", default_value = "volume", value_parser = parse_prefix)]
    pub amqp_prefix: String,
    /// MySQL 8 / MariaDB 10.6+; the database is created if missing and migrated at start.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "mysql://root@127.0.0.1:3306/volume_daemon",
        hide_env_values = true
    )]
    pub database_url: SecretUrl,
    /// The platform's database whose `ossea_configs` gives the CloudStack settings (the one its
    /// GUI edits, read again for every operation); default: the daemon's own database.
    /// `CLOUDSTACK_*` variables come first.
    #[arg(long, env = "OSSEA_CONFIGS_URL", hide_env_values = true)]
    pub ossea_configs_url: Option<SecretUrl>,
    /// Address of the compatibility listener serving the old Go daemon's routes (off when
    /// unset; during a cutover the old daemon's port, `0.0.0.0:8090`, with HTTP_ADDR elsewhere).
    #[arg(long, env = "LEGACY_HTTP_ADDR")]
    pub legacy_http_addr: Option<SocketAddr>,
    /// Address of the health, readiness and metrics server.
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:8090")]
    pub http_addr: SocketAddr,
    /// CloudStack API endpoint; when unset the active `ossea_configs` row is used.
    #[arg(long, env = "CLOUDSTACK_API_URL")]
    pub cloudstack_api_url: Option<SecretUrl>,
    /// CloudStack API key (with CLOUDSTACK_API_URL; never logged).
    #[arg(long, env = "CLOUDSTACK_API_KEY", hide_env_values = true, value_parser = parse_secret)]
    pub cloudstack_api_key: Option<SecretString>,
    /// CloudStack secret key that signs every request (never logged).
    #[arg(long, env = "CLOUDSTACK_SECRET_KEY", hide_env_values = true, value_parser = parse_secret)]
    pub cloudstack_secret_key: Option<SecretString>,
    /// Zone used when a create names none (else `ossea_configs.zone`, else the first zone).
    #[arg(long, env = "CLOUDSTACK_ZONE_ID")]
    pub cloudstack_zone_id: Option<ZoneId>,
    /// The CloudStack VM this daemon runs on (else `ossea_configs.oma_vm_id`).
    #[arg(long, env = "HOST_VM_ID")]
    pub host_vm_id: Option<VmId>,
    /// The device monitor reads `$SYSFS_ROOT/block`.
    #[arg(long, env = "SYSFS_ROOT", default_value = "/sys")]
    pub sysfs_root: PathBuf,
    /// Where `/dev/disk/by-id` links are looked up (fallback for devices without a serial).
    #[arg(long, env = "DEVICE_BY_ID_DIR", default_value = "/dev/disk/by-id")]
    pub device_by_id_dir: PathBuf,
    /// Where the kernel's device nodes are (`/dev/<name>`): the target of a persistent name
    /// whose device has no by-id link (tests point it at a folder of their own).
    #[arg(long, env = "DEVICE_NODE_DIR", default_value = "/dev")]
    pub device_node_dir: PathBuf,
    /// How long a host attach waits for udev's by-id link of its device before its persistent
    /// name points at the device node instead.
    #[arg(long, env = "BY_ID_LINK_WAIT_MS", default_value_t = 3000, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub by_id_link_wait_ms: u64,
    /// Where the persistent device names of host attachments live (created if missing).
    #[arg(
        long,
        env = "PERSISTENT_DEVICE_DIR",
        default_value = "/run/volume-daemon/devices"
    )]
    pub persistent_device_dir: PathBuf,
    /// A directory an NBD server serves (`nbdkit file dir=`): one entry per export of a host
    /// attachment. Unset: no exports.
    #[arg(long, env = "NBD_EXPORT_DIR")]
    pub nbd_export_dir: Option<PathBuf>,
    /// How clients reach that NBD server (echoed in events; probed by `/ready`).
    #[arg(long, env = "NBD_URL", default_value = "nbd://127.0.0.1:10809")]
    pub nbd_url: crate::host::NbdUrl,
    /// Device scan period.
    #[arg(long, env = "DEVICE_POLL_INTERVAL_MS", default_value_t = 250, value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub device_poll_interval_ms: u64,
    /// How long an attach to the host VM waits for its device.
    #[arg(long, env = "CORRELATION_TIMEOUT_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=MAX_SECONDS))]
    pub correlation_timeout_s: u64,
    /// Operations in flight at once.
    #[arg(long, env = "MAX_CONCURRENT_OPERATIONS", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_concurrent_operations: u16,
    /// How long a create resumed after a restart or a takeover, with no job recorded, waits
    /// before it looks for the volume its earlier execution may have asked for: CloudStack may
    /// act on a createVolume until the request's HTTP timeout (30 s) and after, so the default
    /// is longer than that. Too short, and a volume CloudStack makes late is made twice.
    #[arg(long, env = "CREATE_RESUME_SETTLE_S", default_value_t = 35, value_parser = clap::value_parser!(u64).range(0..=MAX_SECONDS))]
    pub create_resume_settle_s: u64,
    /// How long a createVolume job may run before the operation fails with TIMEOUT.
    #[arg(long, env = "CREATE_JOB_TIMEOUT_S", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=MAX_SECONDS))]
    pub create_job_timeout_s: u64,
    /// How long an attachVolume job may run.
    #[arg(long, env = "ATTACH_JOB_TIMEOUT_S", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=MAX_SECONDS))]
    pub attach_job_timeout_s: u64,
    /// How long a detachVolume job may run (also the detach before a delete).
    #[arg(long, env = "DETACH_JOB_TIMEOUT_S", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=MAX_SECONDS))]
    pub detach_job_timeout_s: u64,
    /// How long a snapshot job (createSnapshot, revertSnapshot, deleteSnapshot) may run: a
    /// snapshot is copied to secondary storage, which takes long for a large volume.
    #[arg(long, env = "SNAPSHOT_JOB_TIMEOUT_S", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=MAX_SECONDS))]
    pub snapshot_job_timeout_s: u64,
    /// How long one CloudStack request is retried on transient errors (job polling goes on until the job deadline).
    #[arg(long, env = "CLOUDSTACK_RETRY_DEADLINE_S", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=MAX_SECONDS))]
    pub cloudstack_retry_deadline_s: u64,
    /// How long in-flight operations get to reach a safe point after SIGTERM.
    #[arg(long, env = "SHUTDOWN_GRACE_S", default_value_t = 8, value_parser = clap::value_parser!(u64).range(0..=MAX_SECONDS))]
    pub shutdown_grace_s: u64,
    /// `text` or `json`.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Comma-separated glob patterns of the queues a command's `reply_to` may name (default
    /// `amq.gen-*,<prefix>.reply.*`); others get no copy of the event, and a warning.
    #[arg(long, env = "REPLY_TO_ALLOWED", value_parser = parse_patterns)]
    pub reply_to_allowed: Option<ReplyToAllowed>,
    /// Kernel uevents for device detection: `auto` (when SYSFS_ROOT is the kernel's /sys and
    /// the socket opens), `on` (whatever SYSFS_ROOT is), `off` (polling only).
    #[arg(long, env = "DEVICE_UEVENTS", value_enum, default_value = "auto")]
    pub device_uevents: UeventsSetting,
    /// Run a reconcile every this many seconds (logs and metrics only); 0 = never.
    #[arg(long, env = "RECONCILE_INTERVAL_S", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=MAX_SECONDS))]
    pub reconcile_interval_s: u64,
    /// Published outbox rows older than this many hours are deleted.
    #[arg(long, env = "OUTBOX_RETENTION_H", default_value_t = 168, value_parser = clap::value_parser!(u64).range(1..=MAX_RETENTION_HOURS))]
    pub outbox_retention_h: u64,
    /// Ended operations older than this many days are deleted.
    #[arg(long, env = "OPERATIONS_RETENTION_D", default_value_t = 90, value_parser = clap::value_parser!(u64).range(1..=MAX_RETENTION_HOURS / 24))]
    pub operations_retention_d: u64,
    /// How often the retention sweep runs (at start, then every period).
    #[arg(long, env = "RETENTION_INTERVAL_S", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=MAX_SECONDS))]
    pub retention_interval_s: u64,
    /// How often `/ready`'s `cloudstack` and `host_vm` self-checks run (a signed `listZones`
    /// and a `listVolumes` of the host VM's root disk).
    #[arg(long, env = "SELF_CHECK_INTERVAL_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=MAX_SECONDS))]
    pub self_check_interval_s: u64,
}

/// `DEVICE_UEVENTS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UeventsSetting {
    Auto,
    On,
    Off,
}

/// The longest retention (ten years, in hours).
const MAX_RETENTION_HOURS: u64 = 10 * 366 * 24;

/// The longest duration a setting may ask for (a week): larger values would overflow the
/// clock arithmetic they feed, and mean a typo anyway.
const MAX_SECONDS: u64 = 7 * 24 * 3600;

/// The queues a `reply_to` may name.
#[derive(Debug, Clone)]
pub struct ReplyToAllowed(Vec<glob::Pattern>);

impl ReplyToAllowed {
    /// The default: server-named queues and `<prefix>.reply.*`.
    pub fn default_for(prefix: &str) -> Self {
        parse_patterns(&format!("amq.gen-*,{prefix}.reply.*")).unwrap_or_else(|_| Self(Vec::new()))
    }

    pub fn allows(&self, queue: &str) -> bool {
        self.0.iter().any(|p| p.matches(queue))
    }
}

fn parse_patterns(s: &str) -> Result<ReplyToAllowed, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| glob::Pattern::new(p).map_err(|e| format!("pattern {p:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()
        .map(ReplyToAllowed)
}

fn parse_secret(s: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(s))
}

/// One-off tasks of `volume-daemon <task>`; without one, the daemon runs.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Task {
    /// Correct the host VM recorded for this database (the VM the daemon runs on), e.g. after
    /// a wrong HOST_VM_ID. Refused while a daemon of this appliance holds the execution lease;
    /// afterwards start the daemon with HOST_VM_ID set to the same id.
    SetHostVm {
        /// The CloudStack VM id (UUID) of the VM the daemon runs on.
        vm: VmId,
    },
    /// Bring an old Go daemon's installation into this daemon's database (DATABASE_URL): its
    /// mappings, persistent names, exports, credentials and operation history. The old
    /// database is only read. Exit status 0: done; 1: refused (unfinished operations, an
    /// unreadable database); 2: usage.
    ImportLegacy {
        /// The old daemon's database, as a mysql:// URL (e.g. mysql://user:pw@host:3306/migratekit_oma).
        #[arg(long)]
        from: SecretUrl,
        /// Say what would be imported; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) for volume-daemon.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), as the package installs it.
    #[command(hide = true)]
    Manpage,
    /// Ask the daemon running with these settings whether it is ready (`GET /ready` on
    /// HTTP_ADDR, a wildcard address asked on loopback): exit 0 when it answers 200 within 5 s,
    /// 1 otherwise. The container image's health check.
    Healthcheck,
}

/// `AMQP_URL`: one or more comma-separated `amqp://` / `amqps://` URLs. The error never shows
/// a password.
fn parse_amqp_urls(s: &str) -> Result<SecretUrl, String> {
    let list = SecretUrl::new(s);
    let urls = list.split_list();
    if urls.is_empty() {
        return Err("no URL given".into());
    }
    for url in &urls {
        let (scheme, rest) = url.expose().split_once("://").unwrap_or_default();
        if !matches!(scheme, "amqp" | "amqps") {
            return Err(format!(
                "{url} is not an amqp:// or amqps:// URL (a list is comma-separated full URLs)"
            ));
        }
        // After the credentials (which may hold a comma), up to the path: host and port.
        let authority = rest.rsplit_once('@').map_or(rest, |(_, a)| a);
        let host = authority.split('/').next().unwrap_or_default();
        if host.contains(',') {
            return Err(format!(
                "{url}: a comma in the host; a list is comma-separated full URLs, each with its own amqp:// or amqps://"
            ));
        }
    }
    Ok(list)
}

/// An `AMQP_PREFIX` whose derived names fit AMQP's 255 bytes.
fn parse_prefix(s: &str) -> Result<String, schema::topology::PrefixError> {
    Topology::parse(s).map(|_| s.to_owned())
}

impl Settings {
    pub fn topology(&self) -> Topology {
        Topology::new(self.amqp_prefix.clone())
    }

    /// The broker to connect to (`AMQP_URL` with `AMQP_TLS_CA_FILE` read).
    pub fn broker_endpoint(&self) -> Result<crate::broker::Endpoint, String> {
        let ca_pem = match &self.amqp_tls_ca_file {
            None => None,
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                format!("AMQP_TLS_CA_FILE {}: cannot read it: {e}", path.display())
            })?),
        };
        Ok(crate::broker::Endpoint {
            url: self.amqp_url.clone(),
            ca_pem,
        })
    }

    /// The host appliance's directories and NBD server.
    pub fn host_files(&self) -> crate::host::HostFiles {
        crate::host::HostFiles::new(
            self.persistent_device_dir.clone(),
            self.nbd_export_dir.clone(),
            self.nbd_url.clone(),
        )
    }

    /// `REPLY_TO_ALLOWED`, or its default for this prefix.
    pub fn reply_to_allowed(&self) -> ReplyToAllowed {
        self.reply_to_allowed
            .clone()
            .unwrap_or_else(|| ReplyToAllowed::default_for(&self.amqp_prefix))
    }

    /// The job deadline of each operation type.
    pub fn job_deadlines(&self) -> crate::cloud::JobDeadlines {
        crate::cloud::JobDeadlines {
            create: Duration::from_secs(self.create_job_timeout_s),
            attach: Duration::from_secs(self.attach_job_timeout_s),
            detach: Duration::from_secs(self.detach_job_timeout_s),
            snapshot: Duration::from_secs(self.snapshot_job_timeout_s),
        }
    }

    /// The uevent socket the monitor should listen to, if any. Uevents describe the kernel's
    /// `/sys`: with another `SYSFS_ROOT` (a test's tree) `auto` polls. A socket that cannot be
    /// opened is logged once, and the monitor polls.
    pub fn uevent_socket(&self) -> Option<crate::devices::uevents::UeventSocket> {
        let kernel_sysfs = std::fs::canonicalize(&self.sysfs_root)
            .is_ok_and(|p| p == std::path::Path::new("/sys"));
        match self.device_uevents {
            UeventsSetting::Off => return None,
            UeventsSetting::Auto if !kernel_sysfs => {
                tracing::info!(root = %self.sysfs_root.display(), "SYSFS_ROOT is not the kernel's /sys: the device monitor polls");
                return None;
            }
            _ => {}
        }
        match crate::devices::uevents::UeventSocket::open() {
            Ok(socket) => Some(socket),
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the kernel uevent socket; the device monitor polls");
                None
            }
        }
    }

    pub fn device_poll_interval(&self) -> Duration {
        Duration::from_millis(self.device_poll_interval_ms)
    }

    pub fn correlation_timeout(&self) -> Duration {
        Duration::from_secs(self.correlation_timeout_s)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The settings line logged at start shows no password (a comma in it included), no
    /// CloudStack key and no credentials inside the CloudStack URL.
    #[test]
    fn the_settings_dump_shows_no_secret() {
        let s = Settings::try_parse_from([
            "volume-daemon",
            "--database-url",
            "mysql://vd:pa,ss-word@db:3306/volume_daemon",
            "--cloudstack-api-url",
            "http://admin:cs-pass@cloudstack:8080/client/api",
            "--cloudstack-api-key",
            "the-api-key",
            "--cloudstack-secret-key",
            "the-secret-key",
        ])
        .expect("parse");
        let dump = format!("{s:?}");
        for secret in [
            "pa,ss-word",
            "ss-word",
            "cs-pass",
            "the-api-key",
            "the-secret-key",
        ] {
            assert!(!dump.contains(secret), "{secret} in {dump}");
        }
        assert!(
            dump.contains("mysql://vd:***@db:3306/volume_daemon"),
            "{dump}"
        );
    }

    #[test]
    fn defaults_match_the_contract() {
        let s = Settings::try_parse_from(["volume-daemon"]).expect("defaults parse");
        assert_eq!(s.amqp_prefix, "volume");
        assert_eq!(s.http_addr.to_string(), "127.0.0.1:8090");
        assert_eq!(s.device_poll_interval_ms, 250);
        assert_eq!(s.correlation_timeout_s, 30);
        assert_eq!(s.max_concurrent_operations, 16);
        assert_eq!(s.sysfs_root, PathBuf::from("/sys"));
    }

    #[test]
    fn bad_values_are_rejected_with_the_variable_named() {
        let err = Settings::try_parse_from(["volume-daemon", "--host-vm-id", "vm-1"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("host-vm-id") && err.contains("not a UUID"),
            "{err}"
        );
        let err = Settings::try_parse_from(["volume-daemon", "--max-concurrent-operations", "0"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("max-concurrent-operations"), "{err}");
        // Durations that would overflow clock arithmetic are refused, not a later panic.
        let err = Settings::try_parse_from([
            "volume-daemon",
            "--cloudstack-retry-deadline-s",
            "18446744073709551615",
        ])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("cloudstack-retry-deadline-s"), "{err}");
        let long = "p".repeat(300);
        let err = Settings::try_parse_from(["volume-daemon", "--amqp-prefix", &long])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("amqp-prefix") && err.contains("300 bytes"),
            "{err}"
        );
    }

    #[test]
    fn amqp_url_takes_a_list_and_refuses_what_is_not_one_without_showing_passwords() {
        let list =
            parse_amqp_urls("amqp://u:pw@n1:5672/%2f,amqps://u:pw@n2:5671/%2f").expect("a list");
        assert_eq!(list.split_list().len(), 2);
        for bad in ["", " , ", "http://u:pw@h", "amqp://u:pw@n1,n2:5672"] {
            let e = parse_amqp_urls(bad).expect_err(bad);
            assert!(!e.contains("pw"), "{e}");
        }
    }

    #[test]
    fn reply_to_patterns_default_to_server_named_and_prefixed_reply_queues() {
        let s =
            Settings::try_parse_from(["volume-daemon", "--amqp-prefix", "acc7"]).expect("parse");
        let allowed = s.reply_to_allowed();
        assert!(allowed.allows("amq.gen-JzTY20BRgKO-HjmUJj0wLg"));
        assert!(allowed.allows("acc7.reply.migration-1"));
        assert!(
            !allowed.allows("acc7.commands"),
            "not the daemon's own queues"
        );
        assert!(!allowed.allows("volume.reply.x"), "not another prefix's");
        let s = Settings::try_parse_from(["volume-daemon", "--reply-to-allowed", "engine-*, ops"])
            .expect("parse");
        assert!(s.reply_to_allowed().allows("engine-7") && s.reply_to_allowed().allows("ops"));
        assert!(!s.reply_to_allowed().allows("amq.gen-x"));
        let err = Settings::try_parse_from(["volume-daemon", "--reply-to-allowed", "a[b"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("reply-to-allowed"), "{err}");
    }

    #[test]
    fn debug_hides_secrets() {
        let s = Settings::try_parse_from([
            "volume-daemon",
            "--amqp-url",
            "amqp://u:topsecret@h/%2f",
            "--cloudstack-secret-key",
            "hush",
        ])
        .expect("parse");
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("topsecret") && !shown.contains("hush"),
            "{shown}"
        );
    }
}
