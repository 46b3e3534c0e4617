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
