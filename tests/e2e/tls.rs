//! TLS when asked for, and never a silent plaintext fallback: the daemon reaches RabbitMQ over
//! `amqps://` through a TLS terminator (`stunnel4`: AMQP over TLS is plain TLS around AMQP) and
//! MySQL over TLS on a second `mariadbd` that requires it (MySQL negotiates TLS inside its own
//! protocol, so a terminator cannot stand in). The certificates are made by the test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sqlx::Connection;
use tokio::process::{Child, Command};

use crate::helpers::{TestEnv, cmd, get_json};

/// A free local port (bound, then released: the server started next takes it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn run(program: &str, args: &[&str], dir: &Path) {
    let out = std::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs (scripts/test installs it): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for `localhost` / 127.0.0.1, in a directory of the test.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn generate() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "volume-daemon-e2e-tls-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ));
        std::fs::create_dir_all(&dir).expect("cert dir");
        let subj_ca = "/CN=volume-daemon test CA";
        run(
            "openssl",
            &[
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
                "ca.pem", "-subj", subj_ca, "-days", "1",
            ],
            &dir,
        );
        run(
            "openssl",
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
            &dir,
        );
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .expect("ext");
        run(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "1",
                "-extfile",
                "ext.cnf",
            ],
            &dir,
        );
        Self { dir }
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `stunnel4` terminating TLS in front of the machine's RabbitMQ.
async fn stunnel(certs: &Certs) -> (Child, u16) {
    let port = free_port();
    let conf = certs.dir.join("stunnel.conf");
    std::fs::write(
        &conf,
        format!(
            "foreground = yes\npid =\n[amqps]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:5672\ncert = {}\nkey = {}\n",
            certs.path("server.pem"),
            certs.path("server.key")
        ),
    )
    .expect("stunnel.conf");
    let child = Command::new("stunnel4")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("stunnel4 runs (scripts/test installs it)");
    wait_port(port, "stunnel4").await;
    (child, port)
}

/// A second `mariadbd` of the test's own: its own data directory and port, TLS with the test's
/// certificates, and `require_secure_transport` (a plaintext session is refused).
async fn tls_mariadb(certs: &Certs) -> (Child, u16) {
    let data = certs.dir.join("data");
    run(
        "mariadb-install-db",
        &[
            "--no-defaults",
            &format!("--datadir={}", data.display()),
            "--user=root",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ],
        &certs.dir,
    );
    let port = free_port();
    let child = Command::new("/usr/sbin/mariadbd")
        .args([
            "--no-defaults",
            &format!("--datadir={}", data.display()),
            "--user=root",
            &format!("--port={port}"),
            "--bind-address=127.0.0.1",
            &format!("--socket={}", certs.path("mysqld.sock")),
            &format!("--pid-file={}", certs.path("mysqld.pid")),
            &format!("--ssl-cert={}", certs.path("server.pem")),
            &format!("--ssl-key={}", certs.path("server.key")),
            &format!("--ssl-ca={}", certs.path("ca.pem")),
            "--require-secure-transport=ON",
            "--skip-log-bin",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("mariadbd runs");
    wait_port(port, "the TLS mariadbd").await;
    (child, port)
}

async fn wait_port(port: u16, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not listen on {port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_daemon_speaks_tls_to_rabbitmq_and_mysql_when_asked() {
    let certs = Certs::generate();
    let (_stunnel, amqps_port) = stunnel(&certs).await;
    let (_mariadb, mysql_port) = tls_mariadb(&certs).await;
    let mut env = TestEnv::new().await;
    env.daemon_amqp_url = format!("amqps://guest:guest@localhost:{amqps_port}/%2f");
    env.daemon_database_url = Some(format!(
        "mysql://root@127.0.0.1:{mysql_port}/{}?ssl-mode=VERIFY_IDENTITY&ssl-ca={}",
        env.db_name,
        certs.path("ca.pem")
    ));
    env.extra_env
        .push(("AMQP_TLS_CA_FILE".into(), certs.path("ca.pem")));

    env.start_daemon().await;
    let event = env.execute(&cmd::create("over-tls", "1GiB")).await;

    assert_eq!(
        event.event_type, "volume.create.completed",
        "{:?}",
        event.data.error
    );
    // The server refuses plaintext sessions, so the daemon's are TLS; see it from inside.
    let url = format!(
        "mysql://root@127.0.0.1:{mysql_port}/{}?ssl-mode=VERIFY_CA&ssl-ca={}",
        env.db_name,
        certs.path("ca.pem")
    );
    let mut conn = sqlx::MySqlConnection::connect(&url)
        .await
        .expect("TLS session");
    let rows: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM volume_operations WHERE status = 'completed'")
            .fetch_one(&mut conn)
            .await
            .expect("the daemon's database on the TLS server");
    assert_eq!(rows, 1);
    let plain = format!(
        "mysql://root@127.0.0.1:{mysql_port}/{}?ssl-mode=DISABLED",
        env.db_name
    );
    assert!(
        sqlx::MySqlConnection::connect(&plain).await.is_err(),
        "the server really refuses plaintext"
    );
}

#[tokio::test]
async fn with_tls_required_and_unavailable_nothing_falls_back_to_plaintext() {
    // MySQL: TLS required from a server without it: the daemon refuses to start.
    let env = TestEnv::new().await;
    let out = Command::new(env!("CARGO_BIN_EXE_volume-daemon"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("AMQP_PREFIX", &env.prefix)
        .env("PERSISTENT_DEVICE_DIR", env.sysfs.join("persistent"))
        .env(
            "DATABASE_URL",
            format!("{}?ssl-mode=REQUIRED", env.database_url()),
        )
        .env("HTTP_ADDR", "127.0.0.1:0")
        .output()
        .await
        .expect("volume-daemon runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it refused to start: {stderr}");
    assert!(stderr.contains("database"), "{stderr}");

    // RabbitMQ: `amqps://` to a plaintext port: the TLS handshake fails, the daemon never
    // speaks AMQP in the clear and never becomes ready.
    let mut env = TestEnv::new().await;
    env.daemon_amqp_url = "amqps://guest:guest@localhost:5672/%2f".into();
    let addr: SocketAddr = env.spawn_other().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, ready) = get_json(addr, "/ready").await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["components"]["broker"], "down", "{ready}");
}
