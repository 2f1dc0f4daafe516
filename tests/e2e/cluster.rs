//! A RabbitMQ cluster of its own on this machine, beside the machine's broker (which it never
//! touches): N nodes with their own names, AMQP and distribution ports and data directories,
//! joined to the first, stopped and removed when dropped. Starting one takes 20–40 s, so a
//! test binary starts it once (see `scale_out.rs`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::process::Command;

/// One node: `name@localhost` listening for AMQP on `port`.
pub struct Node {
    pub name: String,
    pub port: u16,
    dir: PathBuf,
}

pub struct RabbitCluster {
    pub nodes: Vec<Node>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `rabbitmqctl -n <node> <args>`: its stdout, or its failure.
pub async fn ctl(node: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("rabbitmqctl")
        .arg("-n")
        .arg(node)
        .args(args)
        .output()
        .await
        .map_err(|e| format!("rabbitmqctl does not run: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "rabbitmqctl -n {node} {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl Node {
    async fn start(tag: &str, index: usize) -> Self {
        let name = format!("vd{tag}n{index}@localhost");
        let (port, dist) = (free_port(), free_port());
        let dir = std::env::temp_dir().join(format!("volume-daemon-rabbit-{tag}-{index}"));
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub)).expect("node dir");
        }
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("plugins file");
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.default = {port}\n"),
        )
        .expect("config");
        // The server drops to the rabbitmq user: it must own everything it writes.
        let chown = std::process::Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status()
            .expect("chown runs");
        assert!(chown.success(), "chown of {}", dir.display());
        let started = Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &name)
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .status()
            .await
            .expect("rabbitmq-server runs (scripts/test installs rabbitmq-server)");
        assert!(started.success(), "rabbitmq-server -detached for {name}");
        let node = Self { name, port, dir };
        node.await_startup(Duration::from_secs(90)).await;
        node
    }

    /// Waits until the node runs its rabbit app (`await_startup` fails at once while the node
    /// is not yet registered with epmd, so it is asked again).
    pub async fn await_startup(&self, within: Duration) {
        let start = Instant::now();
        loop {
            match ctl(&self.name, &["await_startup"]).await {
                Ok(_) => return,
                Err(e) if start.elapsed() > within => {
                    panic!(
                        "{} did not start within {within:?}: {e}\n{}",
                        self.name,
                        self.log_tail()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    fn log_tail(&self) -> String {
        let log = self.dir.join("log").join(format!("{}.log", self.name));
        let text = std::fs::read_to_string(log).unwrap_or_default();
        text.lines().rev().take(30).collect::<Vec<_>>().join("\n")
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

impl RabbitCluster {
    /// Starts `n` nodes at once and joins every other one to the first.
    pub async fn start(n: usize) -> Self {
        let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let nodes = futures_util::future::join_all((0..n).map(|i| Node::start(&tag, i))).await;
        let cluster = Self { nodes };
        let first = cluster.nodes[0].name.clone();
        for node in &cluster.nodes[1..] {
            for args in [
                vec!["stop_app"],
                vec!["join_cluster", first.as_str()],
                vec!["start_app"],
            ] {
                ctl(&node.name, &args)
                    .await
                    .unwrap_or_else(|e| panic!("joining {} to {first}: {e}", node.name));
            }
            node.await_startup(Duration::from_secs(60)).await;
        }
        let running = cluster.running_nodes(0).await;
        assert_eq!(running.len(), n, "running nodes: {running:?}");
        cluster
    }

    /// The cluster's running nodes, as node `via` sees them.
    pub async fn running_nodes(&self, via: usize) -> Vec<String> {
        let status = ctl(
            &self.nodes[via].name,
            &["cluster_status", "--formatter", "json"],
        )
        .await
        .expect("cluster_status");
        let json: serde_json::Value = serde_json::from_str(&status).expect("cluster_status JSON");
        json["running_nodes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|n| n.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every node's URL, in `order` (indexes into `nodes`), comma-separated: an `AMQP_URL`.
    pub fn urls(&self, order: &[usize]) -> String {
        order
            .iter()
            .map(|&i| self.nodes[i].url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the node that leads quorum queue `queue`, and the queue's members, asked
    /// through node `via`.
    pub async fn leader_and_members(&self, via: usize, queue: &str) -> (usize, Vec<String>) {
        let out = ctl(
            &self.nodes[via].name,
            &[
                "list_queues",
                "name",
                "leader",
                "members",
                "--formatter",
                "json",
            ],
        )
        .await
        .expect("list_queues");
        let rows: Vec<serde_json::Value> = serde_json::from_str(&out).expect("list_queues JSON");
        let row = rows
            .iter()
            .find(|r| r["name"] == queue)
            .unwrap_or_else(|| panic!("no queue {queue} in {out}"));
        let leader = row["leader"].as_str().unwrap_or_default();
        let members = row["members"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| m.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let index = self
            .nodes
            .iter()
            .position(|n| n.name == leader)
            .unwrap_or_else(|| panic!("the leader {leader:?} of {queue} is none of the nodes"));
        (index, members)
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        let stops: Vec<_> = self
            .nodes
            .iter()
            .map(|n| {
                let (name, dir) = (n.name.clone(), n.dir.clone());
                std::thread::spawn(move || {
                    let _ = std::process::Command::new("rabbitmqctl")
                        .args(["-n", &name, "stop"])
                        .output();
                    let _ = std::fs::remove_dir_all(dir);
                })
            })
            .collect();
        for s in stops {
            let _ = s.join();
        }
    }
}
