//! Test harness shared by the end-to-end tests: one AWS emulator (moto with
//! stackwarden's shim) per test binary, and helpers to run the real binary.
//!
//! The emulator is started on a free 127.0.0.1 port the first time a test
//! asks for it. Tests that use it hold [`Emulator::lock`], which serialises
//! them and resets the emulator, so each starts from an empty account. The
//! emulator watches its stdin: when this process exits, for any reason, the
//! pipe closes and the emulator exits too.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

pub mod controller;
pub mod daemon;
pub mod races;

pub const ACCOUNT: &str = "123456789012";
pub const REGION: &str = "us-east-1";

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python interpreter of the project's venv (made by `scripts/test`).
pub fn python() -> PathBuf {
    let p = std::env::var_os("STACKWARDEN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"));
    assert!(
        p.exists(),
        "the AWS emulator needs {} (moto in the project venv): run scripts/test, which installs it",
        p.display()
    );
    p
}

pub struct Emulator {
    port: u16,
    // Held for its stdin pipe: dropping it (at process exit) stops the emulator.
    _child: Mutex<Child>,
    serial: tokio::sync::Mutex<()>,
}

static EMULATOR: OnceLock<Emulator> = OnceLock::new();

impl Emulator {
    /// The emulator of this test binary, started on first use.
    pub fn get() -> &'static Emulator {
        EMULATOR.get_or_init(Emulator::start)
    }

    fn start() -> Emulator {
        let port = free_port();
        let child = Command::new(python())
            .arg(repo().join("tests/emulator/moto_shim.py"))
            .args(["--port", &port.to_string(), "--watch-stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the AWS emulator");
        // Poll until it accepts connections: up to 60 s (a cold Python import).
        let mut tries = 0;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            tries += 1;
            assert!(
                tries < 1200,
                "the AWS emulator did not start within 60 s on port {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Emulator {
            port,
            _child: Mutex::new(child),
            serial: tokio::sync::Mutex::new(()),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Exclusive use of the emulator, reset to an empty account. (A tokio
    /// mutex: async tests hold it across awaits; it never poisons.)
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        let guard = self.serial.lock().await;
        self.reset();
        guard
    }

    /// [`Emulator::lock`] for tests that are not async.
    pub fn lock_blocking(&self) -> tokio::sync::MutexGuard<'_, ()> {
        let guard = self.serial.blocking_lock();
        self.reset();
        guard
    }

    /// Forgets every resource (moto's `POST /moto-api/reset`).
    pub fn reset(&self) {
        let status = http_post(self.port, "/moto-api/reset");
        assert!(
            status.starts_with("HTTP/1.1 200") || status.starts_with("HTTP/1.0 200"),
            "reset failed: {status}"
        );
    }

    /// Every CloudFormation request that reached the emulator since the
    /// last reset, in order (tests/emulator/moto_shim.py, patch 17).
    pub fn requests(&self) -> Vec<serde_json::Value> {
        use std::io::Write;
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to emulator");
        write!(
            s,
            "GET /stackwarden/requests HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        serde_json::from_str(body).expect("requests JSON")
    }

    /// Switches the shim's faults (tests/emulator/moto_shim.py, patch 11);
    /// `{}` turns them off. Returns what the shim injected so far.
    pub fn faults(&self, settings: serde_json::Value) -> serde_json::Value {
        let answer = http_post_body(self.port, "/stackwarden/faults", &settings.to_string());
        assert!(
            answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"),
            "faults refused: {answer}"
        );
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        serde_json::from_str(body).expect("faults JSON")
    }

    /// An SDK configuration pointing at the emulator with test credentials.
    pub async fn sdk_config(&self) -> aws_config::SdkConfig {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(self.url())
            .region(aws_config::Region::new(REGION))
            .credentials_provider(aws_sdk_sts::config::Credentials::new(
                "testing", "testing", None, None, "tests",
            ))
            .load()
            .await
    }

    /// The `stackwarden` binary, configured for this emulator through the
    /// standard AWS environment variables (as a user would).
    pub fn command(&self) -> Command {
        let mut cmd = stackwarden();
        cmd.env("AWS_ENDPOINT_URL", self.url())
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", REGION)
            .env_remove("AWS_PROFILE");
        cmd
    }
}

/// One stack's entry in a `reconcile -o json` answer, by its key.
pub fn stack_result<'v>(v: &'v serde_json::Value, key: &str) -> &'v serde_json::Value {
    v[0]["report"]["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["key"] == key)
        .unwrap_or_else(|| panic!("{key} in {v}"))
}

/// The desired count of an ECS service.
pub async fn desired_count(config: &aws_config::SdkConfig, cluster: &str, service: &str) -> i32 {
    let ecs = aws_sdk_ecs::Client::new(config);
    let out = ecs
        .describe_services()
        .cluster(cluster)
        .services(service)
        .send()
        .await
        .expect("DescribeServices");
    out.services()[0].desired_count()
}

/// Whether every stack of a `reconcile -o json` answer is in sync.
pub fn every_stack_in_sync(v: &serde_json::Value) -> bool {
    v[0]["report"]["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["result"]["kind"] == "in_sync")
}

/// An S3 client for the emulator (by path: `bucket.127.0.0.1` names no host).
pub fn s3_client(config: &aws_config::SdkConfig) -> aws_sdk_s3::Client {
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(config)
            .force_path_style(true)
            .build(),
    )
}

/// The real `stackwarden` binary, run from the repository root.
pub fn stackwarden() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stackwarden"));
    cmd.current_dir(repo())
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG");
    cmd
}

/// Runs a command, returning its output; prints it when the test fails.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run stackwarden")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The shipped dev with one more environment tag: every stack gets a new
/// revision (what an operator's fix-and-push looks like).
pub fn dev_new_revision() -> stackwarden::spec::DesiredEnv {
    let ws = Workspace::new();
    ws.edit(
        "desired-state/dev.yaml",
        "CostCenter: hr-platform",
        "CostCenter: hr-platform\n  Attempt: \"2\"",
    );
    stackwarden::spec::load(&ws.path("desired-state/dev.yaml")).expect("dev loads")
}

/// A copy of the shipped desired state and templates in a temporary folder,
/// for tests that edit it.
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new() -> Workspace {
        let dir = tempfile::tempdir().expect("tempdir");
        for sub in ["desired-state", "templates"] {
            copy_dir(&repo().join(sub), &dir.path().join(sub));
        }
        Workspace { dir }
    }

    pub fn desired_state(&self) -> PathBuf {
        self.dir.path().join("desired-state")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Gives dev one sync window (`policy.windows`), a flow mapping such
    /// as `{kind: allow, schedule: "0 8 * * *", duration: 1h}`.
    pub fn dev_sync_window(&self, window: &str) {
        self.edit(
            "desired-state/dev.yaml",
            "policy:\n  mode: converge\n",
            &format!("policy:\n  mode: converge\n  windows:\n    - {window}\n"),
        );
    }

    /// Replaces `from` by `to` in a file of the workspace; the text must be there.
    pub fn edit(&self, rel: &str, from: &str, to: &str) {
        let path = self.path(rel);
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.contains(from), "{rel} has no `{from}`");
        std::fs::write(&path, text.replacen(from, to, 1)).expect("write");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn http_post(port: u16, path: &str) -> String {
    http_post_body(port, path, "")
}

fn http_post_body(port: u16, path: &str, body: &str) -> String {
    use std::io::Write;
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to emulator");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

/// A simulated cloud with the shipped service's stack latencies.
pub fn sim_cloud(
    env: &stackwarden::spec::DesiredEnv,
    seed: u64,
) -> stackwarden::cloud::Retrying<stackwarden::cloud::sim::SimCloud> {
    use stackwarden::cloud::sim::{self, SERVICE_MINUTES, SimCloud, SimConfig};
    stackwarden::cloud::Retrying::new(SimCloud::new(SimConfig {
        seed,
        latency: sim::latencies(env, &SERVICE_MINUTES),
        ..SimConfig::default()
    }))
}

/// One pass of `reconcile` on a simulated cloud, comparing every template,
/// with seeded jitter (a history replays exactly).
pub async fn sim_pass(
    cloud: &stackwarden::cloud::Retrying<stackwarden::cloud::sim::SimCloud>,
    env: &stackwarden::spec::DesiredEnv,
    options: stackwarden::apply::Options,
) -> stackwarden::apply::Report {
    use stackwarden::apply;
    apply::reconcile(
        cloud,
        env,
        &tokio::sync::Semaphore::new(apply::DEFAULT_MAX_PARALLEL),
        &apply::Options {
            depth: stackwarden::observe::Depth::Full,
            jitter_seed: Some(0),
            ..options
        },
    )
    .await
    .expect("the pass observes")
}
