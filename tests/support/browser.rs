//! Headless Chromium driven over the DevTools Protocol, for the tests of the web pages.

use std::time::{Duration, Instant};

use serde_json::Value;

/// A minimal Chrome DevTools Protocol client over a WebSocket (enough to drive one page).
pub struct Cdp {
    ws: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>,
    next: u64,
    session: Option<String>,
}

impl Cdp {
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut msg = serde_json::json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = Value::String(s.clone());
        }
        self.ws
            .send(tungstenite::Message::Text(msg.to_string().into()))
            .unwrap();
        loop {
            if let tungstenite::Message::Text(t) = self.ws.read().unwrap() {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["id"] == id {
                    assert!(v.get("error").is_none(), "{method}: {v}");
                    return v["result"].clone();
                }
            }
        }
    }

    pub fn eval(&mut self, js: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            serde_json::json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
        );
        r["result"]["value"].clone()
    }

    /// Evaluates `js` until it returns `want` (the page refreshes itself every second).
    pub fn wait_for(&mut self, js: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.eval(js);
            if got.as_str() == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "page shows {got} instead of {want}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The browser process and its profile directory (removed when dropped).
pub struct Browser(std::process::Child, #[allow(dead_code)] super::TempDir);

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts headless Chromium and opens `url`; `None` when Chromium is not installed.
pub fn open_in_chromium(url: &str) -> Option<(Browser, Cdp)> {
    use std::io::BufRead;
    let profile = super::TempDir::new("chromium");
    let child = std::process::Command::new("chromium")
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-port=0",
            "about:blank",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if std::env::var_os("CI_REQUIRE_CHROMIUM").is_some() => {
            panic!("chromium is required: {e}")
        }
        Err(e) => {
            eprintln!("chromium not installed ({e}); skipping the browser test");
            return None;
        }
    };
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(ws) = line.split_whitespace().find(|w| w.starts_with("ws://")) {
                let _ = tx.send(ws.to_string());
            }
        }
    });
    let ws_url = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("chromium printed its DevTools address");
    let browser = Browser(child, profile);
    let (ws, _) = tungstenite::connect(ws_url.as_str()).unwrap();
    let mut cdp = Cdp {
        ws,
        next: 0,
        session: None,
    };
    let target = cdp.call("Target.createTarget", serde_json::json!({"url": url}));
    let attached = cdp.call(
        "Target.attachToTarget",
        serde_json::json!({"targetId": target["targetId"], "flatten": true}),
    );
    cdp.session = attached["sessionId"].as_str().map(str::to_string);
    Some((browser, cdp))
}
