//! The container image (`Dockerfile`), as far as a machine without a container engine allows
//! (podman is installable here but cannot run a container: crun's setrlimit is refused, and no
//! registry is reachable for the base images). The daemon's stage is read from the Dockerfile
//! itself: its numeric user, the directories the runtime stage creates for that user, its
//! `ENV`, `EXPOSE` and `HEALTHCHECK`. The binary this suite built then starts as that user,
//! without root, in a mount namespace whose `/run` and `/var/lib` hold only what the image
//! creates, with the image's environment and the compose file's settings pointed at this
//! machine's services; it reaches `/ready` 200 and the health check passes.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use crate::helpers::{TestEnv, volumectl};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The instructions of one stage of a Dockerfile (continuation lines joined), by stage name.
fn stage(dockerfile: &str, name: &str) -> Vec<(String, String)> {
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(line);
        joined.push(std::mem::take(&mut current));
    }
    let mut out = Vec::new();
    let mut inside = false;
    for instruction in joined {
        let (word, rest) = instruction.split_once(' ').unwrap_or((&instruction, ""));
        if word == "FROM" {
            inside = rest.ends_with(&format!(" AS {name}"));
            continue;
        }
        if inside {
            out.push((word.to_owned(), rest.trim().to_owned()));
        }
    }
    out
}

#[tokio::test]
async fn the_images_daemon_starts_as_its_numeric_user_and_is_healthy() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let runtime = stage(&dockerfile, "runtime");
    let daemon = stage(&dockerfile, "volume-daemon");
    assert!(!daemon.is_empty(), "a `volume-daemon` stage");
    assert!(
        !stage(&dockerfile, "simulator").is_empty(),
        "a `simulator` stage"
    );
    assert!(
        dockerfile.trim_end().ends_with("CMD [\"volume-daemon\"]"),
        "the daemon's stage is the last, the default target"
    );
    let get = |word: &str| -> Vec<&String> {
        daemon
            .iter()
            .filter(|(w, _)| w == word)
            .map(|(_, r)| r)
            .collect()
    };

    // A numeric user, not root, owning every directory the runtime stage creates.
    let user = get("USER").pop().expect("USER");
    let (uid, gid) = user.split_once(':').expect("USER uid:gid");
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u != 0),
        "numeric, not root: {user}"
    );
    assert!(gid.parse::<u32>().is_ok(), "{user}");
    let run = runtime
        .iter()
        .filter(|(w, _)| w == "RUN")
        .map(|(_, r)| r.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    let install = run
        .split("&&")
        .map(str::trim)
        .find(|c| c.starts_with(&format!("install -d -o {uid} -g {gid}")))
        .expect("the runtime stage creates the daemon's directories for its user");
    let dirs: Vec<&str> = install
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .collect();
    assert!(dirs.contains(&"/run/volume-daemon"), "{dirs:?}");

    // ENV, EXPOSE and HEALTHCHECK.
    let mut image_env: Vec<(String, String)> = Vec::new();
    for e in get("ENV") {
        for pair in e.split_whitespace() {
            let (k, v) = pair.split_once('=').expect("ENV KEY=value");
            image_env.push((k.to_owned(), v.to_owned()));
        }
    }
    let http_addr = &image_env
        .iter()
        .find(|(k, _)| k == "HTTP_ADDR")
        .expect("ENV HTTP_ADDR")
        .1;
    let exposed = get("EXPOSE").pop().expect("EXPOSE");
    assert!(
        http_addr.ends_with(&format!(":{exposed}")),
        "{http_addr} vs EXPOSE {exposed}"
    );
    let health = get("HEALTHCHECK").pop().expect("HEALTHCHECK");
    assert!(
        health.contains("CMD [\"volume-daemon\", \"healthcheck\"]"),
        "{health}"
    );
    assert_eq!(
        get("CMD").pop().map(String::as_str),
        Some("[\"volume-daemon\"]")
    );

    // The image's /usr/local/bin: the binaries this suite built.
    let bin = std::env::temp_dir().join(format!("vd-image-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&bin).expect("dir");
    for b in [
        PathBuf::from(env!("CARGO_BIN_EXE_volume-daemon")),
        volumectl(),
    ] {
        let to = bin.join(b.file_name().expect("name"));
        std::fs::copy(&b, &to).expect("copy");
    }
    let _ = std::process::Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(&bin)
        .status();

    let env = TestEnv::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let (key, secret) = env.sim.sim.keys();
    let mut daemon_env = image_env.clone();
    // The compose file's settings, pointed at this machine's services; the port is free one
    // (the image's 8090 may be taken here), the address the image's.
    let host = http_addr.rsplit_once(':').expect("host:port").0;
    daemon_env.extend([
        ("AMQP_URL".to_owned(), env.daemon_amqp_url.clone()),
        ("AMQP_PREFIX".to_owned(), env.prefix.clone()),
        ("DATABASE_URL".to_owned(), env.database_url()),
        ("CLOUDSTACK_API_URL".to_owned(), env.sim.api_url()),
        ("CLOUDSTACK_API_KEY".to_owned(), key),
        ("CLOUDSTACK_SECRET_KEY".to_owned(), secret),
        ("HTTP_ADDR".to_owned(), format!("{host}:{port}")),
        (
            "PATH".to_owned(),
            format!("{}:/usr/bin:/bin", bin.display()),
        ),
    ]);
    // A private /run and /var/lib holding only what the image makes, owned as it makes them.
    let script = format!(
        "mount -t tmpfs tmpfs /run && mount -t tmpfs tmpfs /var/lib && {install} && exec setpriv --reuid={uid} --regid={gid} --clear-groups \"$@\""
    );
    let in_image = |args: &[&str]| {
        let mut c = tokio::process::Command::new("unshare");
        c.args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
        ])
        .args(args)
        .env_clear()
        .envs(daemon_env.clone())
        .stdin(Stdio::null());
        c
    };
    let log_path = bin.join("daemon.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut daemon = in_image(&["volume-daemon"])
        .stdout(log.try_clone().expect("fd"))
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("unshare runs");
    let healthcheck = || async {
        let out = in_image(&["volume-daemon", "healthcheck"])
            .output()
            .await
            .expect("the health check runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if healthcheck().await.0 == Some(0) {
            break;
        }
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        assert!(
            daemon.try_wait().expect("wait").is_none(),
            "the image's daemon exited:\n{log}"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the image's health check never passed:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (code, ready) =
        crate::helpers::get_json(format!("127.0.0.1:{port}").parse().expect("addr"), "/ready")
            .await;
    assert_eq!(code, 200, "{ready}");
    let pid = daemon.id().expect("pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).expect("Uid");
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == uid),
        "{uid_line}"
    );

    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let exited = tokio::time::timeout(Duration::from_secs(20), daemon.wait())
        .await
        .expect("stops on SIGTERM")
        .expect("wait");
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(exited.success(), "{exited}:\n{log}");
    let (code, said) = healthcheck().await;
    assert_eq!(code, Some(1), "unhealthy once stopped: {said}");
    assert!(said.contains("/ready"), "{said}");
    let _ = std::fs::remove_dir_all(&bin);
}
