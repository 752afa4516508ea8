//! The console in a real browser: headless Chromium (Debian's `/usr/bin/chromium`) driven by
//! `tests/browser/console.test.mjs` (playwright-core) against the whole stack in-process. This
//! test plays the agent runtime; the browser plays a user and then an admin.
//!
//! Needs Node.js, Chromium and `tests/browser/node_modules`: `scripts/browser-deps` installs
//! them, and this test fails (it never skips) when one is missing. The user view's screenshot
//! lands in `target/tmp/console/console.png`; with `APEX_UPDATE_SCREENSHOTS=1` a passing run
//! also copies it to `docs/images/console.png`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../support/broker.rs"]
mod broker;
mod stack;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};

const CHROMIUM: &str = "/usr/bin/chromium";
const AGENT: &str = "spend-analyst";
/// How long the browser may take for each half of its journey.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Fails, naming what is missing and how to install it, unless the browser test can run.
fn require_browser_tools() {
    let mut missing = Vec::new();
    let node = std::process::Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        missing.push("`node` (Node.js 20 or later) on PATH");
    }
    if !Path::new(CHROMIUM).exists() {
        missing.push("/usr/bin/chromium (Debian package `chromium`)");
    }
    if !root()
        .join("tests/browser/node_modules/playwright-core")
        .is_dir()
    {
        missing.push("tests/browser/node_modules (`npm ci --prefix tests/browser`)");
    }
    assert!(
        missing.is_empty(),
        "the console browser test cannot run; missing: {}. Install them with `scripts/browser-deps` \
         (scripts/test runs it), then run the test again.",
        missing.join("; ")
    );
}

/// The next stdout line of the browser script that is a JSON message of kind `event`.
async fn next_message(lines: &mut Lines<BufReader<ChildStdout>>, event: &str) -> Value {
    let wait = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            match serde_json::from_str::<Value>(&line) {
                Ok(message) if message["event"] == event => return Some(message),
                _ => eprintln!("browser: {line}"),
            }
        }
        None
    };
    match tokio::time::timeout(BROWSER_TIMEOUT, wait).await {
        Ok(Some(message)) => message,
        Ok(None) => panic!("the browser script ended before `{event}` (its stderr is above)"),
        Err(_) => panic!("no `{event}` from the browser script within {BROWSER_TIMEOUT:?}"),
    }
}

/// The agent runtime's side of a run, with pauses so the page receives each step live.
async fn play_runtime(stack: &stack::Stack, id: &str) {
    let steps = [
        (
            "start",
            json!({"message": "Looking at your usage", "prompt": "SECRET SYSTEM PROMPT"}),
        ),
        (
            "thoughts",
            json!({"thought": "Comparing this month's token usage with last month's", "prompt": "SECRET PROMPT"}),
        ),
        (
            "tools",
            json!({"call_id": "q1", "tool": "query_costs", "summary": "Querying costs by model", "arguments": {"sql": "SECRET SQL"}}),
        ),
        (
            "tools/q1/complete",
            json!({"summary": "Found 3 models; gpt-large is 81% of spend", "result": {"rows": "SECRET ROWS"}}),
        ),
        (
            "thoughts",
            json!({"thought": "Usage of gpt-large tripled after the 12th"}),
        ),
        (
            "complete",
            json!({"output": "Your bill doubled because a new workflow sends long prompts to gpt-large; routing it to a smaller model would save about 60%.", "raw": {"secret": "SECRET RAW"}}),
        ),
    ];
    for (step, body) in steps {
        tokio::time::sleep(Duration::from_millis(250)).await;
        stack.step(id, step, body).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_starts_a_run_in_the_console_and_watches_its_steps_arrive_live() {
    require_browser_tools();
    let stack = stack::start().await;
    stack
        .agent(AGENT, "Spend analyst", "Finds where your AI spend goes")
        .await;
    stack
        .agent(
            "report-writer",
            "Report writer",
            "Writes a monthly cost report",
        )
        .await;
    // Another user's run, left running, for the admin view (alice's page must not show it).
    let bob = stack
        .post(
            "/v1/instances",
            &stack.user("bob"),
            json!({"agent_id": AGENT, "input": "Which team spends most?"}),
        )
        .await;
    let bob_run = bob["instance_id"].as_str().unwrap().to_owned();
    stack
        .step(&bob_run, "start", json!({"message": "Looking at teams"}))
        .await;

    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console");
    let screenshot = shots.join("console.png");
    let _ = std::fs::remove_file(&screenshot);
    let mut child = Command::new("node")
        .arg(root().join("tests/browser/console.test.mjs"))
        .arg(&stack.base_url)
        .arg(stack.user("alice"))
        .arg(&screenshot)
        .arg(stack.admin())
        .arg(shots.join("console-admin.png"))
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("starting node");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();

    let created = next_message(&mut lines, "run_created").await;
    let alice_run = created["instance_id"].as_str().unwrap().to_owned();
    play_runtime(&stack, &alice_run).await;
    let done = next_message(&mut lines, "done").await;
    let status = tokio::time::timeout(BROWSER_TIMEOUT, child.wait())
        .await
        .expect("the browser script did not exit")
        .unwrap();
    assert!(status.success(), "the browser script failed: {status}");

    let user = &done["user"];
    let agents: Vec<&str> = user["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        agents,
        ["report-writer", AGENT],
        "the catalogue on the page"
    );
    let error = user["error_text"].as_str().unwrap();
    assert!(
        error.contains("agent_not_found"),
        "the API error shown: {error}"
    );
    assert_eq!(user["error_visible_after_run"], false);
    let steps: Vec<(&str, i64)> = user["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["type"].as_str().unwrap(), s["sequence"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        steps,
        [
            ("agent_started", 2),
            ("agent_thinking", 3),
            ("tool_executing", 4),
            ("tool_completed", 5),
            ("agent_thinking", 6),
            ("agent_completed", 7),
        ],
        "the run's steps on the page, each once and in order"
    );
    let page = user["page_text"].as_str().unwrap();
    assert!(page.contains("gpt-large is 81% of spend"), "{page}");
    assert!(
        !page.contains("SECRET"),
        "internal detail on the page: {page}"
    );
    assert!(!page.contains(&bob_run), "another user's run on the page");
    assert!(
        screenshot.is_file(),
        "no screenshot at {}",
        screenshot.display()
    );

    let admin = &done["admin"];
    assert_eq!(admin["running"], json!([bob_run]), "running instances");
    let projectors = admin["projectors"].as_array().unwrap();
    assert_eq!(projectors.len(), 4, "projector rows: {projectors:?}");
    assert!(admin["refreshes"].as_i64().unwrap() >= 2, "refreshes");

    if std::env::var_os("APEX_UPDATE_SCREENSHOTS").is_some() {
        let docs = root().join("docs/images/console.png");
        std::fs::create_dir_all(docs.parent().unwrap()).unwrap();
        std::fs::copy(&screenshot, &docs).unwrap();
    }
    stack.stop().await;
}
