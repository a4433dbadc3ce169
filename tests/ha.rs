//! High availability end to end: a real Chat Server and two real `bgs serve` processes.
//!
//! The HA links pass through [`LinkProxy`] tasks of this test process, so tests run on a
//! multi-threaded runtime: a blocking call (a `bgs ctl` child, waiting for a SIGTERM'd node)
//! must never stall the proxies, or the nodes would see a cut link.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use serde_json::Value;
use support::{
    child_pid, messages, pair_config, repo_plugins, Answer, ChatServer, Customer, Gateway,
    LinkProxy, MockHttp,
};

/// Node a (primary) and node b (backup), each reaching the other through a proxy.
struct Pair {
    a: Gateway,
    b: Gateway,
    a_cfg: String,
    b_cfg: String,
    /// a dials b through `to_b`; b dials a through `to_a`.
    to_a: LinkProxy,
    to_b: LinkProxy,
}

async fn start_pair(chat: &ChatServer) -> Pair {
    start_pair_with(chat, "").await
}

/// A pair whose nodes both have `extra` in their configuration.
async fn start_pair_with(chat: &ChatServer, extra: &str) -> Pair {
    let (to_a, to_b) = (LinkProxy::start().await, LinkProxy::start().await);
    let a_cfg = pair_config("bgs-a", "primary", to_b.addr, "s3cret") + extra;
    let b_cfg = pair_config("bgs-b", "backup", to_a.addr, "s3cret") + extra;
    let a = Gateway::start(chat.tcp, &a_cfg);
    to_a.set_target(a.ha.unwrap());
    let b = Gateway::start(chat.tcp, &b_cfg);
    to_b.set_target(b.ha.unwrap());
    Pair {
        a,
        b,
        a_cfg,
        b_cfg,
        to_a,
        to_b,
    }
}

fn role(s: &Value) -> &str {
    s["role"].as_str().unwrap_or("")
}

async fn in_sync_backup(g: &Gateway, bots: u64) {
    g.wait_status("backup in sync", |s| {
        role(s) == "backup" && s["ha"]["in_sync"] == true && s["ha"]["replicated_bots"] == bots
    })
    .await;
}

/// Opens `n` chats with an echo bot each, and has every customer say `one`.
async fn chats<'a>(
    chat: &'a ChatServer,
    primary: &Gateway,
    prefix: &str,
    n: usize,
) -> Vec<Customer<'a>> {
    let mut customers = Vec::new();
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        let mut c = Customer::open(chat, &id).await;
        primary.start_bot(&id, &[("ChatBotID", "echo")]).await;
        c.say("one").await;
        assert_eq!(c.next_reply().await, "1: one");
        customers.push(c);
    }
    customers
}

/// Every message answered once, numbered without gaps: nothing lost, nothing twice.
async fn check_exactly_once(c: &Customer<'_>, said: &[&str]) {
    let t = c.transcript().await;
    let mut want = Vec::new();
    for (i, s) in said.iter().enumerate() {
        want.push(s.to_string());
        want.push(format!("{}: {s}", i + 1));
    }
    assert_eq!(messages(&t), want, "session {}", c.session);
}

/// A single node with `[store] kind = "local"`: it is killed with `kill -9` mid-chat, customers
/// post while it is down, and the node started again with its unchanged configuration restores
/// every bot from its disk: each answers what was posted while it was away, exactly once, and
/// its count goes on from its saved context (docs/HA.md 10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_with_a_local_store_brings_every_bot_back_after_kill_9() {
    let chat = ChatServer::start(&[]);
    let dir = support::TempDir::new("store");
    let config = format!(
        "[store]\nkind = \"local\"\npath = \"{}\"\nmax-lag-ms = 20\n",
        dir.path().join("bots.redb").display()
    );
    let mut node = Gateway::start(chat.tcp, &config);
    node.wait_status("primary", |s| role(s) == "primary").await;
    let mut customers = chats(&chat, &node, "durable", 6).await;
    node.wait_status("every save written", |s| {
        s["store"]["kind"] == "local" && s["store"]["state"] == "ok" && s["store"]["pending"] == 0
    })
    .await;
    node.kill9();
    for c in &customers {
        c.say("two").await;
    }
    let node = Gateway::start(chat.tcp, &config);
    node.wait_status("every bot restored", |s| {
        s["bots"]["echo"] == 6 && s["chat_servers"][0]["participants"] == 6
    })
    .await;
    for c in customers.iter_mut() {
        assert_eq!(c.next_reply().await, "2: two");
    }
    for c in customers.iter_mut() {
        c.say("three").await;
        assert_eq!(c.next_reply().await, "3: three");
    }
    for c in &customers {
        check_exactly_once(c, &["one", "two", "three"]).await;
    }
    assert!(
        node.log().contains("durable store opened"),
        "{}",
        node.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_after_kill_9_resumes_every_bot_with_its_context() {
    let chat = ChatServer::start(&[]);
    let mut pair = start_pair(&chat).await;
    pair.a
        .wait_status("a primary", |s| role(s) == "primary")
        .await;
    let mut customers = chats(&chat, &pair.a, "fo", 12).await;
    in_sync_backup(&pair.b, 12).await;

    pair.a.kill9();
    let killed = Instant::now();
    // Customers write during the gap.
    for c in &customers {
        c.say("two").await;
    }
    pair.b
        .wait_status("b took over", |s| {
            role(s) == "primary" && s["bots"]["echo"] == 12
        })
        .await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(5), "failover took {took:?}");
    for c in customers.iter_mut() {
        assert_eq!(
            c.next_reply().await,
            "2: two",
            "the count goes on from the saved context"
        );
        c.say("three").await;
        assert_eq!(c.next_reply().await, "3: three");
    }
    for c in &customers {
        check_exactly_once(c, &["one", "two", "three"]).await;
    }
    let st = pair.b.status().await;
    assert_eq!(st["epoch"], 2);
    assert_eq!(st["ha"]["switchovers_failover"], 1);

    // The old primary comes back: the Chat Server fences its epoch, it becomes a backup and
    // catches up by snapshot.
    let a = Gateway::start(chat.tcp, &pair.a_cfg);
    pair.to_a.set_target(a.ha.unwrap());
    in_sync_backup(&a, 12).await;
    assert!(
        a.log().contains("fenced"),
        "the old primary says it was fenced"
    );
    for c in customers.iter_mut() {
        c.say("four").await;
        assert_eq!(c.next_reply().await, "4: four");
    }
    // ESP at the backup is refused with the primary's address, and `bgs esp` follows it.
    let (status, answer) = a.esp("GetBotStatus", "fo-0", &[]).await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (503, Some("not_primary"))
    );
    assert_eq!(answer["primary"], format!("http://{}", pair.b.http));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bgs"))
        .args([
            "esp",
            "GetBotStatus",
            "-i",
            "fo-0",
            "--url",
            &format!("http://{}", a.http),
            "--url",
            &format!("http://{}", pair.b.http),
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_switchover_under_traffic_loses_nothing_and_posts_nothing_twice() {
    let chat = ChatServer::start(&[]);
    let pair = start_pair(&chat).await;
    pair.a
        .wait_status("a primary", |s| role(s) == "primary")
        .await;
    let mut customers = chats(&chat, &pair.a, "so", 8).await;
    in_sync_backup(&pair.b, 8).await;

    let words = ["one", "two", "three", "four", "five", "six"];
    for (round, word) in words.iter().enumerate().skip(1) {
        for c in &customers {
            c.say(word).await;
        }
        if round == 2 {
            // Switch over while these messages are in flight.
            let (status, report) =
                support::http(pair.a.http, "POST", "/admin/switchover", None).await;
            assert_eq!(status, 200, "{report}");
            assert_eq!(report["new_epoch"], 2);
        }
        for c in customers.iter_mut() {
            assert_eq!(c.next_reply().await, format!("{}: {word}", round + 1));
        }
    }
    for c in &customers {
        check_exactly_once(c, &words).await;
    }
    pair.b
        .wait_status("b primary", |s| role(s) == "primary" && s["epoch"] == 2)
        .await;
    in_sync_backup(&pair.a, 8).await;
    let (status, answer) = pair
        .a
        .esp(
            "StartBot",
            "so-0",
            &[("ChatBotID", "echo"), ("ChatBotName", "x")],
        )
        .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (503, Some("not_primary"))
    );
    // The operator's view, then a second switchover back with `bgs ctl`.
    let urls = format!("http://{},http://{}", pair.a.http, pair.b.http);
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_bgs"))
            .arg("ctl")
            .args(args)
            .args(["--url", &urls])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bgs ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let table = ctl(&["status"]);
    assert!(
        table.contains("bgs-a") && table.contains("backup") && table.contains("primary"),
        "{table}"
    );
    let bots: Value = serde_json::from_str(&ctl(&["bots", "--plugin", "echo", "--json"])).unwrap();
    assert_eq!(bots.as_array().unwrap().len(), 8);
    assert!(bots
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["node"] == "bgs-b"));
    let outcome: Value = serde_json::from_str(&ctl(&["switchover", "--json"])).unwrap();
    assert_eq!(outcome["new_epoch"], 3);
    assert_eq!(outcome["new_primary"], format!("http://{}", pair.a.http));
    assert!(outcome["esp_unavailable_ms"].as_u64().is_some());
    pair.a
        .wait_status("a primary again", |s| {
            role(s) == "primary" && s["epoch"] == 3
        })
        .await;
    for c in customers.iter_mut() {
        c.say("seven").await;
        assert_eq!(c.next_reply().await, "7: seven");
    }
    // Stopping the primary (SIGTERM, as systemctl stop does) hands the bots over first.
    let mut pair = pair;
    in_sync_backup(&pair.b, 8).await;
    let exit = pair.a.terminate();
    assert!(exit.success(), "{exit:?}");
    pair.b
        .wait_status("b primary after a stopped", |s| {
            role(s) == "primary" && s["epoch"] == 4
        })
        .await;
    for c in customers.iter_mut() {
        c.say("eight").await;
        assert_eq!(c.next_reply().await, "8: eight");
    }
    for c in &customers {
        check_exactly_once(
            c,
            &[
                "one", "two", "three", "four", "five", "six", "seven", "eight",
            ],
        )
        .await;
    }
    assert!(
        pair.a
            .reports()
            .iter()
            .all(|r| r["end_reason"] != "shutdown"),
        "the bots moved, they did not end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_ha_link_never_lets_two_nodes_post() {
    let chat = ChatServer::start(&[]);
    let Pair {
        a, b, to_a, to_b, ..
    } = start_pair(&chat).await;
    a.wait_status("a primary", |s| role(s) == "primary").await;
    let mut customers = chats(&chat, &a, "cut", 4).await;
    in_sync_backup(&b, 4).await;

    to_a.cut();
    to_b.cut();
    // b hears nothing, promotes, and fences a at the Chat Server; a steps down.
    b.wait_status("b promoted", |s| role(s) == "primary").await;
    a.wait_status("a stepped down", |s| role(s) == "backup")
        .await;
    for c in customers.iter_mut() {
        c.say("two").await;
        assert_eq!(c.next_reply().await, "2: two");
    }
    to_a.heal();
    to_b.heal();
    in_sync_backup(&a, 4).await;
    let (sa, sb) = (a.status().await, b.status().await);
    assert_eq!((role(&sa), role(&sb)), ("backup", "primary"));
    for c in customers.iter_mut() {
        c.say("three").await;
        assert_eq!(c.next_reply().await, "3: three");
    }
    for c in &customers {
        check_exactly_once(c, &["one", "two", "three"]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_backup_catches_up_by_snapshot_and_a_wrong_secret_is_refused() {
    let chat = ChatServer::start(&[]);
    let mut pair = start_pair(&chat).await;
    pair.a
        .wait_status("a primary", |s| role(s) == "primary")
        .await;
    let mut customers = chats(&chat, &pair.a, "snap", 5).await;
    in_sync_backup(&pair.b, 5).await;

    // The backup dies; bots start while it is away; it comes back empty.
    pair.b.kill9();
    let mut late = Customer::open(&chat, "snap-late").await;
    pair.a
        .start_bot("snap-late", &[("ChatBotID", "echo")])
        .await;
    late.say("one").await;
    assert_eq!(late.next_reply().await, "1: one");
    let b = Gateway::start(chat.tcp, &pair.b_cfg);
    pair.to_b.set_target(b.ha.unwrap());
    in_sync_backup(&b, 6).await;
    // ... and can take over.
    pair.a.kill9();
    b.wait_status("b took over", |s| {
        role(s) == "primary" && s["bots"]["echo"] == 6
    })
    .await;
    customers.push(late);
    for c in customers.iter_mut() {
        c.say("two").await;
        assert_eq!(c.next_reply().await, "2: two");
    }

    // A node with the wrong secret is refused and says so.
    let to_b_again = LinkProxy::start().await;
    to_b_again.set_target(b.ha.unwrap());
    let wrong = pair_config("bgs-x", "backup", to_b_again.addr, "guess");
    let x = Gateway::start(chat.tcp, &wrong);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !b.log().contains("wrong secret") {
        assert!(
            Instant::now() < deadline,
            "the primary did not log the refusal"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // It keeps being refused and never takes over by itself (it never held a primary's state),
    // however long the "silence" lasts: many refusals span several failover-after-ms periods.
    let deadline = Instant::now() + Duration::from_secs(20);
    while x.log().matches("the HA peer refused this node").count() < 30 {
        assert!(Instant::now() < deadline, "x stopped retrying");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = x.status().await;
    assert_eq!(role(&st), "backup");
    assert_eq!(st["ha"]["in_sync"], false);
    assert_eq!(role(&b.status().await), "primary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_page_shows_both_nodes_and_switches_over() {
    let chat = ChatServer::start(&[]);
    let pair = start_pair(&chat).await;
    pair.a
        .wait_status("a primary", |s| role(s) == "primary")
        .await;
    let _customers = chats(&chat, &pair.a, "page", 2).await;
    in_sync_backup(&pair.b, 2).await;
    let url = format!("http://{}/", pair.a.http);
    tokio::task::spawn_blocking(move || {
        let Some((_browser, mut cdp)) = support::browser::open_in_chromium(&url) else {
            return;
        };
        let roles = "(document.getElementById('role-bgs-a')?.textContent || '?') + '|' + \
                     (document.getElementById('role-bgs-b')?.textContent || '?') + '|' + \
                     document.getElementById('switchover').disabled";
        // Before: a is primary, b a backup in sync, the button is enabled.
        cdp.wait_for(roles, "primary|backup|false");
        // The operator clicks and confirms.
        cdp.eval(
            "window.confirm = () => true; document.getElementById('switchover').click(); 'clicked'",
        );
        cdp.wait_for(
            "document.getElementById('result').textContent.split(':')[0]",
            "done",
        );
        // After: the roles have swapped and the change is listed.
        cdp.wait_for(roles, "backup|primary|false");
        cdp.wait_for(
            "String(document.querySelector('#changes').textContent.includes('switchover'))",
            "true",
        );
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_nodes_down_come_back_with_their_roles_from_the_state_files() {
    let chat = ChatServer::start(&[]);
    let dir = support::TempDir::new("ha-state");
    let state = |n: &str| {
        format!(
            "state-file = \"{}\"\n",
            dir.path().join(format!("{n}.json")).display()
        )
    };
    let (to_a, to_b) = (LinkProxy::start().await, LinkProxy::start().await);
    let a_cfg = pair_config("bgs-a", "primary", to_b.addr, "s3cret")
        .replace("[ha]\n", &format!("[ha]\n{}", state("a")));
    let b_cfg = pair_config("bgs-b", "backup", to_a.addr, "s3cret")
        .replace("[ha]\n", &format!("[ha]\n{}", state("b")));
    let mut a = Gateway::start(chat.tcp, &a_cfg);
    to_a.set_target(a.ha.unwrap());
    let mut b = Gateway::start(chat.tcp, &b_cfg);
    to_b.set_target(b.ha.unwrap());
    let _customers = chats(&chat, &a, "down", 2).await;
    in_sync_backup(&b, 2).await;
    let (status, _) = support::http(a.http, "POST", "/admin/switchover", None).await;
    assert_eq!(status, 200);
    in_sync_backup(&a, 2).await;

    // Both nodes go down at once, then come back as configured (a says "primary").
    a.kill9();
    b.kill9();
    let a = Gateway::start(chat.tcp, &a_cfg);
    to_a.set_target(a.ha.unwrap());
    let b = Gateway::start(chat.tcp, &b_cfg);
    to_b.set_target(b.ha.unwrap());
    // b was primary at epoch 2 when it stopped: it is again, and a follows it.
    b.wait_status("b primary again", |s| {
        role(s) == "primary" && s["epoch"] == 2
    })
    .await;
    a.wait_status("a backup in sync", |s| {
        role(s) == "backup" && s["ha"]["in_sync"] == true
    })
    .await;
    // New chats get bots (the bots of the old chats ended with both nodes).
    let mut c = Customer::open(&chat, "down-new").await;
    b.start_bot("down-new", &[("ChatBotID", "echo")]).await;
    c.say("hi").await;
    assert_eq!(c.next_reply().await, "1: hi");
}

/// The same with a local durable store on each node: both nodes are killed with `kill -9` after a
/// switchover, customers post while they are down, and when both are started again the node
/// that was primary restores every bot from its disk; each answers once, its count going on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_nodes_down_with_local_stores_lose_no_bot() {
    let chat = ChatServer::start(&[]);
    let dir = support::TempDir::new("ha-store");
    let node = |cfg: String, n: &str| {
        cfg.replace(
            "[ha]\n",
            &format!(
                "[ha]\nstate-file = \"{}\"\n",
                dir.path().join(format!("{n}.json")).display()
            ),
        ) + &format!(
            "[store]\nkind = \"local\"\npath = \"{}\"\nmax-lag-ms = 20\n",
            dir.path().join(format!("{n}.redb")).display()
        )
    };
    let (to_a, to_b) = (LinkProxy::start().await, LinkProxy::start().await);
    let a_cfg = node(pair_config("bgs-a", "primary", to_b.addr, "s3cret"), "a");
    let b_cfg = node(pair_config("bgs-b", "backup", to_a.addr, "s3cret"), "b");
    let mut a = Gateway::start(chat.tcp, &a_cfg);
    to_a.set_target(a.ha.unwrap());
    let mut b = Gateway::start(chat.tcp, &b_cfg);
    to_b.set_target(b.ha.unwrap());
    let mut customers = chats(&chat, &a, "stored", 3).await;
    in_sync_backup(&b, 3).await;
    let (status, _) = support::http(a.http, "POST", "/admin/switchover", None).await;
    assert_eq!(status, 200);
    in_sync_backup(&a, 3).await;
    for c in customers.iter_mut() {
        c.say("two").await;
        assert_eq!(c.next_reply().await, "2: two");
    }
    b.wait_status("b's store has every save", |s| {
        role(s) == "primary" && s["store"]["state"] == "ok" && s["store"]["pending"] == 0
    })
    .await;

    a.kill9();
    b.kill9();
    for c in &customers {
        c.say("three").await;
    }
    let a = Gateway::start(chat.tcp, &a_cfg);
    to_a.set_target(a.ha.unwrap());
    let b = Gateway::start(chat.tcp, &b_cfg);
    to_b.set_target(b.ha.unwrap());
    b.wait_status("b primary again with its bots", |s| {
        role(s) == "primary" && s["epoch"] == 2 && s["bots"]["echo"] == 3
    })
    .await;
    for c in customers.iter_mut() {
        assert_eq!(c.next_reply().await, "3: three");
    }
    in_sync_backup(&a, 3).await;
    for c in &customers {
        check_exactly_once(c, &["one", "two", "three"]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_restarted_before_failover_does_not_wipe_the_backup() {
    let chat = ChatServer::start(&[]);
    let mut pair = start_pair(&chat).await;
    pair.a
        .wait_status("a primary", |s| role(s) == "primary")
        .await;
    let mut customers = chats(&chat, &pair.a, "quick", 3).await;
    in_sync_backup(&pair.b, 3).await;
    // The primary crashes and is back at once (before failover-after-ms), empty, at epoch 1.
    pair.a.kill9();
    let a = Gateway::start(chat.tcp, &pair.a_cfg);
    pair.to_a.set_target(a.ha.unwrap());
    // The backup notices a new run of the primary at its epoch, keeps its bots and takes over.
    pair.b
        .wait_status("b took over with the bots", |s| {
            role(s) == "primary" && s["bots"]["echo"] == 3
        })
        .await;
    a.wait_status("a follows", |s| {
        role(s) == "backup" && s["ha"]["in_sync"] == true && s["ha"]["replicated_bots"] == 3
    })
    .await;
    for c in customers.iter_mut() {
        c.say("two").await;
        assert_eq!(c.next_reply().await, "2: two");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_mode_keeps_every_acknowledged_save_through_a_failover() {
    let chat = ChatServer::start(&[]);
    let (to_a, to_b) = (LinkProxy::start().await, LinkProxy::start().await);
    let sync = |c: String| c.replace("[ha]\n", "[ha]\nmode = \"sync\"\n");
    let mut a = Gateway::start(
        chat.tcp,
        &sync(pair_config("bgs-a", "primary", to_b.addr, "s3cret")),
    );
    to_a.set_target(a.ha.unwrap());
    let b = Gateway::start(
        chat.tcp,
        &sync(pair_config("bgs-b", "backup", to_a.addr, "s3cret")),
    );
    to_b.set_target(b.ha.unwrap());
    a.wait_status("a primary", |s| role(s) == "primary").await;
    in_sync_backup(&b, 0).await;
    let mut customers = chats(&chat, &a, "sync", 4).await;
    // In sync mode a bot takes its next input only once the backup has its save, so the backup
    // holds the count of every answered message; a second round proves it.
    for c in customers.iter_mut() {
        c.say("two").await;
        assert_eq!(c.next_reply().await, "2: two");
    }
    a.kill9();
    b.wait_status("b took over", |s| {
        role(s) == "primary" && s["bots"]["echo"] == 4
    })
    .await;
    for c in customers.iter_mut() {
        c.say("three").await;
        assert_eq!(c.next_reply().await, "3: three");
    }
    for c in &customers {
        check_exactly_once(c, &["one", "two", "three"]).await;
    }
}

/// Each external bot hears each customer message once across a kill -9 failover and a
/// switchover: stateful bots whose own state would show a replay (a webhook that counts what it
/// was sent, the SDK bot's conversation state, the process plugin's saved count).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_bots_hear_each_message_once_across_a_failover_and_a_switchover() {
    // The webhook counts every request it gets, so a replayed input shows in its answers.
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    let hook = MockHttp::start(move |req, _| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let message = req.body["message"].as_str().unwrap_or("");
        Answer::ok(json!([{ "text": format!("wh {n}: {message}") }]))
    })
    .await;
    // The Bot Framework bot too, where the SDK is installed (CI installs it).
    let sdk = support::SdkBot::start();
    let chat = ChatServer::start(&[]);
    let mut extra = format!(
        "[plugins]\ndir = \"{}\"\n[plugins.webhook.endpoints.faq]\nurl = \"{}\"\n",
        repo_plugins().display(),
        hook.url("/hook")
    );
    if let Some(bot) = &sdk {
        extra += &format!(
            "[plugins.botframework.bots.helpdesk]\nendpoint = \"{}\"\n",
            bot.endpoint()
        );
    }
    let mut pair = start_pair_with(&chat, &extra).await;
    pair.a
        .wait_status("a primary", |s| role(s) == "primary")
        .await;
    // Both nodes run the plugin process.
    child_pid(pair.b.pid(), "echo.py").await;
    let mut py = Customer::open(&chat, "ha-py").await;
    let mut wh = Customer::open(&chat, "ha-wh").await;
    let mut bf = Customer::open(&chat, "ha-bf").await;
    pair.a.start_bot("ha-py", &[("ChatBotID", "py-echo")]).await;
    let started = pair
        .a
        .start_bot("ha-wh", &[("ChatBotID", "webhook"), ("ChatBotName", "faq")])
        .await;
    if sdk.is_some() {
        pair.a
            .start_bot(
                "ha-bf",
                &[("ChatBotID", "botframework"), ("ChatBotName", "helpdesk")],
            )
            .await;
        assert_eq!(bf.next_reply().await, "bf: welcome");
    }
    let bots = if sdk.is_some() { 3 } else { 2 };
    // Several turns before the take-over: a replay from the start would show in every count.
    for word in ["one", "two"] {
        py.say(word).await;
        assert_eq!(py.next_reply().await, format!("py: {word}"));
        wh.say(word).await;
        let n = if word == "one" { 1 } else { 2 };
        assert_eq!(wh.next_reply().await, format!("wh {n}: {word}"));
        if sdk.is_some() {
            bf.say(word).await;
            assert_eq!(bf.next_reply().await, format!("bf: {word}"));
        }
    }
    in_sync_backup(&pair.b, bots).await;
    pair.a
        .wait_status("every turn acknowledged", |s| {
            s["ha"]["in_sync"] == true && s["ha"]["replication_pending"] == 0
        })
        .await;

    pair.a.kill9();
    py.say("three").await;
    wh.say("three").await;
    if sdk.is_some() {
        bf.say("three").await;
    }
    pair.b
        .wait_status("b took over", |s| role(s) == "primary")
        .await;
    assert_eq!(py.next_reply().await, "py: three");
    assert_eq!(wh.next_reply().await, "wh 3: three");
    if sdk.is_some() {
        // Same conversation, not greeted again; the answer comes through b's connector.
        assert_eq!(bf.next_reply().await, "bf: three");
    }

    // The old primary comes back as the backup; a switchover hands the bots back to it.
    let a = Gateway::start(chat.tcp, &pair.a_cfg);
    pair.to_a.set_target(a.ha.unwrap());
    in_sync_backup(&a, bots).await;
    let (status, report) = support::http(pair.b.http, "POST", "/admin/switchover", None).await;
    assert_eq!(status, 200, "{report}");
    a.wait_status("a primary again", |s| role(s) == "primary")
        .await;
    py.say("four").await;
    assert_eq!(py.next_reply().await, "py: four");
    wh.say("four").await;
    assert_eq!(wh.next_reply().await, "wh 4: four");
    if sdk.is_some() {
        bf.say("count").await;
        assert_eq!(
            bf.next_reply().await,
            "bf: seen 4 messages",
            "the SDK bot's state saw each message once"
        );
        assert_eq!(
            messages(&bf.transcript().await),
            [
                "bf: welcome",
                "one",
                "bf: one",
                "two",
                "bf: two",
                "three",
                "bf: three",
                "count",
                "bf: seen 4 messages"
            ]
        );
    }
    // The process plugin's bot was restored from its saved context, twice.
    let (status, _) = a
        .esp("SendDataToBot", "ha-py", &[("ChatBotID", "py-echo")])
        .await;
    assert_eq!(status, 200);
    assert_eq!(py.next_reply().await, "py: seen 4 messages");
    // The webhook was sent each message once, with the same sender and bot instance.
    let seen = hook.seen();
    let sent: Vec<&str> = seen
        .iter()
        .map(|s| s.body["message"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(sent, ["one", "two", "three", "four"]);
    let last = seen.last().unwrap();
    assert_eq!(last.body["sender"], seen[0].body["sender"]);
    assert_eq!(
        last.body["metadata"]["instance_id"],
        started["BotInstanceId"]
    );
    // Each answered exactly once.
    let answers = |t: &Value, prefix: &str| -> Vec<String> {
        messages(t)
            .into_iter()
            .filter(|m| m.starts_with(prefix))
            .collect()
    };
    assert_eq!(
        answers(&py.transcript().await, "py:"),
        [
            "py: one",
            "py: two",
            "py: three",
            "py: four",
            "py: seen 4 messages"
        ]
    );
    assert_eq!(
        answers(&wh.transcript().await, "wh"),
        ["wh 1: one", "wh 2: two", "wh 3: three", "wh 4: four"]
    );
}

/// Reads until the peer closes; false if it stays open for 10 s.
async fn closed_by_peer(mut s: tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    let read_all = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read_all)
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_on_the_ha_ports_neither_force_a_failover_nor_stay_connected() {
    let chat = ChatServer::start(&[]);
    let pair = start_pair(&chat).await;
    pair.a
        .wait_status("a primary", |s| role(s) == "primary")
        .await;
    let _customers = chats(&chat, &pair.a, "stranger", 2).await;
    in_sync_backup(&pair.b, 2).await;
    let epoch = pair.b.status().await["epoch"].clone();

    // A blip of the link while strangers connect to the backup's HA port: the backup refuses
    // them, dials its primary again, and catches up; it does not take over.
    pair.to_a.cut();
    let mut strangers = Vec::new();
    for _ in 0..20 {
        strangers.push(
            tokio::net::TcpStream::connect(pair.b.ha.unwrap())
                .await
                .unwrap(),
        );
    }
    pair.to_a.heal();
    in_sync_backup(&pair.b, 2).await;
    // Both ends agree the new link is up (the backup may report its old one a moment longer).
    pair.a
        .wait_status("a linked", |s| {
            s["ha"]["peer_connected"] == true && s["ha"]["in_sync"] == true
        })
        .await;
    in_sync_backup(&pair.b, 2).await;
    let st = pair.b.status().await;
    assert_eq!(role(&st), "backup");
    assert_eq!(st["epoch"], epoch);
    assert_eq!(st["ha"]["switchovers_failover"], 0);
    assert_eq!(role(&pair.a.status().await), "primary");
    for s in strangers {
        assert!(
            closed_by_peer(s).await,
            "the backup closes a stranger's connection"
        );
    }

    // Silent strangers on the primary's HA port are closed (refused while its link is up; a
    // handshake that sends no Hello is closed when its time runs out). The backup stays in sync.
    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(
            tokio::net::TcpStream::connect(pair.a.ha.unwrap())
                .await
                .unwrap(),
        );
    }
    for s in silent {
        assert!(
            closed_by_peer(s).await,
            "the primary closes a silent connection"
        );
    }
    let st = pair.a.status().await;
    assert_eq!(role(&st), "primary");
    assert_eq!(st["ha"]["peer_connected"], true, "{st}\n{}", pair.a.log());
    assert_eq!(pair.b.status().await["ha"]["switchovers_failover"], 0);
}

/// A customer of the soak: its session, its participant, its bot's plugin, and what it has said
/// and seen answered.
struct SoakChat {
    session: String,
    customer: String,
    py: bool,
    said: u64,
    answered: Vec<String>,
    since: u64,
}

impl SoakChat {
    fn answer_to(&self, k: u64) -> String {
        if self.py {
            format!("py: m{k}")
        } else {
            format!("{k}: m{k}")
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Fault {
    KillPrimary,
    KillBackup,
    Switchover,
    RestartChatServer,
    CutHaLink,
    KillPlugin,
}

const FAULTS: [Fault; 6] = [
    Fault::KillPrimary,
    Fault::KillBackup,
    Fault::Switchover,
    Fault::RestartChatServer,
    Fault::CutHaLink,
    Fault::KillPlugin,
];

/// The chaos soak of issue 11: a Chat Server with a journal, a pair, customers with echo and
/// py-echo (process plugin) bots under steady traffic, and a seeded scheduler that kills -9 and
/// restarts the primary and the backup, switches over, kills -9 and restarts the Chat Server,
/// cuts the HA link (a partition: the backup takes over, the old primary is fenced) and kills
/// the plugin process, one fault at a time: each customer posts during the fault and the pair
/// recovers before the next. At the end every transcript is checked: each customer message
/// answered exactly once and in order, the bot joined once and never left, no answer twice
/// (which a second epoch posting would cause).
///
/// `BGS_SOAK_FAULTS` (default 6), `BGS_SOAK_CUSTOMERS` (default 12), `BGS_SOAK_SEED` (default
/// 1). The long run (docs/RELIABILITY.md): `BGS_SOAK_FAULTS=1000 BGS_SOAK_CUSTOMERS=200 cargo
/// test --release --test ha chaos_soak -- --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_soak_loses_nothing() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (faults, customers, seed) = (
        env("BGS_SOAK_FAULTS", 6),
        env("BGS_SOAK_CUSTOMERS", 12),
        env("BGS_SOAK_SEED", 1),
    );
    let started = Instant::now();
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move |n: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n as u64) as usize
    };

    let data = support::TempDir::new("soak-chat");
    let data_dir = data.path().to_str().unwrap().to_string();
    let chat_args = ["--data-dir", data_dir.as_str(), "--detach-grace", "600"];
    let mut chat = Some(ChatServer::start(&chat_args));
    let (chat_http, chat_tcp) = {
        let c = chat.as_ref().unwrap();
        (c.http, c.tcp)
    };
    let extra = format!("[plugins]\ndir = \"{}\"\n", repo_plugins().display());
    let pair = start_pair_with(chat.as_ref().unwrap(), &extra).await;
    let Pair {
        a,
        b,
        a_cfg,
        b_cfg,
        to_a,
        to_b,
    } = pair;
    // nodes[i], its configuration, and the proxy through which the other node reaches it.
    let mut nodes = [a, b];
    let cfgs = [a_cfg, b_cfg];
    let proxies = [to_a, to_b];
    nodes[0]
        .wait_status("a primary", |s| role(s) == "primary")
        .await;
    child_pid(nodes[0].pid(), "echo.py").await;

    let mut chats = Vec::new();
    for i in 0..customers {
        let id = format!("soak-{seed}-{i}");
        let (session, customer) = chat.as_ref().unwrap().create_session(&id).await;
        let py = i % 4 == 3;
        let plugin = if py { "py-echo" } else { "echo" };
        nodes[0].start_bot(&id, &[("ChatBotID", plugin)]).await;
        chats.push(SoakChat {
            session,
            customer,
            py,
            said: 0,
            answered: Vec::new(),
            since: 0,
        });
    }
    in_sync_backup(&nodes[1], customers).await;

    let mut counts = std::collections::BTreeMap::<Fault, u64>::new();
    // Plugin kills by the primary's pid: a process plugin that exits more than 5 times in 60 s
    // is given up by design (PLUGINS.md 18), so the scheduler keeps under that.
    let mut plugin_kills: Vec<(u32, Instant)> = Vec::new();
    for round in 0..faults {
        let primary = primary_of(&nodes).await;
        let mut fault = FAULTS[next(FAULTS.len())];
        let pid = nodes[primary].pid();
        plugin_kills.retain(|(_, at)| at.elapsed() < Duration::from_secs(65));
        if fault == Fault::KillPlugin && plugin_kills.iter().filter(|(p, _)| *p == pid).count() >= 4
        {
            fault = Fault::Switchover;
        }
        *counts.entry(fault).or_default() += 1;
        let backup = 1 - primary;
        // The fault, then every customer writes while the pair recovers.
        match fault {
            Fault::KillPrimary => nodes[primary].kill9(),
            Fault::KillBackup => nodes[backup].kill9(),
            Fault::Switchover => {
                let (status, report) =
                    support::http(nodes[primary].http, "POST", "/admin/switchover", None).await;
                assert_eq!(status, 200, "round {round}: switchover: {report}");
            }
            Fault::RestartChatServer => {
                // Customers cannot post while it is down; the node's link sees the gap.
                chat.take().unwrap().kill9();
                chat = Some(ChatServer::start_at(
                    &chat_http.to_string(),
                    &chat_tcp.to_string(),
                    &chat_args,
                ));
            }
            Fault::CutHaLink => {
                proxies[0].cut();
                proxies[1].cut();
            }
            Fault::KillPlugin => {
                plugin_kills.push((pid, Instant::now()));
                support::kill9_pid(child_pid(pid, "echo.py").await);
            }
        }
        for c in chats.iter_mut() {
            c.said += 1;
            soak_say(chat_http, c, round).await;
        }
        // Recovery: killed nodes come back, a cut heals once the backup has taken over.
        match fault {
            Fault::KillPrimary => {
                nodes[backup]
                    .wait_status("the backup took over", |s| role(s) == "primary")
                    .await;
                restart_node(&mut nodes, &cfgs, &proxies, primary, chat_tcp);
            }
            Fault::KillBackup => restart_node(&mut nodes, &cfgs, &proxies, backup, chat_tcp),
            Fault::CutHaLink => {
                nodes[backup]
                    .wait_status("the backup took over", |s| role(s) == "primary")
                    .await;
                proxies[0].heal();
                proxies[1].heal();
            }
            _ => {}
        }
        let primary = primary_of(&nodes).await;
        let synced = tokio::time::timeout(
            Duration::from_secs(28),
            in_sync_backup(&nodes[1 - primary], customers),
        )
        .await;
        if synced.is_err() {
            let tail = |g: &Gateway| {
                let log = g.log();
                log.lines().rev().take(40).collect::<Vec<_>>().join("\n")
            };
            panic!(
                "round {round} ({fault:?}): no backup in sync.\nprimary (newest first):\n{}\nbackup:\n{}",
                tail(&nodes[primary]),
                tail(&nodes[1 - primary])
            );
        }
        for c in chats.iter_mut() {
            soak_wait_answered(chat_http, c, round, fault).await;
        }
        eprintln!(
            "soak round {}/{faults}: {fault:?}, {} s",
            round + 1,
            started.elapsed().as_secs()
        );
    }

    // The transcripts: exactly once, in order, one join, no leave.
    let mut messages_checked = 0;
    for c in &chats {
        let (status, t) = support::http(
            chat_http,
            "GET",
            &format!("/sessions/{}/transcript", c.session),
            None,
        )
        .await;
        assert_eq!(status, 200, "{t}");
        let events = t["events"].as_array().unwrap();
        let bot = |e: &&Value| e["style"] == "bot";
        assert_eq!(
            events
                .iter()
                .filter(bot)
                .filter(|e| e["kind"] == "joined")
                .count(),
            1,
            "{}: the bot joined once",
            c.session
        );
        assert!(
            !events.iter().filter(bot).any(|e| e["kind"] == "left"),
            "{}: the bot never left",
            c.session
        );
        let mut want = Vec::new();
        for k in 1..=c.said {
            want.push(format!("m{k}"));
            want.push(c.answer_to(k));
        }
        assert_eq!(messages(&t), want, "{}: exactly once, in order", c.session);
        messages_checked += c.said;
    }
    let took = started.elapsed();
    println!(
        "chaos soak: seed {seed}, {faults} faults {counts:?}, {customers} customers, {messages_checked} messages answered exactly once, {} s",
        took.as_secs()
    );
}

/// Which node is the primary, once one says primary and the other backup (a restarted node
/// says primary until the Chat Server fences its old epoch).
async fn primary_of(nodes: &[Gateway; 2]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut roles = Vec::new();
        for n in nodes {
            let s = support::try_http(n.http, "GET", "/status", None, None).await;
            roles.push(s.map(|(_, s)| role(&s).to_string()).unwrap_or_default());
        }
        match (roles[0].as_str(), roles[1].as_str()) {
            ("primary", "backup") => return 0,
            ("backup", "primary") => return 1,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "no primary and backup: {roles:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn restart_node(
    nodes: &mut [Gateway; 2],
    cfgs: &[String; 2],
    proxies: &[LinkProxy; 2],
    i: usize,
    chat_tcp: std::net::SocketAddr,
) {
    nodes[i].kill9();
    nodes[i] = Gateway::start(chat_tcp, &cfgs[i]);
    proxies[i].set_target(nodes[i].ha.unwrap());
}

/// The customer's next message, with a client key, until the Chat Server takes it.
async fn soak_say(chat_http: std::net::SocketAddr, c: &SoakChat, round: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = json!({"participant_id": c.customer, "text": format!("m{}", c.said), "key": format!("m{}", c.said)});
    loop {
        let path = format!("/sessions/{}/messages", c.session);
        match support::try_http(chat_http, "POST", &path, Some(body.clone()), None).await {
            Ok((200, _)) => return,
            Ok((status, v)) if status < 500 => panic!("round {round}: post refused {status}: {v}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "round {round}: cannot post");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Follows the customer's events until its last message has its answer.
async fn soak_wait_answered(
    chat_http: std::net::SocketAddr,
    c: &mut SoakChat,
    round: u64,
    fault: Fault,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while (c.answered.len() as u64) < c.said {
        assert!(
            Instant::now() < deadline,
            "round {round} ({fault:?}): {} has answers {:?} to {} messages",
            c.session,
            c.answered,
            c.said
        );
        let path = format!(
            "/sessions/{}/events?participant_id={}&since={}&wait_ms=1000",
            c.session, c.customer, c.since
        );
        let Ok((200, v)) = support::try_http(chat_http, "GET", &path, None, None).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        c.since = v["last_seq"].as_u64().unwrap_or(c.since);
        for e in v["events"].as_array().into_iter().flatten() {
            if e["kind"] == "message" && e["style"] == "bot" {
                c.answered
                    .push(e["text"].as_str().unwrap_or_default().to_string());
            }
        }
    }
    let k = c.said;
    assert_eq!(
        c.answered.last().map(String::as_str),
        Some(c.answer_to(k).as_str()),
        "round {round} ({fault:?}): {}",
        c.session
    );
}

/// TLS on every listener and link: the Chat Server's HTTP and TCP ports, each node's HTTP, ESP
/// and HA ports, the nodes' Chat Server links and the HA link. A customer chats over HTTPS, the
/// backup replicates over TLS and takes over after a kill -9; plain-text clients get nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_every_listener_and_link() {
    use support::tls_http;
    let dir = support::TempDir::new("tls");
    let (ca, cert, key) = support::tls_files(dir.path());
    let (cert_s, key_s) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let chat = ChatServer::start(&["--tls-cert", cert_s, "--tls-key", key_s]);
    let extra = format!(
        "[tls]\ncert-file = \"{}\"\nkey-file = \"{}\"\nca-file = \"{}\"\n[chat-server]\ntls = true\n",
        cert.display(),
        key.display(),
        ca.display()
    );
    let (to_a, to_b) = (LinkProxy::start().await, LinkProxy::start().await);
    let mut a = Gateway::start(
        chat.tcp,
        &(pair_config("bgs-a", "primary", to_b.addr, "s3cret") + &extra),
    );
    to_a.set_target(a.ha.unwrap());
    let b = Gateway::start(
        chat.tcp,
        &(pair_config("bgs-b", "backup", to_a.addr, "s3cret") + &extra),
    );
    to_b.set_target(b.ha.unwrap());
    let status = |g: std::net::SocketAddr| {
        let ca = ca.clone();
        async move {
            tls_http(g, &ca, "GET", "/status", None)
                .await
                .map(|(_, s)| s)
                .unwrap_or_default()
        }
    };
    let wait = |g: std::net::SocketAddr, what: &'static str, ok: fn(&Value) -> bool| async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = status(g).await;
            if ok(&s) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {s}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    wait(a.http, "a primary and connected", |s| {
        role(s) == "primary" && s["chat_servers"][0]["connected"] == true
    })
    .await;

    // A customer over HTTPS; StartBot over HTTPS.
    let (st, created) = tls_http(
        chat.http,
        &ca,
        "POST",
        "/sessions",
        Some(json!({"interaction_id": "tls-1", "nickname": "Ann"})),
    )
    .await
    .unwrap();
    assert_eq!(st, 201, "{created}");
    let (session, me) = (
        created["session_id"].as_str().unwrap().to_string(),
        created["participant_id"].as_str().unwrap().to_string(),
    );
    let esp = json!({"service": "ChatBotPlatform", "method": "StartBot",
        "parameters": {"_umsChannel": "channel-chatbot", "ChatBotID": "echo"},
        "userdata": {"InteractionId": "tls-1"}});
    let (st, answer) = tls_http(a.http, &ca, "POST", "/esp", Some(esp))
        .await
        .unwrap();
    assert_eq!(st, 200, "{answer}");
    let say = |text: &'static str| {
        let (ca, session, me) = (ca.clone(), session.clone(), me.clone());
        async move {
            let body = json!({"participant_id": me, "text": text, "key": text});
            let path = format!("/sessions/{session}/messages");
            let deadline = Instant::now() + Duration::from_secs(20);
            while !matches!(
                tls_http(chat.http, &ca, "POST", &path, Some(body.clone())).await,
                Ok((200, _))
            ) {
                assert!(Instant::now() < deadline, "cannot post {text}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let answer_to = |want: &'static str| {
        let (ca, session, me) = (ca.clone(), session.clone(), me.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let path =
                    format!("/sessions/{session}/events?participant_id={me}&since=0&wait_ms=500");
                if let Ok((200, v)) = tls_http(chat.http, &ca, "GET", &path, None).await {
                    let found = v["events"].as_array().into_iter().flatten().any(|e| {
                        e["kind"] == "message" && e["style"] == "bot" && e["text"] == want
                    });
                    if found {
                        return;
                    }
                }
                assert!(Instant::now() < deadline, "no answer {want:?}");
            }
        }
    };
    say("one").await;
    answer_to("1: one").await;

    // Replication over TLS.
    wait(b.http, "b in sync over TLS", |s| {
        role(s) == "backup" && s["ha"]["in_sync"] == true && s["ha"]["replicated_bots"] == 1
    })
    .await;

    // Framed ESP over TLS; plain text on the TLS ports gets no answer.
    let config = bgs_chat_server::tls::client_config(&ca).unwrap();
    let tcp = tokio::net::TcpStream::connect(a.esp).await.unwrap();
    let io = bgs_chat_server::tls::connect(tcp, &a.esp.to_string(), Some(&config))
        .await
        .unwrap();
    let mut framed =
        tokio_util::codec::Framed::new(
            io,
            bgs_proto::codec::FrameCodec::<
                bgs_proto::esp::EspResponse,
                bgs_proto::esp::EspClientFrame,
            >::default(),
        );
    use futures_util::{SinkExt, StreamExt};
    framed
        .send(bgs_proto::esp::EspClientFrame::Hello(
            bgs_proto::esp::EspHello {
                version: bgs_proto::esp::ESP_PROTOCOL_VERSION,
                client_name: "tls".into(),
                token: None,
            },
        ))
        .await
        .unwrap();
    let welcome = framed.next().await.unwrap().unwrap();
    assert_eq!(welcome.status, bgs_proto::esp::EspStatus::Ok, "{welcome:?}");
    for port in [a.http, a.esp, chat.http, chat.tcp] {
        let plain = support::try_http(port, "GET", "/healthz", None, None).await;
        assert!(
            !matches!(plain, Ok((200, _))),
            "{port}: plain text was answered"
        );
    }

    // The operator's tools speak HTTPS with the CA file.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bgs"))
        .args(["ctl", "status", "--json", "--url"])
        .arg(format!("https://{},https://{}", a.http, b.http))
        .env("BGS_CA_FILE", &ca)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        table.contains("primary") && table.contains("backup"),
        "{table}"
    );

    // Strangers stall TLS handshakes on both HA ports (more than there are slots); a link blip
    // then re-links the pair at once: the peer's handshake ends the oldest stalled one.
    let mut strangers = Vec::new();
    for port in [a.ha.unwrap(), b.ha.unwrap()] {
        for _ in 0..20 {
            strangers.push(tokio::net::TcpStream::connect(port).await.unwrap());
        }
    }
    let links = |g: &Gateway| g.log().matches("connected to the HA primary").count();
    let before = links(&b);
    to_a.heal();
    to_b.heal();
    let deadline = Instant::now() + Duration::from_secs(20);
    while links(&b) == before {
        assert!(Instant::now() < deadline, "b never linked again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait(b.http, "b back in sync despite the strangers", |s| {
        role(s) == "backup" && s["ha"]["in_sync"] == true && s["ha"]["replicated_bots"] == 1
    })
    .await;
    let s = status(b.http).await;
    assert_eq!(
        s["ha"]["switchovers_failover"], 0,
        "a blip became a failover: {s}"
    );
    assert_eq!(role(&status(a.http).await), "primary");
    drop(strangers);

    // A failover over TLS: the backup takes over and the bot goes on counting.
    a.kill9();
    say("two").await;
    wait(b.http, "b took over", |s| role(s) == "primary").await;
    answer_to("2: two").await;
}
