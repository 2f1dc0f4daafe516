//! `volume-daemon`: settings from the environment, logging, then the application until
//! SIGTERM or Ctrl-C.

use clap::Parser;
use worker::config::Task;
use worker::{Application, Settings};

/// sysexits' `EX_CONFIG`: a start refused for a reason a restart cannot fix (the unit lists it
/// in `RestartPreventExitStatus=`, so systemd does not loop).
const EX_CONFIG: i32 = 78;

/// How long the exit waits for blocking work still running (a sysfs read of a hung device
/// never returns: the process must end all the same).
const BLOCKING_EXIT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(run());
    runtime.shutdown_timeout(BLOCKING_EXIT_WAIT);
    result
}

async fn run() -> anyhow::Result<()> {
    if std::env::var_os("DATABASE_DSN").is_some() {
        eprintln!(
            "volume-daemon: DATABASE_DSN is the old daemon's variable and is not read: set DATABASE_URL \
             (mysql://user:password@host:3306/database) to a database of this daemon's own, and bring the \
             old daemon's installation over with `volume-daemon import-legacy --from <its URL>` (docs/configuration.md)"
        );
        std::process::exit(EX_CONFIG);
    }
    let settings = Settings::parse();
    if print_generated(settings.task.as_ref())? {
        return Ok(());
    }
    if let Some(Task::Healthcheck) = settings.task {
        std::process::exit(healthcheck(settings.http_addr).await);
    }
    let telemetry = worker::telemetry::init(settings.log_format);
    match &settings.task {
        Some(Task::SetHostVm { vm }) => {
            if let Err(e) = worker::app::set_host_vm(&settings, *vm).await {
                eprintln!("volume-daemon set-host-vm: {e}");
                std::process::exit(1)
            }
            return Ok(());
        }
        Some(Task::ImportLegacy { from, dry_run }) => {
            match worker::import::import_legacy(&settings, from, *dry_run).await {
                Ok(report) => print!("{report}"),
                Err(e) => {
                    eprintln!("volume-daemon import-legacy: {e}");
                    std::process::exit(1)
                }
            }
            return Ok(());
        }
        // Handled above, before logging starts.
        Some(Task::Completions { .. } | Task::Manpage | Task::Healthcheck) | None => {}
    }
    tracing::info!(?settings, "starting");
    let app = match Application::build(settings).await {
        Ok(app) => app,
        Err(e) if e.refuses_restart() => {
            tracing::error!(error = %e, "refusing to start");
            eprintln!("volume-daemon: {e}");
            std::process::exit(EX_CONFIG);
        }
        Err(e) => return Err(e.into()),
    };
    let stopped = app.run_until_stopped(shutdown_signal()).await;
    telemetry.shutdown().await;
    stopped?;
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the daemon");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// `completions <shell>` and `manpage`: printed before logging starts. `true` when `task` was
/// one of them.
fn print_generated(task: Option<&Task>) -> anyhow::Result<bool> {
    use clap::CommandFactory;
    match task {
        Some(Task::Completions { shell }) => {
            let mut command = Settings::command();
            clap_complete::generate(
                *shell,
                &mut command,
                "volume-daemon",
                &mut std::io::stdout(),
            );
            Ok(true)
        }
        Some(Task::Manpage) => {
            let mut page = Vec::new();
            clap_mangen::Man::new(Settings::command()).render(&mut page)?;
            // A reader that stops early (`| head`) is not an error.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &page);
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// `volume-daemon healthcheck`: 0 when `/ready` on `addr` answers 200 within 5 s, else 1 (and
/// why, on stderr).
async fn healthcheck(addr: std::net::SocketAddr) -> i32 {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let url = format!("http://{addr}/ready");
    let asked = async {
        let http = cloudstack::Client::http().map_err(|e| e.to_string())?;
        let answer = http.get(&url).send().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(answer.status().as_u16())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), asked).await {
        Ok(Ok(200)) => 0,
        Ok(Ok(code)) => {
            eprintln!("volume-daemon healthcheck: {url} answered {code}");
            1
        }
        Ok(Err(e)) => {
            eprintln!("volume-daemon healthcheck: {url}: {e}");
            1
        }
        Err(_) => {
            eprintln!("volume-daemon healthcheck: {url} did not answer within 5 s");
            1
        }
    }
}
