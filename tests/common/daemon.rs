//! A real `stackwarden reconcile` daemon against the emulator, for the
//! end-to-end tests that run one: its endpoints, its logs, its signals.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Emulator, Workspace};

/// A running daemon; killed when dropped. Its stderr lines are kept.
pub struct Daemon {
    child: Child,
    pub port: u16,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    pub fn start(emu: &Emulator, ws: &Workspace) -> Daemon {
        Daemon::start_with(emu, ws, &[])
    }

    /// [`Daemon::start`] with more arguments.
    pub fn start_with(emu: &Emulator, ws: &Workspace, extra: &[&str]) -> Daemon {
        Daemon::start_envs(emu, ws, &["-e", "dev"], extra)
    }

    /// A daemon over the environments `select` names (`-e ...`; none: every
    /// environment of the workspace).
    pub fn start_envs(emu: &Emulator, ws: &Workspace, select: &[&str], extra: &[&str]) -> Daemon {
        let port = std::net::TcpListener::bind(("127.0.0.1", 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = emu
            .command()
            .arg("reconcile")
            .args(select)
            .args([
                // The floor; the test asks for passes with SIGHUP.
                "--interval",
                "10s",
                "--shutdown-grace",
                "5s",
            ])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--desired-state", &ws.desired_state().display().to_string()])
            .args(extra)
            .env("RUST_LOG", "stackwarden=info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start the daemon");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Daemon { child, port, lines }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return (0, String::new());
        };
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    pub fn logs(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    /// Waits for the exit status, up to `limit`.
    pub fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::SystemTime::now() + limit;
        while std::time::SystemTime::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `cond` every 100 ms up to `limit` (real time: the daemon is real).
pub async fn until(
    what: &str,
    limit: Duration,
    daemon: &Daemon,
    mut cond: impl AsyncFnMut() -> bool,
) {
    let deadline = std::time::SystemTime::now() + limit;
    while !cond().await {
        assert!(
            std::time::SystemTime::now() < deadline,
            "timed out waiting for {what}; daemon log:\n{}",
            daemon.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A queue subscribed to the alert topic.
pub async fn subscribe(config: &aws_config::SdkConfig, topic: &str) -> String {
    let sns = aws_sdk_sns::Client::new(config);
    let sqs = aws_sdk_sqs::Client::new(config);
    let topic = sns.create_topic().name(topic).send().await.unwrap();
    let queue = sqs
        .create_queue()
        .queue_name("alerts")
        .send()
        .await
        .unwrap();
    let url = queue.queue_url().unwrap().to_owned();
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap();
    let arn =
        attrs.attributes().unwrap()[&aws_sdk_sqs::types::QueueAttributeName::QueueArn].clone();
    sns.subscribe()
        .topic_arn(topic.topic_arn().unwrap())
        .protocol("sqs")
        .endpoint(arn)
        .send()
        .await
        .unwrap();
    url
}

/// Messages on the alert queue now (each is received once).
pub async fn drain(sqs: &aws_sdk_sqs::Client, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let got = sqs
            .receive_message()
            .queue_url(queue)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        if got.messages().is_empty() {
            return out;
        }
        for m in got.messages() {
            out.push(m.body().unwrap_or_default().to_owned());
            sqs.delete_message()
                .queue_url(queue)
                .receipt_handle(m.receipt_handle().unwrap())
                .send()
                .await
                .unwrap();
        }
    }
}
