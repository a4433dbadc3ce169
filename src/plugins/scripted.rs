//! The `scripted` bot: a rule-based bot from a TOML script, good for an FAQ with a hand-off to an
//! agent. StartBot `ChatBotName` picks the script (`demo` is built in; more come from
//! `[plugins.scripted.scripts]`). docs/PLUGINS.md describes the script format.
//!
//! On start it greets; each customer message is matched against the rules in order (keywords as
//! whole words, or a regex); the first match answers, else the fallback does. A rule with
//! `handoff` writes its userdata for the workflow (plus `ChatBotHandoff = "true"`) and leaves. With
//! `max_turns`, the bot hands off after that many customer messages. Its context (turns so far)
//! survives a switchover.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use bgs_actors::bot::{Bot, BotContext, BotError, BotFactory, BotInput, CreateBot, Handoff};
use bgs_proto::chat::{EventKind, ParticipantType};
use futures_util::future::BoxFuture;
use regex::Regex;
use serde::Deserialize;

pub const DEMO_SCRIPT: &str = include_str!("demo-script.toml");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScriptFile {
    greeting: Option<String>,
    fallback: String,
    max_turns: Option<u32>,
    turn_limit: Option<String>,
    #[serde(default)]
    handoff_userdata: BTreeMap<String, String>,
    #[serde(default, rename = "rule")]
    rules: Vec<RuleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    keywords: Vec<String>,
    regex: Option<String>,
    answer: String,
    handoff: Option<BTreeMap<String, String>>,
}

#[derive(Debug)]
struct Rule {
    keywords: Vec<String>,
    regex: Option<Regex>,
    answer: String,
    handoff: Option<BTreeMap<String, String>>,
}

/// A parsed, checked script.
#[derive(Debug)]
pub struct Script {
    greeting: Option<String>,
    fallback: String,
    max_turns: Option<u32>,
    turn_limit: Option<String>,
    handoff_userdata: BTreeMap<String, String>,
    rules: Vec<Rule>,
}

impl Script {
    pub fn parse(text: &str) -> Result<Script, String> {
        let file: ScriptFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut rules = Vec::new();
        for (i, r) in file.rules.into_iter().enumerate() {
            if r.keywords.is_empty() && r.regex.is_none() {
                return Err(format!("rule {} has neither keywords nor regex", i + 1));
            }
            let regex = match r.regex {
                Some(re) => {
                    Some(Regex::new(&re).map_err(|e| format!("rule {}: bad regex: {e}", i + 1))?)
                }
                None => None,
            };
            rules.push(Rule {
                keywords: r.keywords.iter().map(|k| k.to_lowercase()).collect(),
                regex,
                answer: r.answer,
                handoff: r.handoff,
            });
        }
        if file.max_turns == Some(0) {
            return Err("max_turns must be at least 1".into());
        }
        Ok(Script {
            greeting: file.greeting,
            fallback: file.fallback,
            max_turns: file.max_turns,
            turn_limit: file.turn_limit,
            handoff_userdata: file.handoff_userdata,
            rules,
        })
    }

    fn matching(&self, text: &str) -> Option<&Rule> {
        let lower = text.to_lowercase();
        let words: Vec<&str> = lower
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .collect();
        self.rules.iter().find(|r| {
            r.keywords.iter().any(|k| {
                // Whole words for plain keywords; "e-mail" or "opening hours" as written.
                if k.contains(|c: char| !c.is_alphanumeric()) {
                    lower.contains(k.as_str())
                } else {
                    words.contains(&k.as_str())
                }
            }) || r.regex.as_ref().is_some_and(|re| re.is_match(text))
        })
    }
}

pub struct ScriptedFactory {
    scripts: BTreeMap<String, Arc<Script>>,
}

impl ScriptedFactory {
    /// The built-in `demo` script plus the configured ones (a bad script stops the start-up).
    pub fn load(files: &BTreeMap<String, PathBuf>) -> Result<ScriptedFactory, String> {
        let mut scripts = BTreeMap::new();
        let demo = Script::parse(DEMO_SCRIPT).map_err(|e| format!("built-in demo script: {e}"))?;
        scripts.insert("demo".to_string(), Arc::new(demo));
        for (name, path) in files {
            let text = std::fs::read_to_string(path).map_err(|e| {
                format!(
                    "plugins.scripted.scripts.{name}: cannot read {}: {e}",
                    path.display()
                )
            })?;
            let script = Script::parse(&text)
                .map_err(|e| format!("plugins.scripted.scripts.{name}: {}: {e}", path.display()))?;
            scripts.insert(name.clone(), Arc::new(script));
        }
        Ok(ScriptedFactory { scripts })
    }

    fn script(&self, name: &str) -> Result<Arc<Script>, BotError> {
        let name = if name.is_empty() { "demo" } else { name };
        self.scripts.get(name).cloned().ok_or_else(|| {
            let known: Vec<&str> = self.scripts.keys().map(String::as_str).collect();
            BotError::new(format!("no script {name:?} (known: {})", known.join(", ")))
        })
    }
}

impl BotFactory for ScriptedFactory {
    fn bot_id(&self) -> &str {
        "scripted"
    }

    fn check(&self, request: &CreateBot) -> Result<(), BotError> {
        self.script(&request.bot_name).map(|_| ())
    }

    fn create(&self, request: &CreateBot) -> Result<Box<dyn Bot>, BotError> {
        Ok(Box::new(ScriptedBot {
            script: self.script(&request.bot_name)?,
            turns: 0,
            done: false,
        }))
    }
}

struct ScriptedBot {
    script: Arc<Script>,
    turns: u32,
    done: bool,
}

impl ScriptedBot {
    /// Hands off with `data` as extra userdata; `reason` is `requested` (a rule asked for it)
    /// or `turn_limit`; the summary is the last customer message.
    fn hand_off(
        &mut self,
        ctx: &mut BotContext,
        data: &BTreeMap<String, String>,
        reason: &str,
        last_message: &str,
    ) {
        ctx.handoff(Handoff {
            reason: reason.into(),
            summary: format!("last customer message: {last_message}"),
            userdata: data.clone(),
            error: None,
        });
        self.done = true;
    }
}

impl Bot for ScriptedBot {
    fn handle<'a>(
        &'a mut self,
        ctx: &'a mut BotContext,
        input: BotInput,
    ) -> BoxFuture<'a, Result<(), BotError>> {
        Box::pin(async move {
            match input {
                BotInput::Start(start) => match start.restored {
                    Some(bytes) => {
                        let text = String::from_utf8(bytes)
                            .map_err(|_| BotError::new("saved context is not text"))?;
                        self.turns = text
                            .parse()
                            .map_err(|_| BotError::new("saved context is not a turn count"))?;
                    }
                    None => {
                        if let Some(g) = &self.script.greeting {
                            ctx.say(g.clone());
                        }
                    }
                },
                BotInput::Event(e)
                    if !self.done
                        && e.kind == EventKind::Message
                        && e.participant_type == ParticipantType::Customer =>
                {
                    self.turns += 1;
                    let text = e.text.unwrap_or_default();
                    let script = self.script.clone();
                    match script.matching(&text) {
                        Some(rule) => {
                            ctx.say(rule.answer.clone());
                            if let Some(data) = &rule.handoff {
                                self.hand_off(ctx, data, "requested", &text);
                            }
                        }
                        None => ctx.say(script.fallback.clone()),
                    }
                    if !self.done && script.max_turns.is_some_and(|m| self.turns >= m) {
                        if let Some(t) = &script.turn_limit {
                            ctx.say(t.clone());
                        }
                        self.hand_off(ctx, &script.handoff_userdata, "turn_limit", &text);
                    }
                    ctx.save_context(self.turns.to_string().into_bytes());
                }
                _ => {}
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_script_parses_and_matches() {
        let s = Script::parse(DEMO_SCRIPT).unwrap();
        assert!(s.matching("When are you OPEN?").is_some());
        assert!(s.matching("how much does it cost").is_some());
        assert!(s
            .matching("I want a human")
            .and_then(|r| r.handoff.as_ref())
            .is_some());
        assert!(s.matching("reopen").is_none(), "keywords match whole words");
        assert!(s.matching("qwerty").is_none());
    }

    #[test]
    fn bad_scripts_say_why() {
        assert!(
            Script::parse("fallback = \"x\"\n[[rule]]\nanswer = \"a\"\n")
                .unwrap_err()
                .contains("rule 1")
        );
        assert!(
            Script::parse("fallback = \"x\"\n[[rule]]\nregex = \"(\"\nanswer = \"a\"\n")
                .unwrap_err()
                .contains("bad regex")
        );
        assert!(
            Script::parse("greeting = \"x\"\n").is_err(),
            "fallback is required"
        );
    }
}
