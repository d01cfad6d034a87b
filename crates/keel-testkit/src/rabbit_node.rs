//! A RabbitMQ node of one test's own, for drills that stop and start the broker (P02, P43).
//!
//! Stopping the machine's RabbitMQ would fail every other test running beside the drill, so
//! the drill gets a real `rabbitmq-server` of its own: its own node name, ports, data
//! directory, logs and Erlang cookie (HOME), loopback only, with the management plugin off. It
//! loads `infra/rabbitmq/definitions.json` at boot, exactly as compose and kind do, so the
//! services connect as their own users. Its data survives [`RabbitNode::stop`] and
//! [`RabbitNode::start`] (durable quorum queues and their messages come back, as in a real
//! restart). Dropping it kills the node (if it still runs) and removes its directory, however
//! the test ended.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::workspace_root;

/// The scripts Debian's wrappers in /usr/sbin call: those switch to the rabbitmq user and
/// ignore our HOME.
const SBIN: &str = "/usr/lib/rabbitmq/bin";

/// A private RabbitMQ node (see the module docs).
#[derive(Debug)]
pub struct RabbitNode {
    dir: PathBuf,
    node: String,
    /// The AMQP port on 127.0.0.1.
    pub port: u16,
    dist_port: u16,
    child: Option<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

impl RabbitNode {
    /// Whether this machine can run one (`rabbitmq-server` installed).
    pub fn available() -> bool {
        std::path::Path::new(SBIN).join("rabbitmq-server").exists()
    }

    /// Starts a node and waits (at most 90 s) until its AMQP port accepts connections and the
    /// definitions are loaded.
    pub fn start_new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("keel-rabbit-{}", &id[..12]));
        std::fs::create_dir_all(dir.join("mnesia")).unwrap();
        std::fs::create_dir_all(dir.join("log")).unwrap();
        let port = free_port();
        let definitions = workspace_root().join("infra/rabbitmq/definitions.json");
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.1 = 127.0.0.1:{port}\nload_definitions = {}\n",
                definitions.display()
            ),
        )
        .unwrap();
        // Empty: nothing of the system node's environment file or plugins is read.
        std::fs::write(dir.join("rabbitmq-env.conf"), "").unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        let mut node = Self {
            dir,
            node: format!("keel-drill-{}@localhost", &id[..12]),
            port,
            dist_port: free_port(),
            child: None,
        };
        node.start();
        node
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(format!("{SBIN}/{program}"));
        cmd.current_dir(&self.dir)
            .env("HOME", &self.dir)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_PID_FILE", self.dir.join("rabbitmq.pid"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .stdin(Stdio::null());
        cmd
    }

    /// Starts the node (again) and waits until it serves AMQP with its definitions loaded.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "the node is already running");
        let log = std::fs::File::create(self.dir.join("log/console.log")).unwrap();
        let child = self
            .command("rabbitmq-server")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start rabbitmq-server: {e}"));
        self.child = Some(child);
        // The AMQP listener opens once the node has booted, after the definitions loaded.
        let deadline = Instant::now() + Duration::from_secs(90);
        while !port_open(self.port) {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "rabbitmq-server exited ({status}) before serving; see {}",
                    self.dir.join("log").display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "rabbitmq-server did not open 127.0.0.1:{} within 90 s; see {}",
                self.port,
                self.dir.join("log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the node the way an operator restarts a broker (`rabbitmqctl stop`: clients see
    /// their connections closed) and waits until the process has exited (at most 60 s, then it
    /// is killed).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = self
            .command("rabbitmqctl")
            .args(["-n", &self.node, "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while matches!(child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `amqp://<user>:<user>_dev@127.0.0.1:<port>/keel`: a user of the definitions file.
    pub fn url(&self, user: &str) -> String {
        format!("amqp://{user}:{user}_dev@127.0.0.1:{}/keel", self.port)
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Quickly: the test is over; a graceful stop would only cost time.
            let _ = self
                .command("rabbitmqctl")
                .args(["-n", &self.node, "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
