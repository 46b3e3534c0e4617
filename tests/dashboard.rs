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
    assert!(
        panel_of(&dom, "classes").contains("data-name=\"2xx\""),
        "{}",
        panel_of(&dom, "classes")
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
