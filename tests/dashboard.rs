//! The dashboards as a person sees them: `tollgate up --demo` runs, headless Chromium loads the
//! SRE page (`/`), the business page and the partner page (signed in with a partner's key), and
//! each must have drawn its charts and rows from the API's real data; a screenshot of each page
//! is written for a person to look at (`target/tmp/dashboards/`).

mod common;
use common::free_port;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";

fn get(url: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "5", url])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).to_string())
}

#[test]
fn dashboards_draw_charts_from_demo_traffic() {
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: install it with `apt-get install -y chromium` (scripts/test.sh does)"
    );
    let (gw, api) = (free_port(), free_port());
    let data = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["up", "--demo", "--data-dir"])
        .arg(data.path())
        .env("TOLLGATE_GATEWAY__LISTEN", format!("127.0.0.1:{gw}"))
        .env("TOLLGATE_QUERY_API__LISTEN", format!("127.0.0.1:{api}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(child);

    // Wait until demo traffic on every demo route is queryable.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body =
            get(&format!("http://127.0.0.1:{api}/v1/usage?group_by=route")).unwrap_or_default();
        if DEMO_ROUTES.iter().all(|r| body.contains(r)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "demo traffic never showed up: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Each page as a person sees it, and a screenshot of it to look at.
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboards");
    std::fs::create_dir_all(&shots).unwrap();
    let base = format!("http://127.0.0.1:{api}");

    let dom = page(&format!("{base}/"), &shots.join("sre.png"));
    for panel in ["p999", "p99", "p90", "p50", "rps", "eps"] {
        assert!(
            panel_of(&dom, panel).contains("<canvas"),
            "panel {panel} drew no chart:\n{}",
            panel_of(&dom, panel)
        );
    }
    let summary = panel_of(&dom, "summary");
    for route in DEMO_ROUTES {
        assert!(
            summary.contains(&format!("<td>{route}</td>")),
            "no summary row for {route}"
        );
    }
    assert!(
        dom.contains("updated "),
        "the page reported an error instead of data"
    );
    // The health strip reads the process's metrics: every part runs here, so each of these
    // has a value (the quota state arrived, the collector reported its lag).
    let health = panel_of(&dom, "health");
    for label in [
        "quota state age",
        "collector lag",
        "store freshness",
        "event queue",
        "events dropped",
    ] {
        let value = kpi(health, label);
        assert!(
            !value.is_empty() && value != "–" && value != "never",
            "{label}: `{value}` in {health}"
        );
    }
    let overhead = panel_of(&dom, "overhead");
    assert!(
        overhead.contains("<td>orders-get</td>"),
        "no gateway overhead for orders-get: {overhead}"
    );
    let classes = panel_of(&dom, "classes");
    assert!(
        classes.contains("<canvas") && classes.contains(">2xx<"),
        "no status class chart: {classes}"
    );

    // Business: the daily trend drawn, revenue per endpoint, plan and consumer from the demo's
    // priced partners.
    let dom = page(&format!("{base}/business"), &shots.join("business.png"));
    assert!(
        panel_of(&dom, "trend").contains("<canvas"),
        "no revenue trend"
    );
    for route in DEMO_ROUTES {
        assert!(
            panel_of(&dom, "routes").contains(&format!("data-name=\"{route}\"")),
            "no revenue bar for {route}:\n{}",
            panel_of(&dom, "routes")
        );
    }
    assert!(panel_of(&dom, "plans").contains("data-name=\"enterprise\""));
    assert!(panel_of(&dom, "consumers").contains("data-name=\"acme\""));
    assert!(
        panel_of(&dom, "kpis").contains("revenue "),
        "{}",
        panel_of(&dom, "kpis")
    );
    assert!(
        dom.contains("updated "),
        "the business page reported an error"
    );

    // Partner: signed in with acme's own key (in the URL fragment), acme's data and no one
    // else's.
    let dom = page(
        &format!("{base}/partner#key=demo-acme-key"),
        &shots.join("partner.png"),
    );
    assert!(dom.contains("signed in as <b>acme</b>"), "not signed in");
    for panel in ["trend", "latency"] {
        assert!(
            panel_of(&dom, panel).contains("<canvas"),
            "partner panel {panel} drew no chart:\n{}",
            panel_of(&dom, panel)
        );
    }
    assert!(panel_of(&dom, "routes").contains("<td>orders-get</td>"));
    for other in ["globex", "initech", "umbrella"] {
        assert!(!dom.contains(other), "the partner page shows {other}");
    }
    assert!(
        dom.contains("updated "),
        "the partner page reported an error"
    );
    // Without a key the page asks for one instead of showing anything.
    let dom = page(
        &format!("{base}/partner"),
        &shots.join("partner-signed-out.png"),
    );
    assert!(panel_of(&dom, "quota").contains("sign in with your API key"));
    eprintln!("screenshots in {}", shots.display());
}

/// With 500 routes and 10,000 consumers the pages stay bounded: charts draw the busiest
/// routes, tables and bar lists show the top ones and say how many more there are, and routes
/// are found by typing instead of scrolling a legend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_stay_bounded_with_500_routes_and_10000_consumers() {
    use futures::StreamExt;
    const ROUTES: usize = 500;
    const CONSUMERS: usize = 10_000;
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: install it with `apt-get install -y chromium` (scripts/test.sh does)"
    );
    // An upstream that answers every path at once.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, axum::Router::new().fallback(|| async { "ok" }))
            .await
            .unwrap()
    });
    let (gw, api) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let mut config = format!(
        "gateway:\n  listen: 127.0.0.1:{gw}\n  upstreams: {{ app: {{ targets: [\"http://{upstream}\"] }} }}\n  auth: {{ api_key: {{ header: x-api-key }} }}\n  routes:\n"
    );
    for r in 0..ROUTES {
        config.push_str(&format!(
            "    - {{ id: r{r}, methods: [GET], path: /r{r}, upstream: app }}\n"
        ));
    }
    config.push_str("consumers:\n");
    for c in 0..CONSUMERS {
        config.push_str(&format!(
            "  - {{ id: c{c}, plan: std, api_keys: [\"{}\"] }}\n",
            tollgate_schemas::keys::hash_key(&format!("key-{c}"))
        ));
    }
    config.push_str(&format!(
        "plans: {{ std: {{ pricing: {{ currency: USD, charges: {{ default: {{ unit_price: \"0.01\" }} }} }} }} }}\nquery_api: {{ listen: 127.0.0.1:{api} }}\n"
    ));
    let path = dir.path().join("tollgate.yaml");
    std::fs::write(&path, config).unwrap();
    let _tollgate = common::Up::start(&path, &dir.path().join("data"), &[]);
    let http = common::Http::new();
    common::wait_for_listener(gw).await;
    // One request per consumer, spread over every route.
    let statuses: Vec<u16> = futures::stream::iter(0..CONSUMERS)
        .map(|c| {
            let http = &http;
            async move {
                let key = format!("key-{c}");
                let url = format!("http://127.0.0.1:{gw}/r{}", c % ROUTES);
                http.get(&url, &[("x-api-key", &key)])
                    .await
                    .unwrap()
                    .0
                    .as_u16()
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(
        statuses.iter().all(|s| *s == 200),
        "not every request was answered"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = http
            .ok_json(
                &format!("http://127.0.0.1:{api}/v1/usage?group_by=consumer"),
                None,
            )
            .await;
        if v["rows"].as_array().unwrap().len() == CONSUMERS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every consumer's usage arrived"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboards");
    std::fs::create_dir_all(&shots).unwrap();
    let base = format!("http://127.0.0.1:{api}");
    let dom = tokio::task::block_in_place(|| {
        page(&format!("{base}/"), &shots.join("sre-500-routes.png"))
    });
    assert!(dom.contains("updated "), "the SRE page reported an error");
    let legend_entries = |panel: &str| panel.matches("u-series").count();
    for panel in ["p99", "rps"] {
        let html = panel_of(&dom, panel);
        assert!(html.contains("<canvas"), "{panel} drew no chart");
        // The time axis and the eight busiest routes, not 500 series.
        assert_eq!(legend_entries(html), 9, "{panel}: {html}");
    }
    let summary = panel_of(&dom, "summary");
    assert_eq!(summary.matches("data-route=").count(), 15, "{summary}");
    assert!(summary.contains("and 485 more routes"), "{summary}");
    assert_eq!(
        dom.matches("<option value=\"r").count(),
        ROUTES,
        "every route can be searched"
    );
    let usage = panel_of(&dom, "usage");
    assert_eq!(usage.matches("<tr>").count(), 21, "a header and the top 20");
    assert!(usage.contains("and 9980 more consumers"), "{usage}");

    let dom = tokio::task::block_in_place(|| {
        page(
            &format!("{base}/business"),
            &shots.join("business-10000-consumers.png"),
        )
    });
    assert!(
        dom.contains("updated "),
        "the business page reported an error"
    );
    let consumers = panel_of(&dom, "consumers");
    assert_eq!(
        consumers.matches("class=\"row\"").count(),
        10,
        "{consumers}"
    );
    assert!(consumers.contains("and 9990 more"), "{consumers}");
    let routes = panel_of(&dom, "routes");
    assert_eq!(routes.matches("class=\"row\"").count(), 15, "{routes}");
    assert!(routes.contains("and 485 more"), "{routes}");
}

/// The value shown above `label` in a strip of KPIs.
fn kpi(html: &str, label: &str) -> String {
    let Some(at) = html.find(&format!("<div class=\"l\">{label}</div>")) else {
        return String::new();
    };
    let before = &html[..at];
    let start = before.rfind("<div class=\"v\">").map_or(at, |i| i + 15);
    before[start..].trim_end_matches("</div>").to_string()
}

const DEMO_ROUTES: [&str; 4] = ["orders-get", "orders-list", "search", "payments"];

/// The page's DOM after its scripts ran (headless Chromium, 10 s of virtual time), and a
/// screenshot of it at `shot`.
fn page(url: &str, shot: &std::path::Path) -> String {
    let run = |extra: &[String]| {
        let profile = tempfile::tempdir().unwrap();
        let out = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--window-size=1400,1400",
                "--virtual-time-budget=10000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(url)
            .output()
            .expect("chromium runs");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    run(&[format!("--screenshot={}", shot.display())]);
    assert!(
        std::fs::metadata(shot).is_ok_and(|m| m.len() > 10_000),
        "no screenshot of {url} at {}",
        shot.display()
    );
    run(&["--dump-dom".to_string()])
}

/// The HTML of the element with id `id` up to the end of its section.
fn panel_of<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("element {id} missing"));
    let end = dom[start..]
        .find("</section>")
        .map_or(dom.len(), |e| start + e);
    &dom[start..end]
}
