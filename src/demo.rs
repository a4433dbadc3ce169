//! `bgs demo`: a Chat Server, a primary and a backup on free local ports, a customer chatting
//! with the scripted bot, a switchover, and the bot carrying on with its context. With `--once`
//! it stops after that (for CI); else it keeps everything running until Ctrl-C.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::esp_client::call;

const T: Duration = Duration::from_secs(30);

/// A child node, killed when dropped.
struct NodeProcess {
    name: &'static str,
    child: Child,
    http: String,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

fn start_node(
    name: &'static str,
    dir: &std::path::Path,
    config: String,
) -> Result<NodeProcess, String> {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).map_err(|e| e.to_string())?;
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(["serve", "--config"])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    let http = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http="))
        .map(|a| format!("http://{a}"))
        .ok_or_else(|| {
            format!(
                "{name} did not start; see {}",
                dir.join(format!("{name}.log")).display()
            )
        })?;
    Ok(NodeProcess { name, child, http })
}

fn get(url: &str, path: &str) -> Result<Value, String> {
    call(url, "GET", path, None, None, T)
        .map(|(_, v)| v)
        .map_err(|e| e.to_string())
}

fn post(url: &str, path: &str, body: Value) -> Result<(u16, Value), String> {
    call(url, "POST", path, Some(&body.to_string()), None, T).map_err(|e| e.to_string())
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) -> Result<Duration, String> {
    let start = Instant::now();
    while start.elapsed() < T {
        if ok() {
            return Ok(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(format!("timed out waiting: {what}"))
}

struct Chat {
    url: String,
    session: String,
    me: String,
    since: u64,
}

impl Chat {
    /// The customer says something and waits for the bot's answer; prints both.
    fn ask(&mut self, text: &str) -> Result<String, String> {
        println!("  Ann:       {text}");
        let (s, v) = post(
            &self.url,
            &format!("/sessions/{}/messages", self.session),
            json!({"participant_id": self.me, "text": text}),
        )?;
        if s != 200 {
            return Err(format!("post refused: {v}"));
        }
        self.next_bot_message()
    }

    fn next_bot_message(&mut self) -> Result<String, String> {
        let start = Instant::now();
        while start.elapsed() < T {
            let v = get(
                &self.url,
                &format!(
                    "/sessions/{}/events?participant_id={}&since={}&wait_ms=5000",
                    self.session, self.me, self.since
                ),
            )?;
            self.since = v["last_seq"].as_u64().unwrap_or(self.since);
            for e in v["events"].as_array().cloned().unwrap_or_default() {
                if e["kind"] == "message" && e["participant_id"] != self.me.as_str() {
                    let text = e["text"].as_str().unwrap_or_default().to_string();
                    println!(
                        "  {:<10} {text}",
                        format!("{}:", e["nickname"].as_str().unwrap_or("bot"))
                    );
                    self.since = e["seq"].as_u64().unwrap_or(self.since);
                    return Ok(text);
                }
            }
        }
        Err("the bot did not answer".into())
    }
}

/// Runs the demo. `once`: stop after the switchover (exit 0 when everything worked).
pub fn run(once: bool) -> Result<(), String> {
    let dir: PathBuf = std::env::temp_dir().join(format!("bgs-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let stop = tokio_util::sync::CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let chat_config = <bgs_chat_server::Config as clap::Parser>::parse_from([
        "bgs-chat-server",
        "--http-listen",
        "127.0.0.1:0",
        "--tcp-listen",
        "127.0.0.1:0",
    ]);
    let chat_task = runtime.spawn(bgs_chat_server::run_ready(chat_config, stop.clone(), tx));
    let (chat_http, chat_tcp) = runtime
        .block_on(rx)
        .map_err(|_| "the Chat Server did not start".to_string())?;
    let chat_url = format!("http://{chat_http}");

    let (ha_a, ha_b) = (free_port()?, free_port()?);
    let node = |id: &str, role: &str, listen: u16, peer: u16| {
        format!(
            "[node]\nid = \"{id}\"\nrole = \"{role}\"\nhttp-listen = \"127.0.0.1:0\"\nesp-listen = \"127.0.0.1:0\"\n\
             [ha]\nlisten = \"127.0.0.1:{listen}\"\npeer = \"127.0.0.1:{peer}\"\nsecret = \"demo\"\n\
             heartbeat-interval-ms = 100\nfailover-after-ms = 1000\n[chat-server]\naddress = \"{chat_tcp}\"\n\
             [channel-chatbot]\nha-chat-reconnecting-delay = 0.5\n[log]\nlevel = \"warn\"\n[reporting]\nfile = \"{}\"\n\
             [store]\nkind = \"local\"\npath = \"{}\"\n",
            dir.join("reports.jsonl").display(),
            dir.join(format!("{id}.redb")).display()
        )
    };
    let a = start_node("bgs-a", &dir, node("bgs-a", "primary", ha_a, ha_b))?;
    let b = start_node("bgs-b", &dir, node("bgs-b", "backup", ha_b, ha_a))?;
    wait_until("bgs-b in sync with bgs-a", || {
        get(&b.http, "/status").is_ok_and(|s| s["role"] == "backup" && s["ha"]["in_sync"] == true)
    })?;

    println!("bgs demo: a Chat Server and a primary/backup pair on this machine\n");
    println!("  Chat Server (chat as a customer)  {chat_url}/");
    for n in [&a, &b] {
        println!(
            "  node {} status                {}/status   metrics {}/metrics",
            n.name, n.http, n.http
        );
    }
    println!("  logs and reports                  {}\n", dir.display());

    let interaction = format!("demo-{}", std::process::id());
    let (s, v) = post(
        &chat_url,
        "/sessions",
        json!({"interaction_id": interaction, "nickname": "Ann", "userdata": {"Topic": "demo"}}),
    )?;
    if s != 201 {
        return Err(format!("cannot open a chat: {v}"));
    }
    let mut chat = Chat {
        url: chat_url.clone(),
        session: interaction.clone(),
        me: v["participant_id"].as_str().unwrap_or_default().to_string(),
        since: 0,
    };
    println!(
        "Ann opens chat {interaction}; the workflow sends StartBot (scripted, demo) to bgs-a:"
    );
    let start = json!({"service": "ChatBotPlatform", "method": "StartBot",
        "parameters": {"ChatBotID": "scripted", "ChatBotName": "demo", "Nickname": "Assistant", "_umsChannel": "channel-chatbot"},
        "userdata": {"InteractionId": interaction}});
    let (s, v) = post(&a.http, "/esp", start)?;
    if s != 200 {
        return Err(format!("StartBot failed: {v}"));
    }
    chat.next_bot_message()?;
    chat.ask("When are you open?")?;
    chat.ask("How much does it cost?")?;

    println!("\nSwitchover: bgs-a hands the primary role to bgs-b (POST /admin/switchover):");
    let (s, v) = post(&a.http, "/admin/switchover", json!({}))?;
    if s != 200 {
        return Err(format!("switchover refused: {v}"));
    }
    let took = wait_until("bgs-b primary", || {
        get(&b.http, "/status").is_ok_and(|s| s["role"] == "primary" && s["bots"]["scripted"] == 1)
    })?;
    println!(
        "  done: epoch {}, drained in {} ms, bgs-b serving {} ms later\n",
        v["new_epoch"],
        v["drain_ms"],
        took.as_millis()
    );
    let answer = chat.ask("Do you deliver to Berlin?")?;
    let (_, st) = call(&b.http, "POST", "/esp", Some(&json!({"service": "ChatBotPlatform", "method": "GetBotStatus",
        "parameters": {"_umsChannel": "channel-chatbot"}, "userdata": {"InteractionId": interaction}}).to_string()), None, T)
        .map_err(|e| e.to_string())?;
    let served_by_b = st["result"]["bots"]
        .as_array()
        .is_some_and(|b| b.iter().any(|x| x["state"] == "running"));
    if !answer.contains("Delivery") || !served_by_b {
        return Err("the bot did not carry on after the switchover".into());
    }
    println!("\nThe bot carried on at bgs-b, restored from the context it had saved at bgs-a.");

    if once {
        println!("Stopping (--once).");
    } else {
        println!(
            "Everything keeps running: chat at {chat_url}/ and try `bgs ctl status --url {},{}`.",
            a.http, b.http
        );
        println!("Press Ctrl-C to stop.");
        runtime.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
        println!("\nStopping.");
    }
    drop(a);
    drop(b);
    stop.cancel();
    let _ = runtime.block_on(chat_task);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
