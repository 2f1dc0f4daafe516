//! The Debian package (`scripts/package-deb`, packing the binaries this suite built): it
//! installs, its units verify, the installed daemon started as the unit's user with the unit's
//! environment and directories reaches `/ready` 200, the completions and manual pages work,
//! and after a purge no file of it remains. Installs on this machine (root), purges at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::helpers::{TestEnv, volumectl};

const PACKAGE: &str = "volume-daemon";
const UNITS: [&str; 3] = [
    "volume-daemon.service",
    "volume-daemon@standby.service",
    "nbdkit-volume-daemon.service",
];

fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Purges the package when the test ends, passed or not.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = run("dpkg", &["--purge", PACKAGE]);
    }
}

/// The `Key=value` settings of a unit's `[Service]` section (the last of each key wins, and
/// `EnvironmentFile` / `Environment` collect every line).
fn unit_settings(unit: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in unit.lines().filter(|l| !l.starts_with('#')) {
        if let Some((k, v)) = line.split_once('=') {
            out.entry(k.trim().to_owned())
                .or_default()
                .push(v.trim().to_owned());
        }
    }
    out
}

/// `KEY=value` lines of an environment file (comments and blank lines skipped).
fn env_file(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

#[tokio::test]
async fn the_debian_package_installs_verifies_starts_as_its_user_and_purges_clean() {
    let (_, uid) = run("id", &["-u"]);
    assert_eq!(
        uid.trim(),
        "0",
        "installing a package needs root (as scripts/test runs here)"
    );
    let bin_dir = PathBuf::from(env!("CARGO_BIN_EXE_volume-daemon"))
        .parent()
        .expect("dir")
        .to_owned();
    assert_eq!(volumectl().parent(), Some(bin_dir.as_path()));
    let deb = std::env::temp_dir().join(format!(
        "volume-daemon-{}.deb",
        uuid::Uuid::new_v4().simple()
    ));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/package-deb");
    let bin = bin_dir.display().to_string();
    let out = deb.display().to_string();
    let (ok, said) = run(script, &["--bin-dir", &bin, "--out", &out]);
    assert!(ok, "scripts/package-deb: {said}");
    let (ok, info) = run("dpkg-deb", &["--info", &out]);
    assert!(ok && info.contains("Package: volume-daemon"), "{info}");

    // A leftover of an interrupted run goes first.
    let _ = run("dpkg", &["--purge", PACKAGE]);
    let (ok, said) = run("dpkg", &["--install", &out]);
    let _ = std::fs::remove_file(&deb);
    let _installed = Installed;
    assert!(ok, "dpkg --install: {said}");
    let (_, listed) = run("dpkg", &["--listfiles", PACKAGE]);
    let files: Vec<PathBuf> = listed
        .lines()
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .collect();
    for f in [
        "/usr/bin/volume-daemon",
        "/usr/bin/volumectl",
        "/etc/volume-daemon/env",
        "/lib/systemd/system/volume-daemon@.service",
        "/usr/share/man/man1/volumectl.1.gz",
        "/usr/share/bash-completion/completions/volumectl",
        "/usr/share/doc/volume-daemon/troubleshooting.md",
    ] {
        assert!(
            files.contains(&PathBuf::from(f)),
            "{f} is in the package: {files:?}"
        );
    }

    for unit in UNITS {
        let (ok, said) = run("systemd-analyze", &["verify", unit]);
        assert!(
            ok && said.trim().is_empty(),
            "systemd-analyze verify {unit}: {said}"
        );
    }

    // The installed daemon as the unit runs it: its user and group, its environment files
    // and Environment= lines, its RuntimeDirectory; only what isolates this test is set on top
    // (its own prefix, database, simulator and port).
    let unit = std::fs::read_to_string("/lib/systemd/system/volume-daemon.service").expect("unit");
    let settings = unit_settings(&unit);
    let one = |k: &str| settings[k].last().expect(k).clone();
    let user = one("User");
    let group = one("Group");
    let runtime = PathBuf::from("/run").join(one("RuntimeDirectory"));
    assert!(
        Command::new("install")
            .args(["-d", "-o", &user, "-g", &group, "-m", "0755"])
            .arg(&runtime)
            .status()
            .expect("install")
            .success()
    );
    let mut daemon_env: Vec<(String, String)> = Vec::new();
    for file in &settings["EnvironmentFile"] {
        daemon_env.extend(env_file(Path::new(file.trim_start_matches('-'))));
    }
    for e in settings.get("Environment").into_iter().flatten() {
        let (k, v) = e.split_once('=').expect("KEY=value");
        daemon_env.push((k.to_owned(), v.to_owned()));
    }
    let env = TestEnv::new().await;
    let port = free_port();
    let (key, secret) = env.sim.sim.keys();
    daemon_env.extend([
        ("AMQP_PREFIX".to_owned(), env.prefix.clone()),
        ("DATABASE_URL".to_owned(), env.database_url()),
        ("CLOUDSTACK_API_URL".to_owned(), env.sim.api_url()),
        ("CLOUDSTACK_API_KEY".to_owned(), key),
        ("CLOUDSTACK_SECRET_KEY".to_owned(), secret),
        ("HTTP_ADDR".to_owned(), format!("127.0.0.1:{port}")),
    ]);
    let exec = one("ExecStart");
    assert_eq!(exec, "/usr/bin/volume-daemon");
    let log_path = std::env::temp_dir().join(format!("volume-daemon-pkg-{}.log", env.prefix));
    let log = std::fs::File::create(&log_path).expect("log");
    let mut daemon = tokio::process::Command::new("setpriv")
        .args([
            &format!("--reuid={user}"),
            &format!("--regid={group}"),
            "--clear-groups",
            &exec,
        ])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(daemon_env)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("fd"))
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("setpriv runs the installed daemon");
    let ready_url = format!("http://127.0.0.1:{port}/ready");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = crate::helpers::http().get(&ready_url).send().await
            && r.status().as_u16() == 200
        {
            break;
        }
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        assert!(
            daemon.try_wait().expect("wait").is_none(),
            "the installed daemon exited:\n{log}"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the installed daemon never answered /ready 200:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pid = daemon.id().expect("pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let (_, expected_uid) = run("id", &["-u", &user]);
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .expect("Uid line");
    assert!(
        uid_line
            .split_whitespace()
            .skip(1)
            .all(|u| u == expected_uid.trim()),
        "runs as {user} ({}), not root: {uid_line}",
        expected_uid.trim()
    );
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let exited = tokio::time::timeout(Duration::from_secs(20), daemon.wait())
        .await
        .expect("the installed daemon stops on SIGTERM")
        .expect("wait");
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    assert!(exited.success(), "{exited}:\n{log}");
    assert!(
        !log.contains("\u{1b}["),
        "no colour codes off a terminal:\n{log}"
    );

    // The installed tools.
    let (ok, said) = run("/usr/bin/volumectl", &["--help"]);
    assert!(ok && said.contains("Usage: volumectl"), "{said}");
    let (ok, said) = run("/usr/bin/volumectl", &["completions", "bash"]);
    assert!(ok && said.contains("complete -F _volumectl"), "{said}");
    for page in ["volumectl", "volume-daemon"] {
        let (ok, said) = run("man", &["-P", "cat", page]);
        assert!(
            ok && said.contains("NAME") && said.contains(page),
            "man {page}: {said}"
        );
    }

    // Purged: no file of the package remains, nor its directories.
    let (ok, said) = run("dpkg", &["--purge", PACKAGE]);
    assert!(ok, "dpkg --purge: {said}");
    let left: Vec<&PathBuf> = files.iter().filter(|f| f.exists()).collect();
    assert!(left.is_empty(), "left after purge: {left:?}");
    for dir in [
        "/etc/volume-daemon",
        "/var/lib/volume-daemon",
        "/usr/share/doc/volume-daemon",
    ] {
        assert!(!Path::new(dir).exists(), "{dir} is left after purge");
    }
    assert!(
        !runtime.exists(),
        "{} is left after purge",
        runtime.display()
    );
}
