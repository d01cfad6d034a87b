//! Start a real service binary and talk to it like an operator would: signals, logs, exit
//! codes. Used by process-level tests (SIGTERM under load, config exit codes). Every process
//! runs under `KEEL_PROFILE=dev`, as `make dev` runs it, unless the test's own variables set
//! `KEEL_PROFILE` (empty: as production would).

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

/// A running service process. Killed on drop if still running.
#[derive(Debug)]
pub struct ServiceProcess {
    child: Child,
    /// The HTTP address it logged in its `listening` line.
    pub addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
}

impl ServiceProcess {
    /// Starts `bin` with `env` (any inherited `KEEL_*` variables are removed so the test
    /// decides the whole configuration) over `KEEL_PROFILE=dev`, which `("KEEL_PROFILE", "")`
    /// in `env` turns off, and waits for its `listening` log line.
    pub async fn spawn(bin: &str, args: &[&str], env: &[(String, String)]) -> Self {
        // The test will talk to it with reqwest, which needs a TLS provider installed.
        crate::install_crypto_provider();
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KEEL_")) {
            cmd.env_remove(k);
        }
        dev_profile(&mut cmd);
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = oneshot::channel();

        let stdout = child.stdout.take().expect("stdout piped");
        let out_logs = logs.clone();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let listening = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .filter(|v| v["message"] == "listening")
                    .and_then(|v| v["addr"].as_str().and_then(|a| a.parse().ok()));
                // Record the line before announcing it: a caller woken by the address may
                // read other fields of the same line from `logs()` at once.
                out_logs.lock().expect("logs lock").push(line);
                if let Some(addr) = listening
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr);
                }
            }
        });
        let stderr = child.stderr.take().expect("stderr piped");
        let err_logs = logs.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                err_logs.lock().expect("logs lock").push(line);
            }
        });

        let addr = match tokio::time::timeout(Duration::from_secs(30), rx).await {
            Ok(Ok(addr)) => addr,
            _ => {
                let _ = child.start_kill();
                panic!(
                    "{bin} did not log `listening` within 30 s; output:\n{}",
                    logs.lock().expect("logs lock").join("\n")
                )
            }
        };
        Self { child, addr, logs }
    }

    /// Runs `bin` to completion (for commands that are expected to exit, like a bad config),
    /// with `env` over `KEEL_PROFILE=dev` as [`ServiceProcess::spawn`].
    pub async fn run_to_exit(
        bin: &str,
        args: &[&str],
        env: &[(String, String)],
    ) -> (ExitStatus, String, String) {
        let mut cmd = Command::new(bin);
        cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KEEL_")) {
            cmd.env_remove(k);
        }
        dev_profile(&mut cmd);
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("{bin} did not exit within 30 s"))
            .unwrap_or_else(|e| panic!("run {bin}: {e}"));
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `http://<addr>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("process still running")
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`) with the system `kill` command; the
    /// workspace forbids `unsafe`, and this keeps `libc` out of the harness.
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit, at most `deadline`.
    pub async fn wait(&mut self, deadline: Duration) -> ExitStatus {
        tokio::time::timeout(deadline, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("process did not exit within {deadline:?}"))
            .expect("wait for process")
    }

    /// Every line the process wrote so far (stdout and stderr).
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("logs lock").clone()
    }
}

/// Every spawned service runs under `KEEL_PROFILE=dev`, as `make dev` runs it: its checked-in
/// development secrets are in, so a test sets only what it changes. Set before the test's own
/// variables, so `("KEEL_PROFILE", "")` in `env` runs it as production would (no development
/// secrets, and any of them refused).
fn dev_profile(cmd: &mut Command) {
    cmd.env(keel_config::PROFILE_VAR, keel_config::DEV_PROFILE);
}
