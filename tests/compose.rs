//! `compose/` checked without a Docker engine: every Tollgate configuration file passes
//! `tollgate check-config`, and the names and ports the configuration uses are the services and
//! ports docker-compose.yml defines.

use std::path::PathBuf;
use std::process::Command;

use serde_yaml_ng::Value;

/// The repository root, as the test runner says when it runs the test (a test binary built in
/// another checkout and found fresh would carry that checkout's path in `env!`).
fn root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn load(path: &str) -> Value {
    let p = root().join(path);
    serde_yaml_ng::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn host_port(url: &str) -> (String, u16) {
    let rest = url.split("://").last().unwrap();
    let authority = rest.split('/').next().unwrap();
    let (h, p) = authority.rsplit_once(':').unwrap();
    (h.to_string(), p.parse().unwrap())
}

#[test]
fn every_config_file_passes_check_config() {
    let dir = root().join("compose");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
                .arg("check-config")
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 1);
}

#[test]
fn names_and_ports_agree_with_the_compose_file() {
    let compose = load("compose/docker-compose.yml");
    let config = load("compose/tollgate.yaml");
    let services = compose["services"].as_mapping().unwrap();
    let has = |name: &str| services.contains_key(Value::String(name.into()));

    // Every host the configuration names is a compose service.
    let (kafka, _) = host_port(&format!(
        "tcp://{}",
        config["bus"]["brokers"].as_str().unwrap()
    ));
    assert!(has(&kafka), "bus.brokers names `{kafka}`");
    let (ch, ch_port) = host_port(config["store"]["url"].as_str().unwrap());
    assert!(has(&ch), "store.url names `{ch}`");
    let (api, api_port) = host_port(config["gateway"]["quota"]["url"].as_str().unwrap());
    assert!(has(&api), "gateway.quota.url names `{api}`");
    for (_, up) in config["gateway"]["upstreams"].as_mapping().unwrap() {
        for t in up["targets"].as_sequence().unwrap() {
            let (h, _) = host_port(t.as_str().unwrap());
            assert!(has(&h), "upstream target names `{h}`");
        }
    }

    // The query API listens where the gateways poll it and where compose publishes it.
    let (_, listen) = host_port(&format!(
        "tcp://{}",
        config["query_api"]["listen"].as_str().unwrap()
    ));
    assert_eq!(listen, api_port);
    let published = |svc: &str| -> Vec<u16> {
        services[svc]["ports"]
            .as_sequence()
            .map(|ps| {
                ps.iter()
                    .map(|p| {
                        p.as_str()
                            .unwrap()
                            .rsplit(':')
                            .next()
                            .unwrap()
                            .parse()
                            .unwrap()
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(
        published(&api).contains(&listen),
        "{api} publishes {listen}"
    );
    let (_, gw_port) = host_port(&format!(
        "tcp://{}",
        config["gateway"]["listen"].as_str().unwrap()
    ));

    // Each Tollgate service runs one part on the mounted configuration.
    let mut parts = std::collections::BTreeMap::<String, usize>::new();
    for (name, svc) in services {
        let Some(cmd) = svc["command"].as_sequence() else {
            continue;
        };
        let name = name.as_str().unwrap();
        let args: Vec<&str> = cmd.iter().map(|a| a.as_str().unwrap()).collect();
        if !["gateway", "collector", "query-api"].contains(&args[0]) {
            continue;
        }
        *parts.entry(args[0].to_string()).or_default() += 1;
        let cfg = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
        let mounted = compose["x-tollgate"]["volumes"][0].as_str().unwrap();
        assert!(
            mounted.ends_with(&format!(":{cfg}:ro")),
            "{name}: {cfg} vs {mounted}"
        );
        if args[0] == "gateway" {
            assert!(
                published(name).contains(&gw_port),
                "{name} publishes {gw_port}"
            );
        }
    }
    assert_eq!(parts.get("gateway"), Some(&2));
    assert_eq!(parts.get("collector"), Some(&2));
    assert_eq!(parts.get("query-api"), Some(&1));
    assert!(has("grafana"));

    // Grafana reads the same ClickHouse database.
    let ds = load("compose/grafana/provisioning/datasources/clickhouse.yaml");
    let j = &ds["datasources"][0]["jsonData"];
    assert_eq!(j["host"].as_str(), Some(ch.as_str()));
    assert_eq!(j["port"].as_u64(), Some(u64::from(ch_port)));
    assert_eq!(j["defaultDatabase"], config["store"]["database"]);

    // The dashboards Grafana is provisioned with are the repository's, mounted where the
    // provider reads them, and every panel uses that data source (the queries are checked
    // against ClickHouse by tests/grafana.rs).
    let provider = load("compose/grafana/provisioning/dashboards/tollgate.yaml");
    let path = provider["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    let mounts = compose["services"]["grafana"]["volumes"]
        .as_sequence()
        .unwrap();
    assert!(
        mounts
            .iter()
            .any(|m| m.as_str() == Some(&format!("../dashboards/grafana:{path}:ro"))),
        "grafana does not mount dashboards/grafana at {path}: {mounts:?}"
    );
    let uid = ds["datasources"][0]["uid"].as_str().unwrap();
    for entry in std::fs::read_dir(root().join("dashboards/grafana"))
        .unwrap()
        .flatten()
    {
        let d: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(entry.path()).unwrap()).unwrap();
        for panel in d["panels"].as_array().unwrap() {
            assert_eq!(panel["datasource"]["uid"].as_str(), Some(uid));
        }
    }
}
