//! Entry points for the cargo-fuzz targets in `fuzz/`: each feeds bytes from the fuzzer to one
//! decoder of what reaches a node from outside, the way the node itself calls it. Not an API.
//! Every function must return (a value or an error) for any input: a panic is a finding.

use bgs_actors::bot::BotContext;
use bgs_proto::chat::{ChatEvent, ClientFrame, ServerFrame};
use bgs_proto::codec::FrameCodec;
use bgs_proto::esp::{EspClientFrame, EspRequest};
use bgs_proto::ha::HaFrame;
use bytes::BytesMut;
use tokio_util::codec::Decoder;

use crate::plugins::{botframework, process, scripted, webhook};

/// Decodes frames from `bytes` until the codec wants more or fails.
fn frames<T: serde::de::DeserializeOwned>(bytes: &[u8], max: usize) -> Vec<T> {
    let mut codec = FrameCodec::<T, T>::new(max);
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        out.push(frame);
    }
    let _ = codec.decode_eof(&mut buf);
    out
}

/// Framed ESP, and each request it holds through the node's ESP checks.
pub fn esp_frames(bytes: &[u8]) {
    for frame in frames::<EspClientFrame>(bytes, 1 << 20) {
        if let EspClientFrame::Request(r) = frame {
            let _ = bgs_actors::esp::parse(&r, "ChatServer");
        }
    }
}

/// Frames to and from the Chat Server.
pub fn chat_frames(bytes: &[u8]) {
    let _ = frames::<ClientFrame>(bytes, 1 << 20);
    let _ = frames::<ServerFrame>(bytes, 1 << 20);
}

/// HA link frames.
pub fn ha_frames(bytes: &[u8]) {
    let _ = frames::<HaFrame>(bytes, 1 << 20);
}

fn ctx(plugin: &str) -> BotContext {
    let key = bgs_proto::bot::BotKey {
        interaction_id: "s".into(),
        bot_id: plugin.into(),
        bot_name: "b".into(),
    };
    BotContext::new(
        std::sync::Arc::new(bgs_proto::bot::BotSpec::new(key, "B")),
        "i".into(),
    )
}

/// The JSON forms, chosen by the first byte: ESP over HTTP, chat events, a webhook's answer,
/// a Bot Framework activity, a process plugin's line.
pub fn json_forms(bytes: &[u8]) {
    let Some((&which, rest)) = bytes.split_first() else {
        return;
    };
    match which % 5 {
        0 => {
            if let Ok(r) = serde_json::from_slice::<EspRequest>(rest) {
                let _ = bgs_actors::esp::parse(&r, "ChatServer");
            }
        }
        1 => {
            let _ = serde_json::from_slice::<ChatEvent>(rest);
        }
        2 => {
            let _ = webhook::act_on(
                &mut ctx("webhook"),
                rest,
                &mut crate::plugins::connector::Choices::default(),
            );
        }
        3 => {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(rest) {
                let _ = botframework::act_on(
                    &mut ctx("botframework"),
                    &v,
                    &mut crate::plugins::connector::Choices::default(),
                );
            }
        }
        _ => {
            if let Ok(line) = std::str::from_utf8(rest) {
                let _ = serde_json::from_str::<process::FromPlugin>(line);
            }
        }
    }
}

/// Configuration texts, chosen by the first byte: the node's TOML (with its checks), a process
/// plugin's manifest, a scripted bot's script, the Chat Server's credentials file.
pub fn config(bytes: &[u8]) {
    let Some((&which, rest)) = bytes.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 4 {
        0 => {
            if let Ok(c) = crate::config::Config::from_toml(text, |_| None) {
                let _ = c.validate();
            }
        }
        1 => {
            let _ = toml::from_str::<process::Manifest>(text);
        }
        2 => {
            let _ = scripted::Script::parse(text);
        }
        _ => {
            let _ = bgs_chat_server::auth::Credentials::parse(text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Findings of the fuzz targets, kept so they cannot come back.
    #[test]
    fn past_findings_decode_to_errors() {
        // ha_frames: a bot's parameters claiming ~4 billion pairs made litemap reserve 206 GB.
        let claims_billions: &[u8] = &[
            0, 0, 0, 84, 6, 0, 0, 4, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 252, 248, 255, 255,
            255, 0, 0, 56, 0, 4, 7, 0, 38, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 84, 6, 0, 0, 4, 0, 0, 1,
            84, 6, 64, 0, 4, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 36, 0, 0, 0, 0, 0, 0, 0, 3,
            0, 0, 36, 0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0,
        ];
        assert!(frames::<HaFrame>(claims_billions, 1 << 20).is_empty());
    }

    /// The entry points run on inputs of each kind (the fuzz targets call nothing else).
    #[test]
    fn each_entry_point_takes_good_and_bad_input() {
        for input in [
            &b""[..],
            b"\x00\x00\x00\x02\x01\x07",
            b"\xff\xff\xff\xff",
            b"garbage",
        ] {
            esp_frames(input);
            chat_frames(input);
            ha_frames(input);
        }
        for kind in 0u8..5 {
            for body in [
                &b"[]"[..],
                b"{}",
                br#"[{"text":"hi","buttons":[{"title":"a"}]}]"#,
                b"\xff",
            ] {
                json_forms(&[&[kind][..], body].concat());
            }
        }
        for kind in 0u8..4 {
            for text in [
                "",
                "[node]\nid = 1",
                "gateway bgs 0123456789abcdef",
                "\u{0}",
            ] {
                config(&[&[kind][..], text.as_bytes()].concat());
            }
        }
    }
}
