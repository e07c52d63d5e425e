//! The /system API over real HTTP: every route, faas-cli's flows, and bad input.

mod common;

use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn faas_cli_put_then_post_deploy_describe_list_delete() {
    let gw = TestGateway::start(&[]);
    let f = fork_fn("hello", "echo hi");
    // faas-cli deploys with PUT first, then POST when the function is missing.
    let put = gw
        .auth(gw.http.put(gw.url("/system/functions")))
        .json(&f)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 404);
    gw.deploy_ok(f.clone()).await;
    assert_eq!(
        gw.deploy(f.clone()).await.status(),
        409,
        "second POST is a conflict"
    );
    let put = gw
        .auth(gw.http.put(gw.url("/system/functions")))
        .json(&f)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 202);

    assert_eq!(gw.invoke("hello").await.text().await.unwrap(), "hi\n");
    let status = gw.wait_available("hello", 1).await;
    assert_eq!(status["name"], "hello");
    assert_eq!(status["namespace"], "openfaas-fn");
    assert_eq!(status["image"], "test/hello:1");
    assert_eq!(status["replicas"], 1);
    assert_eq!(status["invocationCount"], 1.0);
    assert!(status["createdAt"].as_str().unwrap().ends_with('Z'));
    assert!(status.get("usage").is_none());

    let described: Value = gw
        .get_json("/system/function/hello?namespace=openfaas-fn&usage=1")
        .await;
    assert!(described["usage"]["cpu"].is_number(), "{described}");
    assert!(
        described["usage"]["totalMemoryBytes"].is_number(),
        "{described}"
    );

    let list: Value = gw.get_json("/system/functions").await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["invocationCount"], 1.0);

    let del = gw
        .auth(gw.http.delete(gw.url("/system/functions")))
        .json(&json!({"functionName": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 202);
    let del = gw
        .auth(gw.http.delete(gw.url("/system/functions")))
        .json(&json!({"functionName": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 404);
    assert_eq!(gw.invoke("hello").await.status(), 404);
    assert_eq!(
        gw.get_sys("/system/function/hello")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

#[tokio::test]
async fn namespaces_info_healthz_and_metrics() {
    let gw = TestGateway::start(&["--namespaces", "staging"]);
    let ns: Value = gw.get_json("/system/namespaces").await;
    assert_eq!(ns, json!(["openfaas-fn", "staging"]));
    let info: Value = gw.get_json("/system/info").await;
    assert_eq!(info["provider"]["provider"], "tally-local");
    assert_eq!(info["provider"]["orchestration"], "local");
    assert!(info["version"]["release"].is_string());
    assert!(info["arch"].is_string());
    let health = gw.http.get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    // A function in the second namespace, invoked with the name.namespace suffix.
    let mut f = fork_fn("env", "echo staged");
    f["namespace"] = json!("staging");
    gw.deploy_ok(f).await;
    assert_eq!(
        gw.invoke("env.staging").await.text().await.unwrap(),
        "staged\n"
    );
    assert_eq!(
        gw.invoke("env").await.status(),
        404,
        "not in the default namespace"
    );
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "gateway_function_invocation_started_total{function_name=\"env.staging\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "gateway_function_invocation_total{code=\"200\",function_name=\"env.staging\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "gateway_service_count{function_name=\"env.staging\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "gateway_function_invocation_inflight{function_name=\"env.staging\"}"
        ),
        Some(0.0)
    );
    assert!(m.contains("gateway_functions_seconds_bucket{code=\"200\",function_name=\"env.staging\",le=\"0.005\"}"), "{m}");
    let list: Value = gw.get_json("/system/functions?namespace=staging").await;
    assert_eq!(list[0]["name"], "env");
}

#[tokio::test]
async fn basic_auth_failures() {
    let gw = TestGateway::start(&[]);
    for rb in [
        gw.http.get(gw.url("/system/functions")),
        gw.http
            .get(gw.url("/system/functions"))
            .basic_auth("admin", Some("wrong")),
        gw.http
            .get(gw.url("/system/functions"))
            .basic_auth("root", Some("x")),
        gw.http
            .get(gw.url("/system/info"))
            .header("Authorization", "Basic !!!"),
    ] {
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(
            r.headers()["www-authenticate"],
            "Basic realm=\"Restricted\""
        );
        assert_eq!(r.text().await.unwrap(), "invalid credentials\n");
    }
    assert_eq!(
        gw.get_sys("/system/functions")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn credentials_from_secret_mount_path() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("basic-auth-user"), "ops\n").unwrap();
    std::fs::write(dir.path().join("basic-auth-password"), "from-a-file\n").unwrap();
    let path = dir.path().to_str().unwrap().to_string();
    let gw = TestGateway::start(&["--secret-mount-path", &path]);
    let ok = gw
        .http
        .get(gw.url("/system/functions"))
        .basic_auth("ops", Some("from-a-file"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let generated = gw.get_sys("/system/functions").send().await.unwrap();
    assert_eq!(
        generated.status(),
        401,
        "the generated password must not work then"
    );
}

async fn expect(r: reqwest::Response, status: u16, needle: &str) {
    let got = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert_eq!(got, status, "body: {text}");
    assert!(
        text.contains(needle),
        "{text:?} does not mention {needle:?}"
    );
}

#[tokio::test]
async fn bad_deployments_get_clear_errors_and_change_nothing() {
    let gw = TestGateway::start(&[]);
    let post = async |body: String| {
        gw.auth(gw.http.post(gw.url("/system/functions")))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
    };
    expect(
        post(r#"{"service":"Bad_Name","image":"x","envProcess":"cat"}"#.into()).await,
        400,
        "lowercase",
    )
    .await;
    expect(
        post(format!(
            r#"{{"service":"{}","image":"x","envProcess":"cat"}}"#,
            "a".repeat(64)
        ))
        .await,
        400,
        "63",
    )
    .await;
    expect(post("{not json".into()).await, 400, "invalid JSON").await;
    expect(
        post(r#"{"service":"a","image":"x","envProcess":"cat","labels":["x"]}"#.into()).await,
        400,
        "`labels`",
    )
    .await;
    expect(
        post(r#"{"service":"a","image":"x","envProcess":"cat","envVars":{"k":1}}"#.into()).await,
        400,
        "envVars.k",
    )
    .await;
    expect(
        post(r#"{"image":"x","envProcess":"cat"}"#.into()).await,
        400,
        "missing field `service`",
    )
    .await;
    expect(
        post(r#"{"service":"a","image":"x"}"#.into()).await,
        400,
        "envProcess is required",
    )
    .await;
    expect(
        post(r#"{"service":"a","image":"x","envProcess":"/no/such/binary"}"#.into()).await,
        400,
        "not found",
    )
    .await;
    expect(
        post(r#"{"service":"a","image":"x","envProcess":"cat","namespace":"nope"}"#.into()).await,
        404,
        "nope",
    )
    .await;
    expect(
        post(r#"{"service":"a","image":"x","envProcess":"cat","limits":{"memory":"lots"}}"#.into())
            .await,
        400,
        "limits.memory",
    )
    .await;
    let huge = format!(
        r#"{{"service":"a","image":"x","envProcess":"cat","envVars":{{"k":"{}"}}}}"#,
        "x".repeat(2 << 20)
    );
    expect(post(huge).await, 413, "limit").await;
    // Unknown fields are ignored (OpenFaaS clients send more than we read).
    gw.deploy_ok(json!({"service":"a","image":"x","envProcess":"cat","somethingNew":{"x":[1]}}))
        .await;
    let list: Value = gw.get_json("/system/functions").await;
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "only the valid deploy landed: {list}"
    );
    let state = std::fs::read_to_string(gw.data.path().join("functions.json")).unwrap();
    assert!(state.contains("\"a\"") && !state.contains("Bad_Name"));
}

#[tokio::test]
async fn bad_requests_on_other_routes() {
    let gw = TestGateway::start(&["--max-body-bytes", "1024"]);
    gw.deploy_ok(fork_fn("cat", "cat")).await;
    expect(gw.invoke("Not_A_Name").await, 400, "invalid function name").await;
    expect(gw.invoke("missing").await, 404, "not found").await;
    expect(gw.invoke("cat.nons").await, 404, "not found").await;
    let big = gw
        .http
        .post(gw.url("/function/cat"))
        .body(vec![b'x'; 2048])
        .send()
        .await
        .unwrap();
    expect(big, 413, "1024").await;
    let ok = gw
        .http
        .post(gw.url("/function/cat"))
        .body(vec![b'x'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let trace = gw
        .http
        .request(reqwest::Method::TRACE, gw.url("/function/cat"))
        .send()
        .await
        .unwrap();
    assert_eq!(trace.status(), 405);
    let scale = async |body: &str| {
        gw.auth(gw.http.post(gw.url("/system/scale-function/cat")))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    };
    expect(scale(r#"{"replicas":"two"}"#).await, 400, "`replicas`").await;
    expect(scale(r#"{"replicas":-1}"#).await, 400, "`replicas`").await;
    expect(
        scale(r#"{"serviceName":"other","replicas":1}"#).await,
        400,
        "does not match",
    )
    .await;
    expect(scale(r#"{"replicas":21}"#).await, 400, "maximum 20").await;
    expect(
        gw.get_sys("/system/function/cat?namespace=Bad!")
            .send()
            .await
            .unwrap(),
        400,
        "namespace",
    )
    .await;
    expect(
        gw.get_sys("/system/function/cat?namespace=other")
            .send()
            .await
            .unwrap(),
        404,
        "other",
    )
    .await;
    expect(
        gw.get_sys("/system/logs").send().await.unwrap(),
        400,
        "`name`",
    )
    .await;
    expect(
        gw.get_sys("/system/logs?name=cat&tail=x")
            .send()
            .await
            .unwrap(),
        400,
        "tail",
    )
    .await;
    expect(
        gw.get_sys("/system/logs?name=cat&since=yesterday")
            .send()
            .await
            .unwrap(),
        400,
        "RFC3339",
    )
    .await;
    expect(
        gw.get_sys("/system/nothing").send().await.unwrap(),
        404,
        "no route",
    )
    .await;
    let wrong_method = gw
        .auth(gw.http.patch(gw.url("/system/functions")))
        .send()
        .await
        .unwrap();
    expect(wrong_method, 405, "PATCH").await;
}

#[tokio::test]
async fn a_command_that_exits_at_once_shows_why() {
    let gw = TestGateway::start(&[]);
    let f = json!({"service":"dies","image":"x","envProcess":"sh -c 'echo boom >&2; exit 7'","envVars":{"mode":"http"}});
    gw.deploy_ok(f).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let s = gw.describe("dies").await;
        assert_eq!(s["availableReplicas"], 0);
        if let Some(msg) = s["message"].as_str() {
            assert!(msg.contains("exit status: 7"), "{msg}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no message: {s}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let logs = gw
        .get_sys("/system/logs?name=dies")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(logs.contains("boom"), "{logs}");
}

#[tokio::test]
async fn usage_ingest_keeps_valid_events_and_counts_the_rest() {
    let gw = TestGateway::start(&[]);
    let event = |call: &str, duration: u64| {
        json!({
            "call_id": call, "namespace": "openfaas-fn", "function_name": "env", "replica": "env-abcde",
            "started": "2026-11-22T10:00:00.123456789Z", "duration_ns": duration, "status_code": 200,
            "memory_peak_bytes": 1048576, "memory_limit_bytes": null, "source": "kernel"
        })
    };
    let mut negative = event("d", 0);
    negative["duration_ns"] = json!(-5);
    let mut overflowing = event("e", 0);
    overflowing["duration_ns"] = json!(1e30);
    let batch = json!([
        event("a", 1_500_000),
        event("b", u64::MAX),
        event("c", 2_000_000),
        negative,
        overflowing,
        "garbage"
    ]);
    let r = gw.post_usage(&batch).await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["accepted"], 2);
    assert_eq!(body["rejected"][0]["index"], 1);
    assert!(
        body["rejected"][0]["error"]
            .as_str()
            .unwrap()
            .contains("7 days")
    );
    let errors: Vec<(u64, String)> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["index"].as_u64().unwrap(),
                r["error"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert_eq!((errors[1].0, errors[2].0, errors[3].0), (3, 4, 5));
    assert!(
        errors[1].1.contains("duration_ns"),
        "names the field: {errors:?}"
    );
    assert!(
        errors[2].1.contains("duration_ns"),
        "names the field: {errors:?}"
    );
    let kept: Vec<Value> = gw.usage("function=env").await;
    assert_eq!(kept.len(), 2);
    let one: Vec<Value> = gw.usage("call_id=c").await;
    assert_eq!(one[0]["duration_ns"], 2_000_000);
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "gateway_usage_events_total{source=\"kernel\"}"),
        Some(2.0)
    );
    assert_eq!(metric(&m, "gateway_usage_events_rejected_total"), Some(4.0));
    let r = gw
        .auth(gw.http.post(gw.url("/system/usage")))
        .body("{\"not\":\"a list\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = gw
        .http
        .post(gw.url("/system/usage"))
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the ingest API is authenticated");
}

#[tokio::test]
async fn usage_ingest_refuses_absurd_events_of_a_readable_batch() {
    // Every event reads (the one-pass path): the checks after parsing still apply to each.
    let gw = TestGateway::start(&[]);
    let event = |call: &str, name: &str, started: &str| {
        json!({
            "id": format!("ev-{call}"), "call_id": call, "namespace": "openfaas-fn",
            "function_name": name, "replica": "env-abcde", "started": started,
            "duration_ns": 1000, "status_code": 200, "memory_peak_bytes": 1048576,
            "memory_limit_bytes": 2097152, "source": "kernel"
        })
    };
    let good = "2026-11-22T10:00:00.123456789Z";
    let batch = json!([
        event("a", "env", good),
        event("b", "Not_A_Label", good),
        event("c", "env", "yesterday"),
        event("d", "env", good),
    ]);
    let r = gw.post_usage(&batch).await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["accepted"], 2, "{body}");
    let rejected = body["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 2, "{body}");
    assert_eq!(rejected[0]["index"], 1);
    assert!(
        rejected[0]["error"]
            .as_str()
            .unwrap()
            .contains("function_name"),
        "{body}"
    );
    assert_eq!(rejected[1]["index"], 2);
    assert!(
        rejected[1]["error"].as_str().unwrap().contains("RFC3339"),
        "{body}"
    );
    let kept: Vec<Value> = gw.usage("function=env").await;
    let calls: Vec<&str> = kept.iter().filter_map(|e| e["call_id"].as_str()).collect();
    assert_eq!(calls, ["a", "d"]);
}

#[tokio::test]
async fn usage_ingest_reads_the_agents_postcard_batches() {
    use agent_common::wire::{self, Usage};
    use std::borrow::Cow;
    let gw = TestGateway::start(&[]);
    let usage = |call: &'static str, name: &'static str| Usage {
        id: Some(Cow::Owned(format!("pc-{call}"))),
        call_id: Some(Cow::Borrowed(call)),
        namespace: Cow::Borrowed("openfaas-fn"),
        function_name: Cow::Borrowed(name),
        replica: Some(Cow::Borrowed("env-abcde")),
        started: Cow::Borrowed("2026-11-22T10:00:00.123456789Z"),
        duration_ns: 1_500_000,
        status_code: 200,
        memory_peak_bytes: 1 << 20,
        memory_limit_bytes: Some(128 << 20),
        cpu_ns: Some(41_000),
        exit_code: None,
        source: Cow::Borrowed("kernel"),
    };
    let body = wire::encode(&[
        usage("a", "env"),
        usage("b", "Not_A_Label"),
        usage("c", "env"),
    ])
    .unwrap();
    let post = |body: Vec<u8>| {
        gw.auth(gw.http.post(gw.url("/system/usage")))
            .header("content-type", format!("{}; v=1", wire::CONTENT_TYPE))
            .body(body)
            .send()
    };
    // A body cut short reads as nothing: 400 naming the format, no event kept.
    let r = post(body[..body.len() - 5].to_vec()).await.unwrap();
    assert_eq!(r.status(), 400);
    let why = r.text().await.unwrap();
    assert!(why.contains(wire::CONTENT_TYPE), "{why}");
    assert!(gw.usage("function=env").await.is_empty());
    let r = post(body).await.unwrap();
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["accepted"], 2, "{answer}");
    assert_eq!(answer["rejected"][0]["index"], 1, "{answer}");
    assert!(
        answer["rejected"][0]["error"]
            .as_str()
            .unwrap()
            .contains("function_name"),
        "{answer}"
    );
    let kept: Vec<Value> = gw.usage("function=env").await;
    let calls: Vec<&str> = kept.iter().filter_map(|e| e["call_id"].as_str()).collect();
    assert_eq!(calls, ["a", "c"]);
    assert_eq!(kept[0]["id"], "pc-a");
    assert_eq!(kept[0]["cpu_ns"], 41_000);
    assert_eq!(kept[0]["memory_limit_bytes"], 128 << 20);
    assert_eq!(kept[0]["source"], "kernel");
}
