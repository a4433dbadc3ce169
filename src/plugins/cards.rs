//! Bot Framework content as the chat can show it: suggested actions, every card kind, other
//! attachments. The chat shows text, buttons (a click sends the payload as the customer's
//! message) and cards (title, subtitle, text, one image, buttons). What opens something rather
//! than answering (`openUrl`, `signin`, media, files) becomes a link line in the text, never a
//! button whose click would post the URL as the customer's message. What cannot be shown at all
//! is listed in [`Rendered::lost`], for a warning in the log. docs/PLUGINS.md section 17.

use bgs_proto::chat::{Button, Card, RichContent};
use serde_json::Value;

/// What one message activity's suggested actions and attachments become.
#[derive(Debug, Default, PartialEq)]
pub struct Rendered {
    pub rich: RichContent,
    /// Lines for the message text (links of suggested actions, files).
    pub lines: Vec<String>,
    /// What could not be shown (content types, action types), for the log.
    pub lost: Vec<String>,
}

/// One action of a card or of the suggested actions.
enum Action {
    Button(Button),
    Link(String),
    Nothing,
}

fn text(v: &Value) -> Option<String> {
    v.as_str()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// A URL the customer can follow: an inline `data:` URL (a whole image in base64) is not one;
/// it is noted as lost.
fn link(v: &Value, lost: &mut Vec<String>) -> Option<String> {
    let url = text(v)?;
    if url.starts_with("data:") {
        lost.push("an inline data: URL".into());
        return None;
    }
    // A file the bot uploaded to this channel: not kept, so nothing to link to.
    if url.contains("/bf/") && url.contains("/v3/attachments/") {
        lost.push("an uploaded attachment".into());
        return None;
    }
    Some(url)
}

fn action(a: &Value, lost: &mut Vec<String>) -> Action {
    let title = text(&a["title"]);
    let value = match &a["value"] {
        Value::String(s) => Some(s.clone()).filter(|s| !s.is_empty()),
        Value::Null => None,
        other => Some(other.to_string()),
    };
    let kind = a["type"].as_str().unwrap_or("imBack");
    match kind {
        "openUrl" | "signin" | "downloadFile" | "playAudio" | "playVideo" | "showImage"
        | "call" | "Action.OpenUrl" => {
            let url = value.or_else(|| text(&a["url"]));
            match (title, url) {
                (Some(t), Some(u)) if t != u => Action::Link(format!("{t}: {u}")),
                (_, Some(u)) => Action::Link(u),
                _ => Action::Nothing,
            }
        }
        "imBack" | "postBack" | "messageBack" | "Action.Submit" | "Action.Execute" => {
            // messageBack sends `text` (or `displayText`) as the message; the others `value`.
            let payload = if kind == "messageBack" {
                text(&a["text"])
                    .or_else(|| text(&a["displayText"]))
                    .or(value)
            } else if kind.starts_with("Action.") {
                None
            } else {
                value
            };
            match (title, payload) {
                (Some(t), Some(p)) => Action::Button(Button {
                    title: t,
                    payload: p,
                }),
                (Some(t), None) => Action::Button(Button {
                    payload: t.clone(),
                    title: t,
                }),
                (None, Some(p)) => Action::Button(Button {
                    title: p.clone(),
                    payload: p,
                }),
                (None, None) => Action::Nothing,
            }
        }
        other => {
            lost.push(format!("action {other}"));
            Action::Nothing
        }
    }
}

/// A card from its parts; the actions as buttons, or link lines at the end of its text.
fn card(
    title: Option<String>,
    subtitle: Option<String>,
    mut lines: Vec<String>,
    image_url: Option<String>,
    actions: &Value,
    lost: &mut Vec<String>,
) -> Card {
    let mut buttons = Vec::new();
    for a in actions.as_array().into_iter().flatten() {
        match action(a, lost) {
            Action::Button(b) => buttons.push(b),
            Action::Link(l) => lines.push(l),
            Action::Nothing => {}
        }
    }
    Card {
        title: title.unwrap_or_default(),
        subtitle,
        text: (!lines.is_empty()).then(|| lines.join("\n")),
        image_url,
        buttons,
    }
}

/// The text blocks, facts, first image and actions of an adaptive card's elements.
fn adaptive(
    items: &Value,
    lines: &mut Vec<String>,
    image: &mut Option<String>,
    actions: &mut Vec<Value>,
) {
    for item in items.as_array().into_iter().flatten() {
        match item["type"].as_str().unwrap_or_default() {
            "TextBlock" => lines.extend(text(&item["text"])),
            "RichTextBlock" => {
                let inline: String = item["inlines"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|i| i.as_str().or_else(|| i["text"].as_str()))
                    .collect();
                lines.extend(text(&Value::String(inline)));
            }
            "FactSet" => {
                for f in item["facts"].as_array().into_iter().flatten() {
                    let (t, v) = (text(&f["title"]), text(&f["value"]));
                    lines.push(match (t, v) {
                        (Some(t), Some(v)) => format!("{t}: {v}"),
                        (t, v) => t.or(v).unwrap_or_default(),
                    });
                }
            }
            // The first image is the card's; the others are decoration a chat cannot place.
            "Image" if image.is_none() => *image = text(&item["url"]),
            "ActionSet" => {
                actions.extend(item["actions"].as_array().into_iter().flatten().cloned())
            }
            _ => {}
        }
        for nested in ["items", "columns"] {
            adaptive(&item[nested], lines, image, actions);
        }
    }
}

/// Renders one message activity's suggested actions and attachments.
pub fn render(activity: &Value) -> Rendered {
    let mut out = Rendered::default();
    for a in activity["suggestedActions"]["actions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        match action(a, &mut out.lost) {
            Action::Button(b) => out.rich.buttons.push(b),
            Action::Link(l) => out.lines.push(l),
            Action::Nothing => {}
        }
    }
    for a in activity["attachments"].as_array().into_iter().flatten() {
        let kind = a["contentType"].as_str().unwrap_or_default();
        let c = &a["content"];
        let lost = &mut out.lost;
        let made = match kind.strip_prefix("application/vnd.microsoft.card.") {
            Some("hero" | "thumbnail") => {
                let image = link(&c["images"][0]["url"], lost);
                Some(card(
                    text(&c["title"]),
                    text(&c["subtitle"]),
                    text(&c["text"]).into_iter().collect(),
                    image,
                    &c["buttons"],
                    lost,
                ))
            }
            Some("animation" | "audio" | "video") => {
                let mut lines: Vec<String> = text(&c["text"]).into_iter().collect();
                for m in c["media"].as_array().into_iter().flatten() {
                    lines.extend(link(&m["url"], lost));
                }
                let image = link(&c["image"]["url"], lost);
                Some(card(
                    text(&c["title"]),
                    text(&c["subtitle"]),
                    lines,
                    image,
                    &c["buttons"],
                    lost,
                ))
            }
            Some("receipt") => {
                let mut lines = Vec::new();
                for item in c["items"].as_array().into_iter().flatten() {
                    let title = text(&item["title"]).unwrap_or_default();
                    let price = text(&item["price"]).unwrap_or_default();
                    let quantity = text(&item["quantity"])
                        .or_else(|| item["quantity"].as_u64().map(|n| n.to_string()));
                    lines.push(match quantity {
                        Some(q) => format!("{title} × {q}: {price}"),
                        None => format!("{title}: {price}"),
                    });
                }
                for f in c["facts"].as_array().into_iter().flatten() {
                    lines.push(format!(
                        "{}: {}",
                        text(&f["key"]).unwrap_or_default(),
                        text(&f["value"]).unwrap_or_default()
                    ));
                }
                for (name, key) in [("VAT", "vat"), ("Tax", "tax"), ("Total", "total")] {
                    if let Some(v) = text(&c[key]) {
                        lines.push(format!("{name}: {v}"));
                    }
                }
                Some(card(
                    text(&c["title"]),
                    None,
                    lines,
                    None,
                    &c["buttons"],
                    lost,
                ))
            }
            Some("signin" | "oauth") => {
                let made = card(
                    None,
                    None,
                    text(&c["text"]).into_iter().collect(),
                    None,
                    &c["buttons"],
                    lost,
                );
                if !made.text.as_deref().unwrap_or_default().contains("://") {
                    // No link to follow: the sign-in cannot be done in this chat.
                    lost.push(format!("{kind} (no sign-in link)"));
                }
                Some(made)
            }
            Some("adaptive") => {
                let (mut lines, mut image, mut actions) = (Vec::new(), None, Vec::new());
                match text(&c["fallbackText"]) {
                    Some(f) => lines.push(f),
                    None => adaptive(&c["body"], &mut lines, &mut image, &mut actions),
                }
                actions.extend(c["actions"].as_array().into_iter().flatten().cloned());
                let image = image.filter(|u| {
                    let inline = u.starts_with("data:");
                    if inline {
                        lost.push("an inline data: URL".into());
                    }
                    !inline
                });
                let made = card(None, None, lines, image, &Value::Array(actions), lost);
                if made.text.is_none() && made.image_url.is_none() && made.buttons.is_empty() {
                    lost.push(kind.to_string());
                    None
                } else {
                    Some(made)
                }
            }
            _ => {
                let url = link(&a["contentUrl"], lost);
                let name = text(&a["name"]);
                match url {
                    Some(u) if kind.starts_with("image/") => Some(Card {
                        title: name.unwrap_or_default(),
                        image_url: Some(u),
                        ..Card::default()
                    }),
                    // An inline or uploaded file: its name, at least.
                    None if a["contentUrl"].as_str().is_some() => name.map(|n| Card {
                        title: n,
                        ..Card::default()
                    }),
                    Some(u) => {
                        out.lines.push(match name {
                            Some(n) => format!("{n}: {u}"),
                            None => u,
                        });
                        None
                    }
                    None => {
                        out.lost.push(if kind.is_empty() {
                            "an attachment with no contentType".into()
                        } else {
                            kind.to_string()
                        });
                        None
                    }
                }
            }
        };
        out.rich.cards.extend(made);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn open_url_and_signin_become_links_not_buttons() {
        let r = render(&json!({"suggestedActions": {"actions": [
            {"type": "imBack", "title": "Yes", "value": "yes"},
            {"type": "openUrl", "title": "Docs", "value": "https://x/docs"},
            {"type": "messageBack", "title": "Later", "text": "later please", "value": {"a": 1}}
        ]}}));
        assert_eq!(r.rich.buttons.len(), 2);
        assert_eq!(r.rich.buttons[1].payload, "later please");
        assert_eq!(r.lines, ["Docs: https://x/docs"]);
        let r = render(
            &json!({"attachments": [{"contentType": "application/vnd.microsoft.card.signin",
            "content": {"text": "Please sign in", "buttons": [{"type": "signin", "title": "Sign in", "value": "https://login/x"}]}}]}),
        );
        let card = &r.rich.cards[0];
        assert!(card.buttons.is_empty());
        assert_eq!(
            card.text.as_deref(),
            Some("Please sign in\nSign in: https://login/x")
        );
        assert!(r.lost.is_empty());
    }

    #[test]
    fn every_card_kind_shows_something() {
        let r = render(&json!({"attachments": [
            {"contentType": "application/vnd.microsoft.card.video", "content": {"title": "Intro",
                "media": [{"url": "https://x/v.mp4"}], "image": {"url": "https://x/p.png"}}},
            {"contentType": "application/vnd.microsoft.card.receipt", "content": {"title": "John Doe",
                "items": [{"title": "Data transfer", "price": "$38.45", "quantity": 368}],
                "facts": [{"key": "Order", "value": "1234"}], "tax": "$7.50", "total": "$90.95"}},
            {"contentType": "application/vnd.microsoft.card.adaptive", "content": {"type": "AdaptiveCard",
                "body": [{"type": "TextBlock", "text": "Your flight"},
                         {"type": "ColumnSet", "columns": [{"type": "Column", "items": [{"type": "TextBlock", "text": "SFO"}]}]},
                         {"type": "FactSet", "facts": [{"title": "Seat", "value": "12A"}]}],
                "actions": [{"type": "Action.OpenUrl", "title": "Details", "url": "https://x/f"},
                            {"type": "Action.Submit", "title": "Confirm", "data": {"ok": true}}]}},
            {"contentType": "application/vnd.microsoft.card.adaptive", "content": {"fallbackText": "A card", "body": []}},
            {"contentType": "image/png", "contentUrl": "https://x/i.png", "name": "chart"},
            {"contentType": "application/pdf", "contentUrl": "https://x/a.pdf", "name": "invoice"},
            {"contentType": "application/vnd.microsoft.card.oauth", "content": {"text": "Log in", "connectionName": "c"}},
            {"contentType": "application/x-unknown", "content": {}},
            {"contentType": "image/png", "contentUrl": "data:image/png;base64,iVBORw0KGgo=", "name": "inline.png"}
        ]}));
        let cards = &r.rich.cards;
        assert_eq!(cards[0].text.as_deref(), Some("https://x/v.mp4"));
        assert_eq!(cards[0].image_url.as_deref(), Some("https://x/p.png"));
        assert_eq!(
            cards[1].text.as_deref(),
            Some("Data transfer × 368: $38.45\nOrder: 1234\nTax: $7.50\nTotal: $90.95")
        );
        assert_eq!(
            cards[2].text.as_deref(),
            Some("Your flight\nSFO\nSeat: 12A\nDetails: https://x/f")
        );
        assert_eq!(cards[2].buttons[0].payload, "Confirm");
        assert_eq!(cards[3].text.as_deref(), Some("A card"));
        assert_eq!(cards[4].image_url.as_deref(), Some("https://x/i.png"));
        assert_eq!(r.lines, ["invoice: https://x/a.pdf"]);
        assert_eq!(cards[5].text.as_deref(), Some("Log in"));
        assert_eq!(cards[6].title, "inline.png");
        assert!(cards[6].image_url.is_none(), "no base64 image in the chat");
        assert_eq!(
            r.lost,
            [
                "application/vnd.microsoft.card.oauth (no sign-in link)",
                "application/x-unknown",
                "an inline data: URL"
            ]
        );
    }
}
