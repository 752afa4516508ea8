//! Rebuilding every read model while commands and queries continue: no query fails, and once
//! the projectors catch up the read models are exactly what a fresh replay of the store gives.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use apex_domain::{ActorRole, Tier};
use apex_projections::ReadModel;
use apex_projections::rebuild;
use tokio::sync::Mutex;

use crate::helpers::{Stack, stack};

/// Issues every read the API serves from the read models, plus a direct SELECT on every
/// `rm_*` table, until `stop`; records each failure.
async fn reader(
    stack: Arc<Stack>,
    stop: Arc<AtomicBool>,
    queries: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    timeline_of: String,
) {
    let admin = stack.token("admin-1", ActorRole::Admin, None);
    let user = stack.token("user-1", ActorRole::User, Some(Tier::Free));
    let routes = [
        ("/v1/admin/instances?limit=200".to_owned(), &admin),
        ("/v1/admin/agents".to_owned(), &admin),
        ("/v1/admin/usage".to_owned(), &admin),
        ("/v1/admin/users/user-1/usage".to_owned(), &admin),
        ("/v1/instances?limit=200".to_owned(), &user),
        (format!("/v1/instances/{timeline_of}"), &user),
        (
            format!("/v1/instances/{timeline_of}/timeline?limit=200"),
            &user,
        ),
        ("/v1/agents".to_owned(), &user),
    ];
    let tables: Vec<&str> = ReadModel::ALL
        .iter()
        .flat_map(|m| m.tables())
        .copied()
        .collect();
    while !stop.load(Ordering::Relaxed) {
        for (path, token) in &routes {
            let outcome = stack
                .client
                .get(stack.url(path))
                .bearer_auth(token)
                .send()
                .await;
            match outcome {
                Ok(r) if r.status().is_success() => match r.bytes().await {
                    Ok(_) => {}
                    Err(e) => failures.lock().await.push(format!("GET {path}: body {e}")),
                },
                Ok(r) => {
                    let status = r.status();
                    let body = r.text().await.unwrap_or_default();
                    failures
                        .lock()
                        .await
                        .push(format!("GET {path}: {status} {body}"));
                }
                Err(e) => failures.lock().await.push(format!("GET {path}: {e}")),
            }
            queries.fetch_add(1, Ordering::Relaxed);
        }
        for table in &tables {
            let sql = format!("SELECT count(*) FROM {table}");
            if let Err(e) = sqlx::query_scalar::<_, i64>(&sql)
                .fetch_one(&stack.pool)
                .await
            {
                failures.lock().await.push(format!("{sql}: {e}"));
            }
            queries.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// How the read models' tables are defined: columns, persistence, indexes, constraints and the
/// privileges granted on them.
async fn definitions(stack: &Stack) -> Vec<String> {
    let tables: Vec<&str> = ReadModel::ALL
        .iter()
        .flat_map(|m| m.tables())
        .copied()
        .collect();
    sqlx::query_scalar(
        "SELECT format('%s column %s %s %s %s', table_name, column_name, data_type,
                       is_nullable, column_default)
           FROM information_schema.columns
          WHERE table_schema = 'public' AND table_name = ANY($1)
         UNION ALL
         SELECT format('%s persistence %s', relname, relpersistence)
           FROM pg_class
          WHERE relnamespace = 'public'::regnamespace AND relname = ANY($1)
         UNION ALL
         SELECT format('%s index %s', tablename, indexdef)
           FROM pg_indexes
          WHERE schemaname = 'public' AND tablename = ANY($1)
         UNION ALL
         SELECT format('%s constraint %s %s', conrelid::regclass, conname,
                       pg_get_constraintdef(oid))
           FROM pg_constraint
          WHERE connamespace = 'public'::regnamespace
            AND conrelid::regclass::text = ANY($1)
         UNION ALL
         SELECT format('%s privilege %s %s %s', c.relname,
                       CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE r.rolname::text END,
                       a.privilege_type, a.is_grantable)
           FROM pg_class c
          CROSS JOIN LATERAL aclexplode(c.relacl) a
           LEFT JOIN pg_roles r ON r.oid = a.grantee
          WHERE c.relnamespace = 'public'::regnamespace AND c.relname = ANY($1)
            AND a.grantee <> c.relowner
          ORDER BY 1",
    )
    .bind(&tables)
    .fetch_all(&stack.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 6)]
async fn a_rebuild_under_load_ends_identical_to_the_live_read_models_and_no_query_fails() {
    let stack = Arc::new(stack().await);
    stack.agent("triage", &["search", "sql"]).await;
    stack.agent("report", &["search"]).await;
    let mut seeded = vec![];
    for n in 0..40 {
        let agent = if n % 2 == 0 { "triage" } else { "report" };
        let user = format!("user-{}", n % 4);
        seeded.push(stack.full_run(&user, agent, 4, n).await);
    }
    let watched = seeded[1].clone(); // a run of user-1
    stack.wait_projected(Duration::from_secs(60)).await;
    // A reporting role reads every read model, and everyone may read the usage table.
    let reporter = format!("apex_test_reporter_{}", uuid::Uuid::new_v4().simple());
    sqlx::raw_sql(&format!(
        "CREATE ROLE {reporter} NOLOGIN;
         GRANT SELECT ON {} TO {reporter};
         GRANT SELECT ON rm_usage TO PUBLIC;",
        ReadModel::ALL
            .iter()
            .flat_map(|m| m.tables())
            .copied()
            .collect::<Vec<_>>()
            .join(", ")
    ))
    .execute(&stack.pool)
    .await
    .unwrap();
    let defined = definitions(&stack).await;
    assert!(
        defined
            .iter()
            .any(|d| d == &format!("rm_timeline privilege {reporter} SELECT f")),
        "{defined:#?}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let queries = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            tokio::spawn(reader(
                stack.clone(),
                stop.clone(),
                queries.clone(),
                failures.clone(),
                watched.clone(),
            ))
        })
        .collect();
    let writer = {
        let (stack, stop) = (stack.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 1000;
            while !stop.load(Ordering::Relaxed) {
                let agent = if n % 2 == 0 { "triage" } else { "report" };
                stack
                    .full_run(&format!("user-{}", n % 5), agent, 2, n)
                    .await;
                n += 1;
            }
            n - 1000
        })
    };

    let events = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events")
            .fetch_one(&stack.pool)
            .await
            .unwrap()
    };
    let mut grew_during = 0;
    for round in 0..2 {
        for model in ReadModel::ALL {
            let before = events().await;
            let rebuilt = rebuild::rebuild(&stack.pool, model, |_| {});
            let replayed = tokio::time::timeout(Duration::from_secs(120), rebuilt)
                .await
                .unwrap_or_else(|_| panic!("the rebuild of {model} hangs"))
                .unwrap();
            assert!(replayed > 0, "{model} round {round}");
            if events().await > before {
                grew_during += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let done = Duration::from_secs(60);
    let runs_written = tokio::time::timeout(done, writer).await.unwrap().unwrap();
    for r in readers {
        tokio::time::timeout(done, r).await.unwrap().unwrap();
    }
    let failures = failures.lock().await.clone();
    assert!(
        failures.is_empty(),
        "{} queries failed: {failures:#?}",
        failures.len()
    );
    let queries = queries.load(Ordering::Relaxed);
    assert!(queries > 100, "only {queries} queries ran");
    assert!(
        runs_written > 0 && grew_during >= 5,
        "commands did not continue: {runs_written} runs, grew during {grew_during} rebuilds"
    );

    assert_eq!(
        definitions(&stack).await,
        defined,
        "the rebuilt tables are defined differently"
    );
    sqlx::raw_sql(&format!("DROP OWNED BY {reporter}; DROP ROLE {reporter}"))
        .execute(&stack.pool)
        .await
        .unwrap();
    let schemas: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'rebuild\\_%'")
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(schemas, 0, "a rebuild left its private schema behind");

    let runs = rebuild::latest_runs(&stack.pool).await.unwrap();
    assert_eq!(runs.len(), ReadModel::ALL.len());
    assert!(runs.iter().all(|r| r.status == "succeeded"), "{runs:#?}");

    stack.wait_projected(Duration::from_secs(60)).await;
    let live = stack.read_models().await;
    let replayed = stack.replayed_read_models().await;
    assert_eq!(
        live.keys().collect::<Vec<_>>(),
        replayed.keys().collect::<Vec<_>>()
    );
    for (table, rows) in &replayed {
        assert!(!rows.is_empty(), "{table} is empty");
        assert_eq!(&live[table], rows, "{table} differs from a fresh replay");
    }
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM rm_instances")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(total, 40 + runs_written as i64);
    eprintln!("{queries} queries, {runs_written} runs written during 10 rebuilds");
    Arc::into_inner(stack).unwrap().finish().await;
}
