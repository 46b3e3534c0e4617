//! The command line as a user meets it: configuration errors name the key and line and exit 2.

use std::process::Command;

fn tollgate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn check_config_names_the_key_and_line_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "gateway:\n  listen: 127.0.0.1:8080\n  routes:\n    - { id: a, path: /a, upstream: nowhere, colour: red }\n").unwrap();
    let (code, _, err) = tollgate(&["check-config", bad.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("gateway.routes[0]") && err.contains("colour") && err.contains("line 4"),
        "{err}"
    );

    std::fs::write(
        &bad,
        "gateway:\n  routes:\n    - { id: a, path: /a, upstream: nowhere }\n",
    )
    .unwrap();
    let (code, _, err) = tollgate(&["check-config", bad.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("gateway.routes[0].upstream"), "{err}");

    let good = dir.path().join("good.yaml");
    let key = tollgate(&["hash-key", "secret"]).1.trim().to_string();
    assert!(key.starts_with("sha256:") && key.len() == 71, "{key}");
    std::fs::write(
        &good,
        format!(
            "gateway:\n  upstreams: {{ app: {{ targets: [\"http://127.0.0.1:9\"] }} }}\n  routes: [ {{ id: a, methods: [get], path: \"/a/{{id}}\", upstream: app }} ]\nconsumers: [ {{ id: c, plan: p, api_keys: [\"{key}\"] }} ]\nplans: {{ p: {{ pricing: {{ currency: USD, charges: {{ default: {{ unit_price: \"0.001\" }} }} }} }} }}\n"
        ),
    )
    .unwrap();
    let (code, out, err) = tollgate(&["check-config", good.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok"));
}

#[test]
fn bad_arguments_and_missing_files_exit_2() {
    assert_eq!(tollgate(&["up", "--no-such-flag"]).0, 2);
    let (code, _, err) = tollgate(&["check-config", "/nonexistent/tollgate.yaml"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/tollgate.yaml"), "{err}");
}

/// Off a terminal, every log line is one JSON object, and a start and a stop log their
/// decisions (the addresses, the shutdown) without a line per request.
#[test]
fn logs_are_json_lines_off_a_terminal() {
    use std::io::{BufRead, BufReader};
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let (gw, api) = (tollgate_testkit::free_port(), tollgate_testkit::free_port());
    let config = dir.path().join("tollgate.yaml");
    std::fs::write(
        &config,
        format!(
            "gateway: {{ listen: 127.0.0.1:{gw} }}\nquery_api: {{ listen: 127.0.0.1:{api} }}\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["up", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !lines.iter().any(|l: &String| l.contains("tollgate is up")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => panic!("no start-up line within 60 s: {lines:?}"),
        }
    }
    // SIGTERM: the shutdown is logged too.
    let pid = child.id() as i32;
    assert_eq!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .code(),
        Some(0)
    );
    assert!(child.wait().unwrap().success());
    lines.extend(rx.try_iter());
    assert!(lines.len() >= 3, "{lines:?}");
    let mut up = None;
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        for key in ["timestamp", "level", "message", "target"] {
            assert!(v.get(key).is_some(), "no {key}: {line}");
        }
        if v["message"] == "tollgate is up" {
            up = Some(v);
        }
    }
    let up = up.unwrap();
    assert_eq!(up["gateway"], format!("http://127.0.0.1:{gw}"));
    assert_eq!(up["dashboards"], format!("http://127.0.0.1:{api}/"));
    assert!(
        lines.iter().any(|l| l.contains("shutting down")),
        "{lines:?}"
    );
}
