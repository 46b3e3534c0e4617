//! The dashboards as a person sees them: `tollgate up --demo` runs, headless Chromium loads `/`,
//! and the page must have drawn a chart per panel and a summary row per demo route from the API's
//! real data.

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
fn dashboard_draws_charts_from_demo_traffic() {
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
        if ["orders-get", "orders-list", "search", "payments"]
            .iter()
            .all(|r| body.contains(r))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "demo traffic never showed up: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

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
            "--window-size=1400,1400",
            "--virtual-time-budget=10000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("http://127.0.0.1:{api}/"))
        .output()
        .expect("chromium runs");
    let dom = String::from_utf8_lossy(&out.stdout);
    for panel in ["p99", "p90", "p50", "rps", "eps"] {
        let start = dom
            .find(&format!("id=\"{panel}\""))
            .unwrap_or_else(|| panic!("panel {panel} missing"));
        let end = dom[start..].find("</section>").map(|e| start + e).unwrap();
        assert!(
            dom[start..end].contains("<canvas"),
            "panel {panel} drew no chart:\n{}",
            &dom[start..end]
        );
    }
    let summary = &dom[dom.find("id=\"summary\"").unwrap()..];
    for route in ["orders-get", "orders-list", "search", "payments"] {
        assert!(
            summary.contains(&format!("<td>{route}</td>")),
            "no summary row for {route}"
        );
    }
    assert!(
        dom.contains("updated "),
        "the page reported an error instead of data"
    );
}
