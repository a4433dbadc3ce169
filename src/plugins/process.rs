//! Process plugins: bots in any language, as a child process that speaks JSON lines over its
//! stdin and stdout. `[plugins] dir` names a folder; each subfolder with a `plugin.toml` is one
//! plugin. The gateway starts one process per plugin and multiplexes all of that plugin's bot
//! instances over it. docs/PLUGINS.md section "Process plugins" specifies the protocol.
//!
//! A [`Host`] task owns the process. Bots ([`ProcessBot`]) send it their inputs and wait for the
//! plugin's `done`. A process that exits is restarted with back-off (its manifest's `restart`
//! policy, at most [`MAX_RESTARTS`] in [`RESTART_WINDOW`]); every bot it had is sent `restore`
//! with its last saved context, and the input that was in flight is sent again (same `id`), so
//! the plugin answers it once. A process that writes garbage or an overlong line, does not read
//! its input, or stops answering is killed and restarted the same way; one that floods a bot
//! with unasked-for actions gets that bot stopped. The node itself is never at stake.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bgs_actors::bot::{
    Bot, BotContext, BotError, BotFactory, BotInput, BotStart, BotWaker, CreateBot, Handoff,
};
use bgs_actors::metrics::metrics;
use bgs_proto::chat::{ChatEvent, PostKind, RichContent, UserdataChanges, Visibility};
use bgs_proto::esp::KeyValues;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

/// Longest line a plugin may write (a post with rich content, a saved context): 2 MiB.
pub const MAX_LINE: usize = 2 << 20;
/// Most actions one input may produce, and most unasked-for actions one bot may get between
/// two of its inputs (more is a flood: the bot is stopped).
pub const MAX_ACTIONS: usize = 64;
/// Lines waiting to be written to the plugin's stdin; beyond it the plugin is not reading.
const STDIN_QUEUE: usize = 4096;
/// Restarts allowed within [`RESTART_WINDOW`]; one more and the plugin is given up.
pub const MAX_RESTARTS: usize = 5;
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Inputs in a row that the plugin let time out, with no answer (`done` or `error`) to any input
/// meanwhile: it is hung, whatever else it writes (log lines do not count).
const HUNG_AFTER: u32 = 3;
/// The variables of the node's environment a plugin process gets, besides its manifest's `env`:
/// nothing else, so the node's secrets (`BGS_AUTH_TOKEN`, `BGS_HA_SECRET`, ...) stay with it.
pub const PASSED_ENV: [&str; 9] = [
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR",
];

/// When a plugin process that exited is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Whenever it exits (the default).
    Always,
    /// When it exits with a failure (not exit code 0), or is killed.
    OnFailure,
    /// Never: its bots are stopped with reason `error`.
    Never,
}

/// `plugin.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The ChatBotID.
    pub id: String,
    /// The program; a relative path with a `/` is taken from the plugin's folder.
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// The environment variables it gets, besides [`PASSED_ENV`] from the node's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Most bots of this plugin running at once on a node (StartBot beyond it: `bad_parameter`).
    #[serde(default = "default_max_instances")]
    pub max_instances: usize,
    #[serde(default = "default_restart")]
    pub restart: RestartPolicy,
}

fn default_max_instances() -> usize {
    1000
}
fn default_restart() -> RestartPolicy {
    RestartPolicy::Always
}

/// Reads every `*/plugin.toml` under `dir`, sorted by folder name.
pub fn discover(dir: &Path) -> Result<Vec<(PathBuf, Manifest)>, String> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("plugins.dir: cannot read {}: {e}", dir.display()))?;
    let mut folders: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("plugin.toml").is_file())
        .collect();
    folders.sort();
    let mut out = Vec::new();
    for folder in folders {
        let path = folder.join("plugin.toml");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("plugins.dir: cannot read {}: {e}", path.display()))?;
        let manifest: Manifest = toml::from_str(&text)
            .map_err(|e| format!("plugins.dir: {}: {}", path.display(), e.message()))?;
        if manifest.id.is_empty() || manifest.command.is_empty() {
            return Err(format!(
                "plugins.dir: {}: id and command must not be empty",
                path.display()
            ));
        }
        if manifest.max_instances == 0 {
            return Err(format!(
                "plugins.dir: {}: max_instances must be at least 1",
                path.display()
            ));
        }
        let command = program(&folder, &manifest.command);
        if !runnable(&command) {
            return Err(format!(
                "plugins.dir: {}: command {:?} is not an executable file{}",
                path.display(),
                manifest.command,
                if manifest.command.contains('/') {
                    format!(" ({})", command.display())
                } else {
                    " on the PATH".to_string()
                }
            ));
        }
        out.push((folder, manifest));
    }
    Ok(out)
}

/// The program a manifest's `command` names: a path with a `/` is taken from the plugin's folder;
/// a bare name is looked up on the PATH when the process starts.
fn program(folder: &Path, command: &str) -> PathBuf {
    if command.contains('/') {
        folder.join(command)
    } else {
        PathBuf::from(command)
    }
}

/// Whether `program` is an executable file (a bare name: one on the node's PATH).
fn runnable(program: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.components().count() > 1 || program.is_absolute() {
        return executable(program);
    }
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| executable(&dir.join(program)))
    })
}

/// Kills a plugin's whole process group when dropped: the process and any child it left
/// holding its output (after the process exited or was killed, or when the node stops).
struct ProcessGroup(Option<rustix::process::Pid>);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            // ESRCH: nothing of it is left.
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
        }
    }
}

/// What a plugin asks for while answering an input (or on its own).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum FromPlugin {
    Post {
        bot: String,
        re: Option<u64>,
        #[serde(default)]
        text: String,
        #[serde(default)]
        kind: Option<PostKind>,
        #[serde(default)]
        visibility: Option<Visibility>,
        #[serde(default)]
        rich: Option<RichContent>,
    },
    Typing {
        bot: String,
        re: Option<u64>,
    },
    Userdata {
        bot: String,
        re: Option<u64>,
        changes: UserdataChanges,
    },
    SaveContext {
        bot: String,
        re: Option<u64>,
        context: String,
    },
    Leave {
        bot: String,
        re: Option<u64>,
        #[serde(default)]
        handoff: bool,
        #[serde(default)]
        reason: Option<String>,
        #[serde(default)]
        summary: Option<String>,
        #[serde(default)]
        userdata: BTreeMap<String, String>,
    },
    Done {
        bot: String,
        re: u64,
    },
    Error {
        bot: String,
        re: u64,
        #[serde(default)]
        message: String,
    },
    Log {
        #[serde(default)]
        level: Option<String>,
        message: String,
    },
}

/// One action of a bot, as the plugin asked for it.
#[derive(Debug, Clone)]
enum PluginAction {
    Post {
        text: String,
        kind: PostKind,
        visibility: Option<Visibility>,
        rich: Option<RichContent>,
    },
    Typing,
    Userdata(UserdataChanges),
    Save(String),
    Leave(Option<Handoff>),
    /// The plugin sent more actions than a bot may have (why): the bot is handed to a person
    /// with a notice, as every bot past its limits is.
    Flooded(String),
}

impl FromPlugin {
    /// The bot, the input answered (`None`: unasked for) and the action, for action messages.
    fn into_action(self) -> Option<(String, Option<u64>, PluginAction)> {
        Some(match self {
            FromPlugin::Post {
                bot,
                re,
                text,
                kind,
                visibility,
                rich,
            } => (
                bot,
                re,
                PluginAction::Post {
                    text,
                    kind: kind.unwrap_or_default(),
                    visibility,
                    rich,
                },
            ),
            FromPlugin::Typing { bot, re } => (bot, re, PluginAction::Typing),
            FromPlugin::Userdata { bot, re, changes } => (bot, re, PluginAction::Userdata(changes)),
            FromPlugin::SaveContext { bot, re, context } => (bot, re, PluginAction::Save(context)),
            FromPlugin::Leave {
                bot,
                re,
                handoff,
                reason,
                summary,
                userdata,
            } => {
                let handoff =
                    (handoff || summary.is_some() || !userdata.is_empty()).then(|| Handoff {
                        reason: reason.unwrap_or_else(|| "requested".into()),
                        summary: summary.unwrap_or_default(),
                        userdata,
                        error: None,
                    });
                (bot, re, PluginAction::Leave(handoff))
            }
            _ => return None,
        })
    }
}

/// Applies a plugin's actions through the bot's context.
fn apply(ctx: &mut BotContext, actions: Vec<PluginAction>) {
    for action in actions {
        match action {
            PluginAction::Post {
                text,
                kind: PostKind::Message,
                visibility,
                rich,
            } => match rich.filter(|r| !r.is_empty()) {
                Some(rich) => ctx.say_rich(text, rich),
                None => ctx.say_with(text, visibility.unwrap_or(Visibility::All)),
            },
            PluginAction::Post {
                text,
                kind: PostKind::Notice,
                ..
            } => ctx.notice(text),
            PluginAction::Post {
                kind: PostKind::Typing,
                ..
            }
            | PluginAction::Typing => ctx.typing(),
            PluginAction::Userdata(changes) => ctx.set_userdata(changes),
            PluginAction::Save(context) => ctx.save_context(context.into_bytes()),
            PluginAction::Leave(Some(handoff)) => ctx.handoff(handoff),
            PluginAction::Leave(None) => ctx.leave(),
            PluginAction::Flooded(why) => {
                ctx.notice(bgs_actors::bot_limits::STOPPED_NOTICE);
                ctx.handoff(bgs_actors::bot_limits::limit_handoff(why));
                return;
            }
        }
    }
}

type Reply = oneshot::Sender<Result<Vec<PluginAction>, String>>;

/// A line to the plugin (docs/PLUGINS.md 18): one JSON object, tagged by `type`, with the `id`
/// its `done` answers. Typed, so that a line is written straight from the values (no JSON tree
/// built and patched per input).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ToPlugin {
    Start {
        id: u64,
        #[serde(flatten)]
        bot: Arc<BotInfo>,
        history: Vec<ChatEvent>,
    },
    Restore {
        id: u64,
        #[serde(flatten)]
        bot: Arc<BotInfo>,
        context: Option<String>,
    },
    Event {
        id: u64,
        bot: String,
        event: ChatEvent,
    },
    Data {
        id: u64,
        bot: String,
        data: KeyValues,
    },
    Stop {
        id: u64,
        bot: String,
        reason: &'static str,
    },
}

impl ToPlugin {
    fn set_id(&mut self, to: u64) {
        match self {
            ToPlugin::Start { id, .. }
            | ToPlugin::Restore { id, .. }
            | ToPlugin::Event { id, .. }
            | ToPlugin::Data { id, .. }
            | ToPlugin::Stop { id, .. } => *id = to,
        }
    }
}

/// Who a bot is, as its `start` and `restore` lines tell the plugin.
#[derive(Debug, serde::Serialize)]
struct BotInfo {
    bot: String,
    interaction: String,
    bot_id: String,
    bot_name: String,
    nickname: String,
    visibility: Visibility,
    parameters: KeyValues,
    userdata: KeyValues,
}

/// A bot's input as the host is given it: the line without its `id` and `bot`.
#[derive(Debug)]
enum InputLine {
    Event(ChatEvent),
    Data(KeyValues),
    Stop(&'static str),
}

enum HostCmd {
    /// A new bot: `msg` is its `start` or `restore`.
    Start {
        instance: String,
        msg: ToPlugin,
        waker: BotWaker,
        reply: Reply,
    },
    /// One input of a running bot (`event`, `data`, `stop`).
    Input {
        instance: String,
        msg: InputLine,
        reply: Reply,
    },
    /// The actions the plugin sent on its own since the bot last asked.
    TakeUnasked { instance: String, reply: Reply },
}

/// An input sent and not yet answered with `done`.
struct Pending {
    id: u64,
    msg: ToPlugin,
    /// Processes that died with this input in flight; at 2 it is given up (a poison input).
    deaths: u32,
    actions: Vec<PluginAction>,
    reply: Reply,
}

struct HostBot {
    /// Who it is: what a `restore` after a crash tells the plugin again.
    first: Arc<BotInfo>,
    /// The process has been told of this bot (its first message was written).
    announced: bool,
    /// The plugin answered the first message: a new process must be sent a `restore`.
    started: bool,
    /// The last context it saved (what a crash restore sends).
    saved: Option<String>,
    pending: Option<Pending>,
    /// The id of the `restore` sent after a crash: its answers are not the bot's to carry out.
    restoring: Option<u64>,
    unasked: Vec<PluginAction>,
    /// Unasked-for actions since the bot's last input.
    unasked_count: usize,
    /// Sent more than [`MAX_ACTIONS`] unasked-for actions between two inputs: its bot is handed
    /// to a person (`bot_limit`) and nothing more from this incarnation is carried out.
    flooded: bool,
    waker: BotWaker,
}

/// What the reader, writer and waiter tasks of one incarnation of the process tell the host.
enum ProcEvent {
    Line(String),
    Garbage(String),
    /// Its stdout reached its end.
    Closed,
    Exited(String, bool),
}

struct Running {
    incarnation: u64,
    stdin: mpsc::Sender<String>,
    kill: Option<oneshot::Sender<()>>,
}

/// The task that owns one plugin process.
struct Host {
    id: String,
    folder: PathBuf,
    manifest: Manifest,
    bots: HashMap<String, HostBot>,
    next_id: u64,
    running: Option<Running>,
    incarnation: u64,
    events_tx: mpsc::Sender<(u64, ProcEvent)>,
    restarts: VecDeque<Instant>,
    restart_at: Option<Instant>,
    /// Given up (restart policy or too many restarts): every bot call fails, and the factory
    /// refuses new bots.
    dead: Arc<std::sync::OnceLock<String>>,
    /// Inputs in a row that timed out with no line from the plugin in between.
    strikes: u32,
}

/// A plugin's factory: starts its host task; creates [`ProcessBot`]s.
pub struct ProcessFactory {
    id: String,
    max_instances: usize,
    dead: Arc<std::sync::OnceLock<String>>,
    live: Arc<AtomicUsize>,
    host: mpsc::Sender<HostCmd>,
    forget: mpsc::UnboundedSender<String>,
}

impl ProcessFactory {
    /// Starts the plugin's process (inside the current tokio runtime).
    pub fn start(folder: PathBuf, manifest: Manifest) -> ProcessFactory {
        let (host_tx, host_rx) = mpsc::channel(4096);
        let (forget_tx, forget_rx) = mpsc::unbounded_channel();
        let (events_tx, events_rx) = mpsc::channel(1024);
        let id = manifest.id.clone();
        let max_instances = manifest.max_instances;
        let dead = Arc::new(std::sync::OnceLock::new());
        let host = Host {
            id: id.clone(),
            folder,
            manifest,
            bots: HashMap::new(),
            next_id: 0,
            running: None,
            incarnation: 0,
            events_tx,
            restarts: VecDeque::new(),
            restart_at: None,
            dead: dead.clone(),
            strikes: 0,
        };
        tokio::spawn(host.run(host_rx, forget_rx, events_rx));
        ProcessFactory {
            id,
            max_instances,
            dead,
            live: Arc::new(AtomicUsize::new(0)),
            host: host_tx,
            forget: forget_tx,
        }
    }
}

impl BotFactory for ProcessFactory {
    fn bot_id(&self) -> &str {
        &self.id
    }

    fn check(&self, _request: &CreateBot) -> Result<(), BotError> {
        if let Some(why) = self.dead.get() {
            return Err(BotError::unavailable(format!(
                "plugin {} is not running: {why}",
                self.id
            )));
        }
        let live = self.live.load(Ordering::SeqCst);
        if live >= self.max_instances {
            return Err(BotError::unavailable(format!(
                "plugin {} runs {live} bots, its max_instances",
                self.id
            )));
        }
        Ok(())
    }

    fn create(&self, request: &CreateBot) -> Result<Box<dyn Bot>, BotError> {
        self.live.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(ProcessBot {
            instance: String::new(),
            bot_name: request.bot_name.clone(),
            host: self.host.clone(),
            forget: self.forget.clone(),
            live: self.live.clone(),
        }))
    }
}

/// One bot instance of a process plugin.
struct ProcessBot {
    instance: String,
    bot_name: String,
    host: mpsc::Sender<HostCmd>,
    forget: mpsc::UnboundedSender<String>,
    live: Arc<AtomicUsize>,
}

impl Drop for ProcessBot {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
        if !self.instance.is_empty() {
            let _ = self.forget.send(std::mem::take(&mut self.instance));
        }
    }
}

fn first_message(ctx: &BotContext, bot_name: &str, start: BotStart) -> ToPlugin {
    let bot = Arc::new(BotInfo {
        bot: ctx.instance_id().to_string(),
        interaction: ctx.interaction_id().to_string(),
        bot_id: ctx.bot_id().to_string(),
        bot_name: bot_name.to_string(),
        nickname: ctx.nickname().to_string(),
        visibility: ctx.visibility(),
        parameters: start.parameters,
        userdata: start.userdata,
    });
    match start.restored {
        Some(bytes) => ToPlugin::Restore {
            id: 0,
            bot,
            context: Some(String::from_utf8_lossy(&bytes).into_owned()),
        },
        None => ToPlugin::Start {
            id: 0,
            bot,
            history: start.history,
        },
    }
}

impl ProcessBot {
    async fn call(
        &self,
        cmd: HostCmd,
        rx: oneshot::Receiver<Result<Vec<PluginAction>, String>>,
    ) -> Result<Vec<PluginAction>, BotError> {
        self.host
            .send(cmd)
            .await
            .map_err(|_| BotError::new("the plugin host has stopped"))?;
        match rx.await {
            Ok(Ok(actions)) => Ok(actions),
            Ok(Err(e)) => Err(BotError::new(e)),
            Err(_) => Err(BotError::new("the plugin host dropped the input")),
        }
    }
}

impl Bot for ProcessBot {
    fn handle<'a>(
        &'a mut self,
        ctx: &'a mut BotContext,
        input: BotInput,
    ) -> BoxFuture<'a, Result<(), BotError>> {
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            let instance = ctx.instance_id().to_string();
            let cmd = match input {
                BotInput::Start(start) => {
                    self.instance = instance.clone();
                    let waker = start.waker.clone();
                    let msg = first_message(ctx, &self.bot_name, start);
                    HostCmd::Start {
                        instance,
                        msg,
                        waker,
                        reply: tx,
                    }
                }
                BotInput::Event(event) => HostCmd::Input {
                    instance,
                    msg: InputLine::Event(event),
                    reply: tx,
                },
                BotInput::Data(data) => HostCmd::Input {
                    instance,
                    msg: InputLine::Data(data),
                    reply: tx,
                },
                BotInput::Stop(reason) => HostCmd::Input {
                    instance,
                    msg: InputLine::Stop(reason.as_str()),
                    reply: tx,
                },
                BotInput::Wake => HostCmd::TakeUnasked {
                    instance,
                    reply: tx,
                },
            };
            let actions = self.call(cmd, rx).await?;
            apply(ctx, actions);
            Ok(())
        })
    }
}

impl Host {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<HostCmd>,
        mut forget: mpsc::UnboundedReceiver<String>,
        mut events: mpsc::Receiver<(u64, ProcEvent)>,
    ) {
        self.spawn();
        loop {
            let restart = self.restart_at;
            // Forgetting first: a bot dropped before another of the same instance starts (a bot
            // that moved away and back) must not remove the new one.
            tokio::select! {
                biased;
                Some(instance) = forget.recv() => self.forget(&instance),
                cmd = cmds.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                Some((incarnation, event)) = events.recv() => {
                    if self.running.as_ref().is_some_and(|r| r.incarnation == incarnation) {
                        self.event(event);
                    }
                }
                _ = async { tokio::time::sleep_until(restart.unwrap_or_else(Instant::now)).await }, if restart.is_some() => {
                    self.restart_at = None;
                    self.spawn();
                }
            }
        }
        self.kill("the node is stopping");
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Starts the process and tells it of every bot it should have.
    fn spawn(&mut self) {
        let command = program(&self.folder, &self.manifest.command);
        let passed = PASSED_ENV
            .iter()
            .filter_map(|k| std::env::var_os(k).map(|v| (*k, v)));
        let child = tokio::process::Command::new(&command)
            .args(&self.manifest.args)
            .env_clear()
            .envs(passed)
            .envs(&self.manifest.env)
            .current_dir(&self.folder)
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(plugin = %self.id, command = %command.display(), error = %e, "cannot start the plugin process");
                self.exited(format!("cannot start {}: {e}", command.display()), false);
                return;
            }
        };
        self.incarnation += 1;
        let incarnation = self.incarnation;
        let group = ProcessGroup(
            child
                .id()
                .and_then(|pid| rustix::process::Pid::from_raw(pid as i32)),
        );
        tracing::info!(plugin = %self.id, pid = child.id().unwrap_or(0), incarnation, "plugin process started");
        let (Some(mut stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return;
        };
        // Writer: lines to stdin, in order.
        let (stdin_tx, mut stdin_rx) = mpsc::channel::<String>(STDIN_QUEUE);
        tokio::spawn(async move {
            while let Some(line) = stdin_rx.recv().await {
                if stdin.write_all(line.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
        // Reader: stdout lines (bounded) to the host.
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let mut lines = FramedRead::new(stdout, LinesCodec::new_with_max_length(MAX_LINE));
            while let Some(line) = lines.next().await {
                let event = match line {
                    Ok(l) => ProcEvent::Line(l),
                    Err(LinesCodecError::MaxLineLengthExceeded) => {
                        ProcEvent::Garbage(format!("a line longer than {MAX_LINE} bytes"))
                    }
                    Err(LinesCodecError::Io(e)) => {
                        ProcEvent::Garbage(format!("unreadable output: {e}"))
                    }
                };
                let stop = matches!(event, ProcEvent::Garbage(_));
                if events.send((incarnation, event)).await.is_err() || stop {
                    return;
                }
            }
            // End of its output: it can answer nothing more, alive or not.
            let _ = events.send((incarnation, ProcEvent::Closed)).await;
        });
        // Its stderr goes to the node's log, a bounded line at a time.
        let id = self.id.clone();
        tokio::spawn(async move {
            let mut lines = FramedRead::new(stderr, LinesCodec::new_with_max_length(8192));
            while let Some(line) = lines.next().await {
                match line {
                    Ok(l) => tracing::info!(plugin = %id, stderr = %l, "plugin says"),
                    Err(LinesCodecError::MaxLineLengthExceeded) => {}
                    Err(_) => break,
                }
            }
        });
        // Waiter: the exit (or a kill asked for by the host).
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                _ = kill_rx => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            // Whatever it left behind goes with it (also when this task is dropped: node stop).
            drop(group);
            let (text, success) = match status {
                Ok(s) => (s.to_string(), s.success()),
                Err(e) => (e.to_string(), false),
            };
            let _ = events
                .send((incarnation, ProcEvent::Exited(text, success)))
                .await;
        });
        self.running = Some(Running {
            incarnation,
            stdin: stdin_tx,
            kill: Some(kill_tx),
        });
        self.strikes = 0;
        // Bots it had before a crash are restored; new ones started; inputs in flight sent again.
        let instances: Vec<String> = self.bots.keys().cloned().collect();
        for instance in instances {
            let mut lines = Vec::new();
            // A bot whose first message is still in flight gets that message again instead.
            let restore_id = {
                let Some(bot) = self.bots.get(&instance) else {
                    continue;
                };
                bot.started.then_some(())
            }
            .map(|()| self.next_id());
            let Some(bot) = self.bots.get_mut(&instance) else {
                continue;
            };
            if let Some(id) = restore_id {
                bot.restoring = Some(id);
                lines.push(ToPlugin::Restore {
                    id,
                    bot: bot.first.clone(),
                    context: bot.saved.clone(),
                });
            }
            if let Some(p) = &mut bot.pending {
                if p.deaths >= 2 {
                    if let Some(p) = bot.pending.take() {
                        let _ = p.reply.send(Err(format!(
                            "plugin {}: the process died twice while handling this input",
                            self.id
                        )));
                    }
                } else {
                    p.actions.clear();
                    lines.push(p.msg.clone());
                }
            }
            bot.announced = true;
            for line in lines {
                self.write(&line);
            }
        }
    }

    /// Writes one message to the plugin; a plugin that does not read is killed.
    fn write(&mut self, msg: &ToPlugin) {
        let Some(running) = &self.running else { return };
        // The types above always serialize.
        let mut line = serde_json::to_string(msg).unwrap_or_default();
        line.push('\n');
        match running.stdin.try_send(line) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.kill("it does not read its input"),
            // The process is gone; its exit is on the way and restarts it.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn kill(&mut self, why: &str) {
        if let Some(running) = &mut self.running {
            if let Some(kill) = running.kill.take() {
                tracing::warn!(plugin = %self.id, reason = why, "killing the plugin process");
                let _ = kill.send(());
            }
        }
    }

    fn command(&mut self, cmd: HostCmd) {
        if let Some(dead) = self.dead.get() {
            let reply = match cmd {
                HostCmd::Start { reply, .. }
                | HostCmd::Input { reply, .. }
                | HostCmd::TakeUnasked { reply, .. } => reply,
            };
            let _ = reply.send(Err(format!("plugin {} is not running: {dead}", self.id)));
            return;
        }
        match cmd {
            HostCmd::Start {
                instance,
                msg,
                waker,
                reply,
            } => {
                let id = self.next_id();
                let mut line = msg;
                line.set_id(id);
                let (first, saved) = match &line {
                    ToPlugin::Start { bot, .. } => (bot.clone(), None),
                    ToPlugin::Restore { bot, context, .. } => (bot.clone(), context.clone()),
                    other => {
                        let _ = reply.send(Err(format!("not a first message: {other:?}")));
                        return;
                    }
                };
                let running = self.running.is_some();
                self.bots.insert(
                    instance,
                    HostBot {
                        first,
                        announced: running,
                        started: false,
                        saved,
                        pending: Some(Pending {
                            id,
                            deaths: 0,
                            msg: line.clone(),
                            actions: Vec::new(),
                            reply,
                        }),
                        restoring: None,
                        unasked: Vec::new(),
                        unasked_count: 0,
                        flooded: false,
                        waker,
                    },
                );
                if running {
                    self.write(&line);
                }
            }
            HostCmd::Input {
                instance,
                msg,
                reply,
            } => {
                let id = self.next_id();
                let running = self.running.is_some();
                let Some(bot) = self.bots.get_mut(&instance) else {
                    let _ = reply.send(Err("the plugin does not know this bot".into()));
                    return;
                };
                let line = match msg {
                    InputLine::Event(event) => ToPlugin::Event {
                        id,
                        bot: instance,
                        event,
                    },
                    InputLine::Data(data) => ToPlugin::Data {
                        id,
                        bot: instance,
                        data,
                    },
                    InputLine::Stop(reason) => ToPlugin::Stop {
                        id,
                        bot: instance,
                        reason,
                    },
                };
                bot.unasked_count = 0;
                bot.pending = Some(Pending {
                    id,
                    deaths: 0,
                    msg: line.clone(),
                    actions: Vec::new(),
                    reply,
                });
                if running {
                    self.write(&line);
                }
            }
            HostCmd::TakeUnasked { instance, reply } => {
                let Some(bot) = self.bots.get_mut(&instance) else {
                    let _ = reply.send(Ok(Vec::new()));
                    return;
                };
                if bot.flooded {
                    let _ = reply.send(Ok(vec![PluginAction::Flooded(format!(
                        "plugin {} sent more than {MAX_ACTIONS} actions nobody asked for",
                        self.id
                    ))]));
                    return;
                }
                let _ = reply.send(Ok(std::mem::take(&mut bot.unasked)));
            }
        }
    }

    /// A bot was dropped (stopped, failed, timed out, or moved to the other node).
    fn forget(&mut self, instance: &str) {
        let Some(bot) = self.bots.remove(instance) else {
            return;
        };
        // Its input timed out: the plugin did not answer within the handling time.
        if bot.pending.as_ref().is_some_and(|p| p.reply.is_closed()) {
            self.strikes += 1;
            if self.strikes >= HUNG_AFTER {
                self.kill("it stopped answering");
            }
        }
        // A bot that goes without its stop: the plugin is told, with id 0 (nothing to answer).
        let note = ToPlugin::Stop {
            id: 0,
            bot: instance.to_string(),
            reason: "dropped",
        };
        self.write(&note);
    }

    fn event(&mut self, event: ProcEvent) {
        match event {
            ProcEvent::Line(line) => {
                if line.trim().is_empty() {
                    return;
                }
                match serde_json::from_str::<FromPlugin>(&line) {
                    Ok(msg) => self.message(msg),
                    Err(e) => {
                        let mut shown: String = line.chars().take(120).collect();
                        if shown.len() < line.len() {
                            shown.push_str("...");
                        }
                        tracing::warn!(plugin = %self.id, line = %shown, error = %e, "the plugin wrote garbage");
                        self.kill("it wrote garbage");
                    }
                }
            }
            ProcEvent::Garbage(why) => {
                tracing::warn!(plugin = %self.id, reason = %why, "the plugin wrote garbage");
                self.kill("it wrote garbage");
            }
            ProcEvent::Closed => self.kill("it closed its output"),
            ProcEvent::Exited(status, success) => self.exited(status, success),
        }
    }

    fn message(&mut self, msg: FromPlugin) {
        match msg {
            FromPlugin::Done { bot, re } => {
                // An answer: the plugin is alive (a log line is not enough).
                self.strikes = 0;
                let Some(b) = self.bots.get_mut(&bot) else {
                    return;
                };
                if b.pending.as_ref().is_some_and(|p| p.id == re) {
                    let Some(p) = b.pending.take() else { return };
                    for a in &p.actions {
                        if let PluginAction::Save(c) = a {
                            b.saved = Some(c.clone());
                        }
                    }
                    let stop = matches!(p.msg, ToPlugin::Stop { .. });
                    b.started = true;
                    let _ = p.reply.send(Ok(p.actions));
                    if stop {
                        self.bots.remove(&bot);
                    }
                }
            }
            FromPlugin::Error { bot, re, message } => {
                self.strikes = 0;
                let Some(b) = self.bots.get_mut(&bot) else {
                    return;
                };
                if b.pending.as_ref().is_some_and(|p| p.id == re) {
                    if let Some(p) = b.pending.take() {
                        let _ = p.reply.send(Err(format!("plugin error: {message}")));
                    }
                }
            }
            FromPlugin::Log { level, message } => match level.as_deref() {
                Some("error") | Some("warn") | Some("warning") => {
                    tracing::warn!(plugin = %self.id, "{message}")
                }
                Some("debug") => tracing::debug!(plugin = %self.id, "{message}"),
                _ => tracing::info!(plugin = %self.id, "{message}"),
            },
            other => {
                let Some((bot, re, action)) = other.into_action() else {
                    return;
                };
                let id = self.id.clone();
                let Some(b) = self.bots.get_mut(&bot) else {
                    tracing::debug!(plugin = %id, bot = %bot, "an action for a bot the plugin no longer has");
                    return;
                };
                match (&mut b.pending, re) {
                    (Some(p), Some(re)) if p.id == re => {
                        if p.actions.len() >= MAX_ACTIONS {
                            if let Some(p) = b.pending.take() {
                                let _ = p.reply.send(Ok(vec![PluginAction::Flooded(format!(
                                    "plugin {id} sent more than {MAX_ACTIONS} actions for one input"
                                ))]));
                            }
                        } else {
                            p.actions.push(action);
                        }
                    }
                    // Answers to a crash restore, or to an input given up: not carried out.
                    (_, Some(re)) if b.restoring == Some(re) => {
                        if let PluginAction::Save(c) = action {
                            b.saved = Some(c);
                        }
                    }
                    (_, Some(_)) => {}
                    (_, None) => {
                        // One wake for a batch: the bot takes everything waiting when it wakes.
                        let wake = b.unasked.is_empty() && !b.flooded;
                        b.unasked_count += 1;
                        if b.unasked_count > MAX_ACTIONS {
                            b.flooded = true;
                            b.unasked.clear();
                        } else {
                            b.unasked.push(action);
                        }
                        if wake {
                            b.waker.wake();
                        }
                    }
                }
            }
        }
    }

    /// The process ended: restart it with back-off, or give the plugin up.
    fn exited(&mut self, status: String, success: bool) {
        // An announced bot's input in flight dies with the process.
        if self.running.take().is_some() {
            for bot in self.bots.values_mut() {
                if let Some(p) = &mut bot.pending {
                    if bot.announced {
                        p.deaths += 1;
                    }
                }
            }
        }
        let now = Instant::now();
        while self
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
        {
            self.restarts.pop_front();
        }
        let restart = match self.manifest.restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !success,
            RestartPolicy::Never => false,
        };
        if restart && self.restarts.len() < MAX_RESTARTS {
            let backoff = FIRST_BACKOFF
                .saturating_mul(1 << self.restarts.len().min(16))
                .min(MAX_BACKOFF);
            tracing::warn!(plugin = %self.id, %status, bots = self.bots.len(), restart_in_ms = backoff.as_millis() as u64, "plugin process exited; restarting it");
            metrics().plugin_exits.inc(&[&self.id, "restarted"]);
            self.restarts.push_back(now);
            self.restart_at = Some(now + backoff);
            return;
        }
        let why = if restart {
            format!(
                "it exited ({status}) {} times within {} s",
                MAX_RESTARTS + 1,
                RESTART_WINDOW.as_secs()
            )
        } else {
            format!("it exited ({status}) and its restart policy says no")
        };
        tracing::error!(plugin = %self.id, reason = %why, "plugin process given up; its bots stop");
        metrics().plugin_exits.inc(&[&self.id, "given_up"]);
        for (_, bot) in self.bots.drain() {
            if let Some(p) = bot.pending {
                let _ = p
                    .reply
                    .send(Err(format!("plugin {} is not running: {why}", self.id)));
            } else {
                bot.waker.wake();
            }
        }
        let _ = self.dead.set(why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_to_plugins_keep_their_documented_shape() {
        let bot = Arc::new(BotInfo {
            bot: "inst".into(),
            interaction: "chat-1".into(),
            bot_id: "py-echo".into(),
            bot_name: String::new(),
            nickname: "Bot".into(),
            visibility: Visibility::All,
            parameters: [("lang".to_string(), "en".to_string())].into(),
            userdata: Default::default(),
        });
        let line = |m: &ToPlugin| serde_json::to_value(m).unwrap();
        assert_eq!(
            line(&ToPlugin::Restore {
                id: 4,
                bot: bot.clone(),
                context: Some("{\"n\":2}".into()),
            }),
            serde_json::json!({"type": "restore", "id": 4, "bot": "inst", "interaction": "chat-1",
                "bot_id": "py-echo", "bot_name": "", "nickname": "Bot", "visibility": "ALL",
                "parameters": {"lang": "en"}, "userdata": {}, "context": "{\"n\":2}"})
        );
        let start = line(&ToPlugin::Start {
            id: 1,
            bot,
            history: Vec::new(),
        });
        assert_eq!(
            (
                start["type"].as_str(),
                start["history"].as_array().map(Vec::len)
            ),
            (Some("start"), Some(0))
        );
        assert_eq!(
            line(&ToPlugin::Stop {
                id: 0,
                bot: "inst".into(),
                reason: "dropped",
            }),
            serde_json::json!({"type": "stop", "id": 0, "bot": "inst", "reason": "dropped"})
        );
    }

    #[test]
    fn messages_from_plugins_parse_or_are_refused() {
        let post: FromPlugin = serde_json::from_str(
            r#"{"type":"post","bot":"b","re":3,"text":"hi","rich":{"buttons":[{"title":"Yes","payload":"yes"}]}}"#,
        )
        .unwrap();
        let (bot, re, action) = post.into_action().unwrap();
        assert_eq!((bot.as_str(), re), ("b", Some(3)));
        assert!(matches!(action, PluginAction::Post { rich: Some(_), .. }));
        let leave: FromPlugin = serde_json::from_str(
            r#"{"type":"leave","bot":"b","re":4,"handoff":true,"summary":"wants a person","userdata":{"RouteTo":"x"}}"#,
        )
        .unwrap();
        let (_, _, action) = leave.into_action().unwrap();
        match action {
            PluginAction::Leave(Some(h)) => {
                assert_eq!(h.reason, "requested");
                assert_eq!(h.summary, "wants a person");
            }
            other => panic!("{other:?}"),
        }
        for garbage in [
            "not json",
            r#"{"type":"explode","bot":"b"}"#,
            r#"{"type":"done","bot":"b"}"#,
            r#"{"type":"post","bot":"b","re":1,"text":"x","extra":1}"#,
            r#"[1,2]"#,
        ] {
            assert!(
                serde_json::from_str::<FromPlugin>(garbage).is_err(),
                "{garbage}"
            );
        }
    }

    #[test]
    fn manifests_are_checked() {
        let dir = std::env::temp_dir().join(format!("bgs-plugins-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("good")).unwrap();
        std::fs::create_dir_all(dir.join("not-a-plugin")).unwrap();
        std::fs::write(
            dir.join("good/plugin.toml"),
            "id = \"good\"\ncommand = \"python3\"\nargs = [\"bot.py\"]\nrestart = \"on-failure\"\n",
        )
        .unwrap();
        let found = discover(&dir).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].1.restart, RestartPolicy::OnFailure);
        assert_eq!(found[0].1.max_instances, 1000);
        std::fs::create_dir_all(dir.join("bad")).unwrap();
        std::fs::write(
            dir.join("bad/plugin.toml"),
            "id = \"bad\"\ncommand = \"x\"\nrestart = \"sometimes\"\n",
        )
        .unwrap();
        let e = discover(&dir).unwrap_err();
        assert!(e.contains("bad/plugin.toml"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
