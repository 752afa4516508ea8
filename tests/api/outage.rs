//! PostgreSQL outages, for real: the app reaches the database only through a small in-test TCP
//! proxy that the test cuts (every connection dropped, new ones refused) or blackholes
//! (connections accepted but nothing forwarded) and then restores, without restarting the app.
//!
//! While the database is gone, commands and queries answer `503 service_unavailable` within a
//! bounded time, readiness is red and names postgres, and nothing is stored; once it is back
//! the same app serves again on its own, and the refused commands can be repeated safely.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apex::config::Settings;
use apex::startup::{self, Application};
use apex_domain::Tier;
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::helpers::{SECRET, TestApp, assert_error};

/// A request that the app cannot serve must still be answered within this time.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Forwards both ways.
    Up,
    /// Accepts connections and holds them open, forwarding nothing (a network partition).
    Blackhole,
}

/// A TCP proxy from `127.0.0.1:<port>` to PostgreSQL.
struct Proxy {
    port: u16,
    /// Keeps the port ours while no listener is open (bound, never listening: connections
    /// to the port are refused, and no other process can take it).
    _reservation: TcpSocket,
    upstream: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    acceptor: Option<JoinHandle<()>>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

fn bind(port: u16) -> TcpSocket {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.set_reuseport(true).unwrap();
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .unwrap();
    socket
}

fn listen(port: u16) -> TcpListener {
    bind(port).listen(128).unwrap()
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        let reservation = bind(0);
        let port = reservation.local_addr().unwrap().port();
        let mut proxy = Self {
            port,
            _reservation: reservation,
            upstream,
            mode: Arc::new(Mutex::new(Mode::Up)),
            acceptor: None,
            connections: Arc::new(Mutex::new(Vec::new())),
        };
        proxy.open(listen(port));
        proxy
    }

    fn open(&mut self, listener: TcpListener) {
        let (upstream, mode, connections) =
            (self.upstream, self.mode.clone(), self.connections.clone());
        self.acceptor = Some(tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mode = *mode.lock().unwrap();
                let task = tokio::spawn(async move {
                    if mode == Mode::Blackhole {
                        // Hold the socket, say nothing.
                        std::future::pending::<()>().await;
                    }
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                connections.lock().unwrap().push(task);
            }
        }));
    }

    /// Drops every connection.
    async fn drop_connections(&self) {
        let tasks: Vec<_> = self.connections.lock().unwrap().drain(..).collect();
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
    }

    /// The database is gone: every connection is dropped and new ones are refused.
    async fn cut(&mut self) {
        if let Some(acceptor) = self.acceptor.take() {
            acceptor.abort();
            let _ = acceptor.await;
        }
        self.drop_connections().await;
    }

    /// The database hangs: every connection is dropped, new ones are accepted and never answered.
    async fn blackhole(&mut self) {
        *self.mode.lock().unwrap() = Mode::Blackhole;
        self.drop_connections().await;
    }

    /// The database is back, on the same port.
    async fn restore(&mut self) {
        *self.mode.lock().unwrap() = Mode::Up;
        if self.acceptor.is_none() {
            self.open(listen(self.port));
        } else {
            // From a blackhole: the held connections must go.
            self.drop_connections().await;
        }
    }
}

/// An app whose only way to the database is `proxy`, and a direct pool for the test's checks.
async fn app_behind(proxy: &Proxy, database: &str) -> TestApp {
    let text = include_str!("../../environments/dev/apex.toml");
    let settings = |port: u16| {
        let vars = vec![
            ("APEX_DATABASE_PASSWORD".to_owned(), String::new()),
            ("APEX_AMQP_PASSWORD".to_owned(), "guest".to_owned()),
            ("APEX_JWT_SECRET".to_owned(), SECRET.to_owned()),
            ("APEX__HTTP__PORT".to_owned(), "0".to_owned()),
            ("APEX__DATABASE__NAME".to_owned(), database.to_owned()),
            ("APEX__DATABASE__PORT".to_owned(), port.to_string()),
            ("APEX__DATABASE__MAX_CONNECTIONS".to_owned(), "4".to_owned()),
        ];
        Settings::from_toml(text, Path::new("environments/dev/apex.toml"), vars).unwrap()
    };
    // Create and migrate through the real port; the app itself only knows the proxy.
    let direct = settings(5432);
    let pool = startup::prepare_database(&direct.database).await.unwrap();
    let settings = settings(proxy.port);
    let app = Application::build(&settings).await.expect("app builds");
    let address = format!("http://{}", app.local_addr().unwrap());
    let state = app.state.clone();
    tokio::spawn(app.run_until(std::future::pending()));
    TestApp {
        address,
        pool,
        client: Client::builder()
            .timeout(ANSWER_WITHIN * 2)
            .build()
            .unwrap(),
        settings,
        state,
    }
}

/// The runs of `user-1` the commands act on.
struct Runs {
    running: String,
    pending: String,
}

/// A fresh database, a proxy in front of it, an app behind the proxy, the active agent
/// `triage`, and a running and a pending run of `user-1`.
async fn setup() -> (Proxy, TestApp, Runs) {
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], 5432))).await;
    let app = app_behind(&proxy, &format!("apex_test_{}", Uuid::new_v4().simple())).await;
    app.active_agent("triage", &["search"], &["free"]).await;
    let user = app.user("user-1", Tier::Free);
    let runs = Runs {
        running: app.running_instance(&user, "triage").await,
        pending: app.instance(&user, "triage").await,
    };
    (proxy, app, runs)
}

/// One command of each kind, each with its own idempotency key: `(path, token, body, key)`.
fn commands(app: &TestApp, runs: &Runs) -> Vec<(String, String, Value, String)> {
    let user = app.user("user-1", Tier::Free);
    let key = || Uuid::new_v4().to_string();
    vec![
        (
            "/v1/instances".to_owned(),
            user.clone(),
            json!({"agent_id": "triage", "input": "during the outage"}),
            key(),
        ),
        (
            format!("/v1/runner/instances/{}/thoughts", runs.running),
            app.runner(),
            json!({"thought": "still thinking"}),
            key(),
        ),
        (
            "/v1/admin/agents".to_owned(),
            app.admin(),
            json!({"id": "outage", "display_name": "Outage", "tiers": ["free"]}),
            key(),
        ),
        (
            format!("/v1/instances/{}/cancel", runs.pending),
            user,
            json!({}),
            key(),
        ),
    ]
}

/// Sends every command at once; each answer with the time it took.
async fn send_all(
    app: &TestApp,
    commands: &[(String, String, Value, String)],
) -> Vec<(reqwest::Response, Duration)> {
    let requests = commands.iter().map(|(path, token, body, key)| async move {
        let started = Instant::now();
        let r = app
            .client
            .post(app.url(path))
            .bearer_auth(token)
            .header("Idempotency-Key", key)
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path}: no answer: {e}"));
        (r, started.elapsed())
    });
    futures::future::join_all(requests).await
}

/// Every command answers `503 service_unavailable` with Retry-After, within the bound.
async fn assert_all_unavailable(app: &TestApp, commands: &[(String, String, Value, String)]) {
    for ((path, ..), (r, took)) in commands.iter().zip(send_all(app, commands).await) {
        eprintln!("outage: POST {path} answered {} in {took:?}", r.status());
        assert!(took < ANSWER_WITHIN, "{path} took {took:?}");
        assert!(
            r.headers().contains_key("retry-after"),
            "{path}: no Retry-After"
        );
        assert_error(r, StatusCode::SERVICE_UNAVAILABLE, "service_unavailable").await;
    }
}

/// Readiness is red, names postgres, and answers within the bound.
async fn assert_not_ready(app: &TestApp) {
    let started = Instant::now();
    let r = app
        .client
        .get(app.url("/health/ready"))
        .send()
        .await
        .unwrap();
    assert!(started.elapsed() < ANSWER_WITHIN);
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "unavailable", "{body}");
    let postgres = body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "postgres")
        .unwrap_or_else(|| panic!("readiness does not name postgres: {body}"));
    assert_ne!(postgres["status"], "ok", "{body}");
}

/// Waits until readiness is green again (the app reconnects on its own).
async fn wait_ready(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = app.client.get(app.url("/health/ready")).send().await;
        if r.is_ok_and(|r| r.status() == StatusCode::OK) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the app did not become ready again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// After the outage: nothing the refused commands carried was stored; repeated with the same
/// idempotency keys they are accepted (not replayed) and append once each.
async fn assert_refused_commands_left_nothing_and_can_be_repeated(
    app: &TestApp,
    before: i64,
    commands: &[(String, String, Value, String)],
) {
    assert_eq!(
        app.event_count().await,
        before,
        "a 503 command stored events"
    );
    let keys: Vec<String> = commands.iter().map(|c| c.3.clone()).collect();
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM idempotency_keys WHERE idempotency_key = ANY($1)")
            .bind(&keys)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(stored, 0, "a 503 command left an idempotency record");

    for ((path, ..), (r, _)) in commands.iter().zip(send_all(app, commands).await) {
        let status = r.status();
        assert!(
            status.is_success(),
            "{path}: {status} {}",
            r.text().await.unwrap()
        );
        assert!(
            r.headers().get("idempotent-replayed").is_none(),
            "{path}: replayed an answer that was never stored"
        );
    }
    // Create, thought, define, cancel: one event each.
    assert_eq!(app.event_count().await, before + 4);
}

#[tokio::test]
async fn with_postgres_unreachable_commands_answer_503_and_the_app_recovers_on_its_own() {
    let (mut proxy, app, runs) = setup().await;
    let before = app.event_count().await;
    let commands = commands(&app, &runs);

    proxy.cut().await;
    assert!(
        TcpStream::connect(("127.0.0.1", proxy.port)).await.is_err(),
        "the cut proxy still accepts connections"
    );
    assert_all_unavailable(&app, &commands).await;
    // Reads answer the same way.
    let r = app
        .client
        .get(app.url("/v1/instances"))
        .bearer_auth(app.user("user-1", Tier::Free))
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::SERVICE_UNAVAILABLE, "service_unavailable").await;
    assert_not_ready(&app).await;
    // The database itself (reached directly) saw nothing.
    assert_eq!(app.event_count().await, before);

    proxy.restore().await;
    wait_ready(&app).await;
    assert_refused_commands_left_nothing_and_can_be_repeated(&app, before, &commands).await;
}

#[tokio::test]
async fn with_postgres_hanging_requests_still_answer_503_in_bounded_time() {
    let (mut proxy, app, runs) = setup().await;
    let before = app.event_count().await;
    let commands = commands(&app, &runs);

    proxy.blackhole().await;
    assert_all_unavailable(&app, &commands).await;
    assert_not_ready(&app).await;

    proxy.restore().await;
    wait_ready(&app).await;
    assert_refused_commands_left_nothing_and_can_be_repeated(&app, before, &commands).await;
}

#[tokio::test]
async fn a_command_after_a_brief_outage_succeeds_without_a_restart() {
    let (mut proxy, app, runs) = setup().await;
    let id = runs.running;
    // The pool's idle connections die with the cut; the next command must not fail on them.
    proxy.cut().await;
    proxy.restore().await;
    let r = app.think(&id, "after the blip").await;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    let r = app
        .client
        .get(app.url(&format!("/v1/instances/{id}")))
        .bearer_auth(app.user("user-1", Tier::Free))
        .send()
        .await
        .unwrap();
    // The run exists (read model may trail: 200 or 404, never 5xx).
    assert!(!r.status().is_server_error(), "{}", r.status());
}

/// The workers' pool checks a connection only when it has been idle for a while (a check per
/// use would double the round trips of their single-statement units of work): one that died
/// while idle is dropped and replaced before it is handed out, so the statement does not fail.
#[tokio::test]
async fn a_workers_connection_that_died_while_idle_is_replaced_before_it_is_used() {
    let app = crate::helpers::spawn_app().await;
    let pool = apex_commands::connect_workers(app.settings.database.options(), 1);
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    tokio::time::sleep(apex_commands::store::CHECK_IDLE_AFTER + Duration::from_millis(200)).await;
    let mut admin = crate::helpers::server_connection(&app.settings).await;
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert!(terminated);
    for _ in 0..100 {
        let alive: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
                .bind(pid)
                .fetch_one(&mut admin)
                .await
                .unwrap();
        if !alive {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .expect("the dead connection is replaced, not handed out");
    assert_ne!(after, pid);
}

/// A command whose connection is cut while PostgreSQL executes its append: the statement
/// commits, its answer is lost. The writer reconnects, finds the command's events stored under
/// its causation id (after waiting, on the primary key, for the lost statement to end) and
/// answers 200; the thought is stored once.
#[tokio::test]
async fn a_command_whose_answer_is_lost_with_its_connection_is_stored_once_and_answered() {
    let (proxy, app, runs) = setup().await;
    let id = runs.running;
    // Holds the marked thought's append inside PostgreSQL long enough to cut its connection.
    sqlx::raw_sql(
        "CREATE FUNCTION test_slow_append() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.payload::text LIKE '%answer lost%' THEN PERFORM pg_sleep(1); END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER test_slow_append BEFORE INSERT ON events
             FOR EACH ROW EXECUTE FUNCTION test_slow_append();",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let before = app.event_count().await;

    let command = {
        let (client, url, token) = (
            app.client.clone(),
            app.url(&format!("/v1/runner/instances/{id}/thoughts")),
            app.runner(),
        );
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(token)
                .json(&json!({"thought": "answer lost"}))
                .send()
                .await
                .unwrap()
        })
    };
    let started = Instant::now();
    loop {
        let sleeping: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                             WHERE datname = current_database() AND wait_event = 'PgSleep')",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if sleeping {
            break;
        }
        assert!(
            started.elapsed() < ANSWER_WITHIN,
            "the append never reached the database"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The connection alone is lost: the database stays reachable, new connections are
    // accepted at once. (Refusing them even briefly would make the writer's settling fail
    // and answer 503, the documented answer when the outcome cannot be learned.)
    proxy.drop_connections().await;

    let r = command.await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events
          WHERE aggregate_id = $1 AND payload::text LIKE '%answer lost%'",
    )
    .bind(&id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(stored, 1, "the thought is stored exactly once");
    assert_eq!(app.event_count().await, before + 1);
    // The run goes on from there.
    let r = app.think(&id, "after the lost answer").await;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    assert_eq!(app.event_count().await, before + 2);
}
