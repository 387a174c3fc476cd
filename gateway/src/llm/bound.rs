//! The most one request can cost, decided from the request alone before it goes upstream.
//!
//! A budget is kept only if every request's reservation covers what the provider will charge
//! for it. Estimates ("four characters a token") do not: the providers count message framing
//! ("hi" is 11 tokens to one of them), and fields such as `n` multiply the output. So this module
//! computes an upper bound, and refuses (under a budget) what it cannot bound:
//!
//! - **Input** is at most the request body's length in bytes (compact JSON) plus
//!   [`REQUEST_OVERHEAD`], plus [`TOOLS_OVERHEAD`] when tools are declared. Every tokenizer the
//!   providers use (byte-level BPE) makes each token of text at least one byte; a message's
//!   framing tokens (3 or 4 per message) are fewer than the bytes of its JSON envelope
//!   (`{"role":"user","content":""}` is 28); inline images are capped by the providers' resizing
//!   at a few thousand tokens, fewer than the bytes of any encoded image that large.
//! - **Output** is at most `choices` times the per-choice cap the gateway sends upstream, where
//!   `choices` is the largest of every field that multiplies output (`n`, `best_of`), plus the
//!   bytes of a `prediction` (rejected predicted tokens are billed as output).
//! - **Unbounded**: content the provider fetches or expands where the gateway cannot see it
//!   (files and image URLs, stored responses, conversations and prompts, server-side tools,
//!   MCP servers, containers, web search). Under a token budget such a request is refused.
//!
//! Pure functions only: no I/O, no clock.

use serde_json::{Map, Value};

use crate::meter::Format;

/// Tokens a provider adds to any request beyond its bytes (reply priming, system framing).
pub const REQUEST_OVERHEAD: u64 = 16;
/// Tokens a provider adds when tools are declared: Anthropic's tool-use system prompt is up to
/// 530 tokens (Claude 3 Opus, `auto`), OpenAI's function namespace framing far less.
pub const TOOLS_OVERHEAD: u64 = 1024;
/// The largest output multiplier accepted (OpenAI's own limit for `n`).
pub const MAX_CHOICES: u64 = 128;
/// The fields that make the provider produce (and bill) several outputs for one request.
pub const MULTIPLIERS: &[&str] = &["n", "best_of"];

/// Why a request's cost cannot be bounded from the request itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unbounded {
    /// An output multiplier that is not a small positive integer.
    #[error("`{0}` must be an integer between 1 and {MAX_CHOICES}")]
    Multiplier(&'static str),
    /// Something the provider reads or runs that the gateway cannot see or count.
    #[error("{0} cannot be bounded under a token budget: the provider reads content the gateway cannot count")]
    Reference(String),
}

/// The upper bound of one request's cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    /// Input tokens, at most.
    pub input: u64,
    /// How many outputs the provider produces (each up to the per-choice cap).
    pub choices: u64,
    /// Output tokens billed beyond the per-choice caps (rejected predictions).
    pub extra_output: u64,
}

impl Bound {
    /// What a request needs at the least: its input, extra output and one token per choice.
    pub fn min_reservation(&self) -> u64 {
        self.input
            .saturating_add(self.extra_output)
            .saturating_add(self.choices)
    }

    /// What a request needs to be given `per_choice` output tokens for each choice.
    pub fn reservation_for(&self, per_choice: u64) -> u64 {
        self.input
            .saturating_add(self.extra_output)
            .saturating_add(self.choices.saturating_mul(per_choice.max(1)))
    }

    /// The per-choice output cap that `reserved` tokens pay for (at least 1 if `reserved` is at
    /// least [`Bound::min_reservation`]), never more than `wanted`.
    pub fn per_choice_cap(&self, reserved: u64, wanted: u64) -> u64 {
        let for_output = reserved
            .saturating_sub(self.input)
            .saturating_sub(self.extra_output);
        (for_output / self.choices.max(1)).min(wanted).max(1)
    }
}

/// The output multiplier a field asks for: absent or `null` is 1; anything but an integer in
/// `1..=MAX_CHOICES` (a string, a fraction, zero, a huge number) cannot be bounded, because
/// OpenAI-compatible servers coerce `"50"` and `50.0` to 50.
fn multiplier(body: &Map<String, Value>, field: &'static str) -> Result<u64, Unbounded> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(1),
        Some(v) => {
            let n = v.as_u64().or_else(|| {
                v.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 1.0 && *f <= MAX_CHOICES as f64)
                    .map(|f| f as u64)
            });
            match n {
                Some(n) if (1..=MAX_CHOICES).contains(&n) => Ok(n),
                _ => Err(Unbounded::Multiplier(field)),
            }
        }
    }
}

/// Top-level fields whose content the provider fetches or produces out of sight.
const UNBOUNDED_FIELDS: &[&str] = &[
    "previous_response_id",
    "conversation",
    "mcp_servers",
    "container",
    "web_search_options",
];

/// The part types whose content lives elsewhere (files, PDFs whose pages become images).
const UNBOUNDED_PARTS: &[&str] = &["file", "input_file", "container_upload"];

fn source_type(o: &Map<String, Value>) -> Option<&str> {
    o.get("source")?.get("type")?.as_str()
}

fn is_inline_data(v: Option<&Value>) -> bool {
    v.and_then(Value::as_str)
        .is_some_and(|s| s.starts_with("data:"))
}

/// Refuses a content part (anywhere in the body) whose content is not in the request.
fn check_part(o: &Map<String, Value>) -> Result<(), Unbounded> {
    if o.contains_key("file_id") {
        return Err(Unbounded::Reference("a `file_id`".into()));
    }
    let Some(t) = o.get("type").and_then(Value::as_str) else {
        return Ok(());
    };
    let inline = match t {
        // Chat: {"type": "image_url", "image_url": {"url": ...}}.
        "image_url" => is_inline_data(o.get("image_url").and_then(|i| i.get("url"))),
        // Responses: {"type": "input_image", "image_url": ...}.
        "input_image" => is_inline_data(o.get("image_url")),
        // Anthropic: {"type": "image", "source": {"type": "base64", ...}}.
        "image" => source_type(o) == Some("base64"),
        // Anthropic documents: plain text is counted by its bytes; a PDF's pages are not.
        "document" => matches!(source_type(o), Some("text" | "content")),
        t if UNBOUNDED_PARTS.contains(&t) => false,
        _ => true,
    };
    if inline {
        Ok(())
    } else {
        Err(Unbounded::Reference(format!(
            "a `{t}` part not given inline"
        )))
    }
}

fn walk(v: &Value) -> Result<(), Unbounded> {
    match v {
        Value::Array(a) => a.iter().try_for_each(walk),
        Value::Object(o) => {
            check_part(o)?;
            o.values().try_for_each(walk)
        }
        _ => Ok(()),
    }
}

/// Only tools the client runs itself (functions) are bounded: a server tool (web search, code
/// execution, file search, MCP, computer use) feeds the model input the gateway never sees.
fn check_tools(tools: &Value) -> Result<(), Unbounded> {
    for t in tools.as_array().map(Vec::as_slice).unwrap_or_default() {
        match t.get("type").and_then(Value::as_str) {
            None | Some("function" | "custom") => {}
            Some(other) => return Err(Unbounded::Reference(format!("the `{other}` tool"))),
        }
    }
    Ok(())
}

fn declares_tools(body: &Map<String, Value>) -> bool {
    ["tools", "functions"].iter().any(|f| {
        body.get(*f)
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
    })
}

/// The upper bound of a request's cost, or why there is none.
pub fn bound(format: Format, body: &Map<String, Value>) -> Result<Bound, Unbounded> {
    let mut choices = 1;
    for f in MULTIPLIERS {
        choices = choices.max(multiplier(body, f)?);
    }
    for f in UNBOUNDED_FIELDS {
        if body.get(*f).is_some_and(|v| !v.is_null()) {
            return Err(Unbounded::Reference(format!("`{f}`")));
        }
    }
    // A stored prompt template (Responses) is text the gateway never sees.
    if format == Format::Responses && body.get("prompt").is_some_and(|v| !v.is_null()) {
        return Err(Unbounded::Reference("`prompt`".into()));
    }
    for f in ["tools", "functions"] {
        if let Some(t) = body.get(f) {
            check_tools(t)?;
        }
    }
    body.values().try_for_each(walk)?;
    let bytes = serde_json::to_vec(body).map(|v| v.len()).unwrap_or(0) as u64;
    let mut input = bytes.saturating_add(REQUEST_OVERHEAD);
    if declares_tools(body) {
        input = input.saturating_add(TOOLS_OVERHEAD);
    }
    let extra_output = body
        .get("prediction")
        .filter(|v| !v.is_null())
        .and_then(|p| serde_json::to_vec(p).ok())
        .map_or(0, |v| v.len() as u64);
    Ok(Bound {
        input,
        choices,
        extra_output,
    })
}

/// The fields that cap output per choice, by format (Chat has two, and a provider may honour
/// either).
pub fn cap_fields(format: Format) -> &'static [&'static str] {
    match format {
        Format::Chat => &["max_tokens", "max_completion_tokens"],
        Format::Responses => &["max_output_tokens"],
        Format::Messages => &["max_tokens"],
    }
}

/// Lowers every output cap of `body` to at most `cap` per choice: a field the client set higher
/// or to anything but an integer is replaced, and a request with no cap gets one, so that no
/// field a provider might honour allows more than was reserved.
pub fn cap_output(format: Format, body: &mut Map<String, Value>, cap: u64) {
    let mut any = false;
    for f in cap_fields(format) {
        if let Some(v) = body.get_mut(*f) {
            if v.is_null() {
                continue;
            }
            any = true;
            if v.as_u64().is_none_or(|m| m > cap) {
                *v = Value::from(cap);
            }
        }
    }
    if !any {
        let f = crate::meter::max_tokens_field(format, &Value::Null);
        body.insert(f.into(), Value::from(cap));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!("tests pass objects"),
        }
    }

    #[test]
    fn every_output_multiplier_is_counted() {
        let b = bound(
            Format::Chat,
            &obj(json!({"model": "m", "messages": [], "max_tokens": 100, "n": 50})),
        )
        .unwrap();
        assert_eq!(b.choices, 50);
        let b = bound(
            Format::Chat,
            &obj(json!({"model": "m", "best_of": 7, "n": 3})),
        )
        .unwrap();
        assert_eq!(b.choices, 7, "best_of generates 7 and bills them all");
        // An Anthropic or Responses upstream that is OpenAI-compatible may honour `n` too.
        let b = bound(Format::Messages, &obj(json!({"model": "m", "n": 4}))).unwrap();
        assert_eq!(b.choices, 4);
        let b = bound(Format::Chat, &obj(json!({"model": "m", "n": 5.0}))).unwrap();
        assert_eq!(b.choices, 5);
        for bad in [
            json!("50"),
            json!(0),
            json!(-1),
            json!(2.5),
            json!(129),
            json!(1e300),
            json!([2]),
            json!(true),
        ] {
            for f in MULTIPLIERS {
                let mut body = obj(json!({"model": "m"}));
                body.insert((*f).into(), bad.clone());
                assert_eq!(
                    bound(Format::Chat, &body),
                    Err(Unbounded::Multiplier(f)),
                    "{f}: {bad}"
                );
            }
        }
    }

    #[test]
    fn input_covers_the_bytes_and_the_framing() {
        let body = obj(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
        let b = bound(Format::Chat, &body).unwrap();
        let bytes = serde_json::to_vec(&body).unwrap().len() as u64;
        assert_eq!(b.input, bytes + REQUEST_OVERHEAD);
        // The provider counted "hi" as 11 tokens: the bound covers it.
        assert!(b.input >= 11);
        let tools = obj(json!({"model": "m", "messages": [],
            "tools": [{"type": "function", "function": {"name": "f"}}]}));
        let t = bound(Format::Chat, &tools).unwrap();
        assert!(t.input >= TOOLS_OVERHEAD);
        let pred =
            obj(json!({"model": "m", "prediction": {"type": "content", "content": "abcdef"}}));
        assert!(bound(Format::Chat, &pred).unwrap().extra_output >= 6);
    }

    #[test]
    fn what_the_provider_fetches_is_refused() {
        let refused = [
            (
                Format::Chat,
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}),
            ),
            (
                Format::Chat,
                json!({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": "JVBERi0="}}]}]}),
            ),
            (Format::Chat, json!({"web_search_options": {}})),
            (Format::Responses, json!({"previous_response_id": "resp_1"})),
            (Format::Responses, json!({"conversation": "conv_1"})),
            (Format::Responses, json!({"prompt": {"id": "pmpt_1"}})),
            (
                Format::Responses,
                json!({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]}),
            ),
            (
                Format::Responses,
                json!({"input": [{"role": "user", "content": [{"type": "input_file", "file_data": "x"}]}]}),
            ),
            (
                Format::Responses,
                json!({"tools": [{"type": "web_search"}]}),
            ),
            (
                Format::Messages,
                json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
            ),
            (
                Format::Messages,
                json!({"mcp_servers": [{"type": "url", "url": "https://x"}]}),
            ),
            (Format::Messages, json!({"container": "c_1"})),
            (
                Format::Messages,
                json!({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "https://x"}}]}]}),
            ),
            (
                Format::Messages,
                json!({"messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "x"}}]}]}),
            ),
        ];
        for (f, body) in refused {
            assert!(
                matches!(bound(f, &obj(body.clone())), Err(Unbounded::Reference(_))),
                "{body}"
            );
        }
        let accepted = [
            (
                Format::Chat,
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}),
            ),
            (
                Format::Messages,
                json!({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}],
                    "tools": [{"name": "f", "input_schema": {}}]}),
            ),
            (
                Format::Messages,
                json!({"messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}]}]}),
            ),
            (
                Format::Chat,
                json!({"prompt": "a field chat does not have"}),
            ),
        ];
        for (f, body) in accepted {
            assert!(bound(f, &obj(body.clone())).is_ok(), "{body}");
        }
    }

    #[test]
    fn every_cap_field_is_lowered() {
        let mut b = obj(json!({"max_tokens": 500, "max_completion_tokens": "9999"}));
        cap_output(Format::Chat, &mut b, 17);
        assert_eq!(b["max_tokens"], 17);
        assert_eq!(b["max_completion_tokens"], 17);
        let mut b = obj(json!({"max_completion_tokens": 5}));
        cap_output(Format::Chat, &mut b, 17);
        assert_eq!(b["max_completion_tokens"], 5, "a lower cap is kept");
        assert!(!b.contains_key("max_tokens"));
        let mut b = obj(json!({"max_tokens": null}));
        cap_output(Format::Messages, &mut b, 3);
        assert_eq!(b["max_tokens"], 3);
        let mut b = obj(json!({}));
        cap_output(Format::Responses, &mut b, 4);
        assert_eq!(b["max_output_tokens"], 4);
    }

    proptest! {
        /// Whatever is reserved at or above the minimum pays for a cap whose worst case fits in
        /// it, and never more than was asked.
        #[test]
        fn the_cap_sent_upstream_never_exceeds_the_reservation(
            input in 0u64..1_000_000,
            extra in 0u64..10_000,
            choices in 1u64..=MAX_CHOICES,
            wanted in 1u64..1_000_000,
            slack in 0u64..10_000_000,
        ) {
            let b = Bound { input, choices, extra_output: extra };
            let reserved = b.min_reservation() + slack;
            let cap = b.per_choice_cap(reserved, wanted);
            prop_assert!(cap >= 1);
            prop_assert!(cap <= wanted);
            // The worst the provider can bill: all the input, every choice at its cap.
            prop_assert!(b.reservation_for(cap) <= reserved);
            prop_assert!(b.reservation_for(wanted) >= b.reservation_for(cap));
        }

        /// The bound grows with the prompt: no text makes the input bound smaller than its bytes.
        #[test]
        fn the_input_bound_is_at_least_the_text_bytes(text in ".{0,200}", n in 1u64..=MAX_CHOICES) {
            let body = obj(json!({"model": "m", "n": n, "messages": [{"role": "user", "content": text}]}));
            let b = bound(Format::Chat, &body).unwrap();
            prop_assert!(b.input >= text.len() as u64 + REQUEST_OVERHEAD);
            prop_assert_eq!(b.choices, n);
        }
    }
}
