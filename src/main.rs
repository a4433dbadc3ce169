use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use bgs::config::Config;
use bgs::esp_client;
use bgs_proto::esp::{EspRequest, EspStatus, ESP_SERVICE};
use clap::{Args, Parser, Subcommand};

/// mimalloc, not glibc's malloc: faster under the churn of starting and dropping bots, and a
/// little smaller per bot (docs/PERFORMANCE.md 5.7). The Chat Server's binary uses it too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// bgs, the Bot Gateway Server: attaches chat bots to contact-centre chat sessions.
#[derive(Parser)]
#[command(name = "bgs", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one gateway node (defaults for every key; see docs/CONFIG.md).
    Serve {
        /// The TOML configuration file.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Log JSON lines (overrides log.json).
        #[arg(long)]
        log_json: bool,
    },
    /// Send one ESP request as a workflow would, and print the answer (exit 1 on an error answer).
    Esp(EspArgs),
    /// A Chat Server, a primary and a backup on free local ports; a customer chats with the
    /// scripted bot, the pair switches over, the bot carries on. Ctrl-C stops everything.
    Demo {
        /// Stop after the switchover instead of running until Ctrl-C (exit 0 when it worked).
        #[arg(long)]
        once: bool,
    },
    /// Run the reference Chat Server (the same as the `bgs-chat-server` binary).
    #[command(hide = true)]
    ChatServer {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Load test: starts a Chat Server and a node, drives N customers with echo bots open-loop,
    /// and prints customer-to-answer latency against a bare relay's (docs/PERFORMANCE.md).
    Bench {
        /// Chats, each with a customer and an echo bot.
        #[arg(long, default_value_t = 1000)]
        customers: usize,
        /// Customer posts per second, over all chats; 0: idle bots only (memory and StartBot).
        #[arg(long, default_value_t = 2000)]
        rate: u64,
        /// Seconds of load per phase (the gateway, then the floor).
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// TCP connections the customers are spread over.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// A short run (100 chats, 500 posts/s, 2 s) that checks the tool works.
        #[arg(long)]
        quick: bool,
        /// Also write the figures as JSON.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Run the node with a local durable store (`[store] kind = "local"`) and report its writes.
        #[arg(long)]
        store_local: bool,
    },
    /// Operate a pair: status, bots, switchover.
    Ctl {
        #[command(subcommand)]
        command: CtlCommand,
        /// The nodes' HTTP base URLs (repeat or comma-separate; default: both default ports).
        #[arg(
            long,
            global = true,
            env = "BGS_URL",
            value_delimiter = ',',
            default_value = "http://127.0.0.1:7080,http://127.0.0.1:7081"
        )]
        url: Vec<String>,
        /// The nodes' auth.token.
        #[arg(long, global = true, env = "BGS_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Role, epoch, sync state, sessions and bots of each node.
    Status,
    /// Running bots, optionally of one plugin or interaction.
    Bots {
        #[arg(long)]
        plugin: Option<String>,
        #[arg(long)]
        interaction: Option<String>,
    },
    /// Hand the primary role to the backup; waits and prints how long ESP was unavailable.
    Switchover,
}

#[derive(Args)]
struct EspArgs {
    /// StartBot, StopBot, SendDataToBot or GetBotStatus.
    method: String,
    /// A request parameter (repeatable). `_umsChannel=channel-chatbot` is added when absent.
    #[arg(long = "param", short = 'p', value_name = "K=V", value_parser = key_value)]
    params: Vec<(String, String)>,
    /// A userdata pair (repeatable).
    #[arg(long = "userdata", short = 'u', value_name = "K=V", value_parser = key_value)]
    userdata: Vec<(String, String)>,
    /// Shorthand for `--userdata InteractionId=ID`.
    #[arg(long, short = 'i', value_name = "ID")]
    interaction: Option<String>,
    /// A node's HTTP base URL; give both nodes of a pair (repeat the flag): a backup's
    /// `not_primary` answer is followed to the primary.
    #[arg(
        long,
        default_value = "http://127.0.0.1:7080",
        env = "BGS_URL",
        value_delimiter = ','
    )]
    url: Vec<String>,
    /// Use framed ESP over TCP at this address instead of HTTP.
    #[arg(long, value_name = "ADDR")]
    tcp: Option<String>,
    /// The node's auth.token.
    #[arg(long, env = "BGS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 70)]
    timeout: u64,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, log_json } => match serve(config, log_json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bgs: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Esp(args) => esp(args),
        Command::ChatServer { args } => {
            bgs_chat_server::main_from(std::iter::once("bgs-chat-server".to_string()).chain(args))
        }
        Command::Demo { once } => match bgs::demo::run(once) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bgs demo: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Ctl {
            command,
            url,
            token,
            json,
        } => ctl(command, &url, token.as_deref(), json),
        Command::Bench {
            customers,
            rate,
            duration,
            connections,
            quick,
            json,
            store_local,
        } => {
            let mut config = if quick {
                bgs::bench::BenchConfig::quick()
            } else {
                bgs::bench::BenchConfig {
                    customers,
                    rate,
                    duration: std::time::Duration::from_secs(duration),
                    connections,
                    json: None,
                    store_local: false,
                }
            };
            config.json = json;
            config.store_local = store_local;
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("bgs bench: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(bgs::bench::run(&config)) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("bgs bench: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn ctl(command: CtlCommand, urls: &[String], token: Option<&str>, json: bool) -> ExitCode {
    use bgs::ctl;
    match command {
        CtlCommand::Status => {
            let rows = ctl::status(urls, token);
            if json {
                let v: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|(u, r)| match r {
                        Ok(s) => serde_json::json!({"url": u, "status": s}),
                        Err(e) => serde_json::json!({"url": u, "error": e}),
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print!("{}", ctl::status_table(&rows));
            }
            if rows.iter().any(|(_, r)| r.is_ok()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            }
        }
        CtlCommand::Bots {
            plugin,
            interaction,
        } => match ctl::bots(urls, token, plugin.as_deref(), interaction.as_deref()) {
            Ok(bots) => {
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&bots).unwrap_or_default()
                    );
                } else {
                    print!("{}", ctl::bots_table(&bots));
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("bgs ctl bots: {e}");
                ExitCode::from(2)
            }
        },
        CtlCommand::Switchover => match ctl::switchover(urls, token) {
            Ok(outcome) => {
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&outcome).unwrap_or_default()
                    );
                } else {
                    println!(
                        "switchover done: {} -> {} (epoch {}), {} bots, drained in {} ms, ESP unavailable {} ms",
                        outcome["old_primary"].as_str().unwrap_or("?"),
                        outcome["new_primary"].as_str().unwrap_or("?"),
                        outcome["new_epoch"],
                        outcome["bots"],
                        outcome["drain_ms"],
                        outcome["esp_unavailable_ms"]
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("bgs ctl switchover: {e}");
                ExitCode::from(1)
            }
        },
    }
}

fn serve(path: Option<PathBuf>, log_json: bool) -> anyhow::Result<()> {
    let config =
        Config::load(path.as_deref(), |k| std::env::var(k).ok()).context("configuration")?;
    bgs::telemetry::init(config.log.json || log_json, &config.log.level);
    bgs::telemetry::install_panic_hook();
    let system = actix_rt::System::new();
    system.block_on(async move {
        let node = bgs::serve::start(config).await?;
        match node.ha {
            Some(ha) => println!("bgs listening http={} esp={} ha={ha}", node.http, node.esp),
            None => println!("bgs listening http={} esp={}", node.http, node.esp),
        }
        wait_for_signal().await;
        tracing::info!("shutting down");
        node.shutdown().await;
        anyhow::Ok(())
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Asks the given nodes in turn; a `not_primary` answer is followed to the primary it names.
fn over_http_following(
    urls: &[String],
    token: Option<&str>,
    request: &EspRequest,
    timeout: Duration,
) -> Result<(bool, serde_json::Value), esp_client::ClientError> {
    let mut queue: Vec<String> = urls.to_vec();
    let mut tried = Vec::new();
    let mut last = None;
    while let Some(url) = (!queue.is_empty()).then(|| queue.remove(0)) {
        if tried.contains(&url) || tried.len() >= 4 {
            continue;
        }
        tried.push(url.clone());
        match esp_client::over_http(&url, token, request, timeout) {
            Ok((false, answer)) if answer["code"] == "not_primary" => {
                if let Some(p) = answer["primary"].as_str() {
                    queue.insert(0, p.to_string());
                }
                last = Some(Ok((false, answer)));
            }
            Err(e) if !queue.is_empty() => last = Some(Err(e)),
            other => return other,
        }
    }
    last.unwrap_or_else(|| Err(esp_client::ClientError::Usage("no --url given".into())))
}

fn esp(args: EspArgs) -> ExitCode {
    let mut parameters: BTreeMap<String, String> = args.params.into_iter().collect();
    parameters
        .entry("_umsChannel".into())
        .or_insert_with(|| "channel-chatbot".into());
    let mut userdata: BTreeMap<String, String> = args.userdata.into_iter().collect();
    if let Some(i) = args.interaction {
        userdata.insert("InteractionId".into(), i);
    }
    let request = EspRequest {
        request_id: 1,
        service: ESP_SERVICE.into(),
        method: args.method,
        parameters,
        userdata,
    };
    let timeout = Duration::from_secs(args.timeout);
    let outcome = match &args.tcp {
        Some(addr) => {
            esp_client::over_tcp(addr, args.token.as_deref(), request, timeout).map(|r| {
                let ok = r.status == EspStatus::Ok;
                (ok, bgs::http::esp_json(&r).1)
            })
        }
        None => over_http_following(&args.url, args.token.as_deref(), &request, timeout),
    };
    match outcome {
        Ok((ok, answer)) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&answer).unwrap_or_default()
            );
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("bgs esp: {e}");
            ExitCode::from(2)
        }
    }
}
