//! Property tests of the codec: every value round-trips through bincode frames and JSON, a
//! stream of frames decodes the same however the bytes are split, and no bytes make a decoder
//! panic.

#![allow(clippy::unwrap_used)]

use bytes::BytesMut;
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

use crate::chat::*;
use crate::codec::{decode, encode, FrameCodec};
use crate::esp::{EspClientFrame, EspRequest};
use crate::ha::HaFrame;

fn text() -> impl Strategy<Value = String> {
    // Any Unicode, empty included, short enough to keep cases quick.
    proptest::string::string_regex(".{0,24}").unwrap()
}

fn visibility() -> impl Strategy<Value = Visibility> {
    prop_oneof![
        Just(Visibility::All),
        Just(Visibility::Int),
        Just(Visibility::Vip)
    ]
}

fn rich() -> impl Strategy<Value = RichContent> {
    let button = || (text(), text()).prop_map(|(title, payload)| Button { title, payload });
    let card = (
        text(),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::collection::vec(button(), 0..3),
    )
        .prop_map(|(title, subtitle, text, buttons)| Card {
            title,
            subtitle,
            text,
            buttons,
            ..Card::default()
        });
    (
        proptest::collection::vec(button(), 0..4),
        proptest::collection::vec(card, 0..3),
    )
        .prop_map(|(buttons, cards)| RichContent { buttons, cards })
}

fn event() -> impl Strategy<Value = ChatEvent> {
    let kind = prop_oneof![
        Just(EventKind::Joined),
        Just(EventKind::Left),
        Just(EventKind::Message),
        Just(EventKind::Notice),
        Just(EventKind::Typing),
        Just(EventKind::Userdata),
        Just(EventKind::Closed)
    ];
    let userdata = proptest::collection::btree_map(text(), proptest::option::of(text()), 0..4);
    (
        (any::<u64>(), any::<u64>(), kind, text(), visibility()),
        (
            proptest::option::of(text()),
            proptest::option::of(userdata),
            proptest::option::of(rich()),
        ),
    )
        .prop_map(
            |((seq, ts_ms, kind, who, visibility), (text, userdata, rich))| ChatEvent {
                ts_ms,
                visibility,
                text,
                userdata,
                rich,
                ..ChatEvent::new(seq, kind, &who, ParticipantType::Agent)
            },
        )
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    let post = (
        text(),
        text(),
        text(),
        visibility(),
        proptest::option::of(text()),
        proptest::option::of(rich()),
    )
        .prop_map(
            |(session_id, participant_id, text, visibility, key, rich)| {
                ChatRequest::Post(PostRequest {
                    session_id,
                    participant_id,
                    kind: PostKind::Message,
                    text,
                    visibility,
                    key,
                    rich,
                })
            },
        );
    let hello = (any::<u16>(), text(), any::<u64>(), text(), text()).prop_map(
        |(version, cluster_id, epoch, node_id, credential)| {
            ChatRequest::Hello(Hello {
                version,
                role: ClientRole::Gateway {
                    cluster_id,
                    epoch,
                    node_id,
                },
                client_name: "c".into(),
                credential: Secret::new(credential),
            })
        },
    );
    let resume =
        (text(), text(), any::<u64>()).prop_map(|(session_id, participant_id, since_seq)| {
            ChatRequest::Resume(ResumeRequest {
                session_id,
                participant_id,
                since_seq,
            })
        });
    let request = prop_oneof![post, hello, resume, Just(ChatRequest::Ping)];
    (any::<u64>(), request).prop_map(|(id, request)| ClientFrame { id, request })
}

fn esp_request() -> impl Strategy<Value = EspRequest> {
    let kv = || proptest::collection::btree_map(text(), text(), 0..5);
    (any::<u64>(), text(), text(), kv(), kv()).prop_map(
        |(request_id, service, method, parameters, userdata)| EspRequest {
            request_id,
            service,
            method,
            parameters,
            userdata,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn chat_events_round_trip_in_bincode_and_json(e in event()) {
        prop_assert_eq!(&decode::<ChatEvent>(&encode(&e).unwrap()).unwrap(), &e);
        let json = serde_json::to_string(&e).unwrap();
        prop_assert_eq!(&serde_json::from_str::<ChatEvent>(&json).unwrap(), &e);
    }

    #[test]
    fn esp_requests_round_trip_in_bincode_and_json(r in esp_request()) {
        prop_assert_eq!(&decode::<EspRequest>(&encode(&r).unwrap()).unwrap(), &r);
        let json = serde_json::to_string(&r).unwrap();
        prop_assert_eq!(&serde_json::from_str::<EspRequest>(&json).unwrap(), &r);
    }

    /// Frames written back to back decode to the same frames however the bytes arrive.
    #[test]
    fn a_frame_stream_decodes_the_same_split_anywhere(
        frames in proptest::collection::vec(client_frame(), 1..6),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let mut codec = FrameCodec::<ClientFrame, ClientFrame>::new(1 << 20);
        let mut wire = BytesMut::new();
        for f in &frames {
            codec.encode(f.clone(), &mut wire).unwrap();
        }
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
        points.push(wire.len());
        points.sort_unstable();
        let (mut buf, mut got, mut from) = (BytesMut::new(), Vec::new(), 0);
        for to in points {
            buf.extend_from_slice(&wire[from..to]);
            from = to;
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, frames);
    }

    /// Arbitrary bytes are a value or an error for every decoder, never a panic.
    #[test]
    fn no_bytes_make_a_decoder_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode::<ClientFrame>(&bytes);
        let _ = decode::<ServerFrame>(&bytes);
        let _ = decode::<EspClientFrame>(&bytes);
        let _ = decode::<HaFrame>(&bytes);
        let mut codec = FrameCodec::<HaFrame, HaFrame>::new(1 << 16);
        let mut buf = BytesMut::from(&bytes[..]);
        let _ = codec.decode(&mut buf);
    }
}
