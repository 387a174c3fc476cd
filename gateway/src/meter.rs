//! Reading usage out of each provider format, and estimating it where a provider is silent.
//!
//! Three wire formats, each with its own place for usage: OpenAI Chat Completions (`usage`, and in
//! streams a last chunk with empty `choices` that only comes with `stream_options.include_usage`),
//! OpenAI Responses (`response.completed` carries `response.usage`), and Anthropic Messages
//! (`message_start` has the input tokens, each `message_delta` the cumulative output tokens).
//! While a stream runs, output is counted one token per delta so that a budget can be enforced
//! before the provider's own count arrives at the end.

use serde_json::Value;

use crate::sse::Event;

/// The API a request was made to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/responses`.
    Responses,
    /// `POST /v1/messages` (Anthropic).
    Messages,
}

/// Tokens charged for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Input (prompt) tokens.
    pub input: u64,
    /// Output (completion) tokens.
    pub output: u64,
    /// Whether any part was estimated because the provider did not report it.
    pub estimated: bool,
}

impl Usage {
    /// Input and output together.
    pub fn total(&self) -> u64 {
        self.input.saturating_add(self.output)
    }
}

/// A rough token count for text: four characters a token, at least one for non-empty text.
pub fn estimate_text(s: &str) -> u64 {
    let chars = s.chars().count() as u64;
    if chars == 0 {
        0
    } else {
        chars.div_ceil(4).max(1)
    }
}

/// All text in a JSON value (strings anywhere), for estimating a prompt's size.
fn text_len(v: &Value, out: &mut u64) {
    match v {
        Value::String(s) => *out += estimate_text(s),
        Value::Array(a) => a.iter().for_each(|x| text_len(x, out)),
        Value::Object(o) => o.values().for_each(|x| text_len(x, out)),
        _ => {}
    }
}

/// An estimate of a request's input tokens from the fields that carry the prompt.
pub fn estimate_input(format: Format, body: &Value) -> u64 {
    let mut n = 0;
    let fields: &[&str] = match format {
        Format::Chat => &["messages"],
        Format::Responses => &["input", "instructions"],
        Format::Messages => &["messages", "system"],
    };
    for f in fields {
        if let Some(v) = body.get(*f) {
            text_len(v, &mut n);
        }
    }
    n.max(1)
}

/// The request field that caps output tokens, by format.
pub fn max_tokens_field(format: Format, body: &Value) -> &'static str {
    match format {
        Format::Chat if body.get("max_completion_tokens").is_some() => "max_completion_tokens",
        Format::Chat => "max_tokens",
        Format::Responses => "max_output_tokens",
        Format::Messages => "max_tokens",
    }
}

fn u(v: &Value, path: &[&str]) -> Option<u64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_u64()
}

/// Usage from a complete (non-streamed) response body, if the provider reported it.
pub fn usage_of_body(format: Format, body: &Value) -> Option<Usage> {
    let (i, o) = match format {
        Format::Chat => (
            u(body, &["usage", "prompt_tokens"])?,
            u(body, &["usage", "completion_tokens"])?,
        ),
        Format::Responses => (
            u(body, &["usage", "input_tokens"])?,
            u(body, &["usage", "output_tokens"])?,
        ),
        Format::Messages => (
            u(body, &["usage", "input_tokens"])?,
            u(body, &["usage", "output_tokens"])?,
        ),
    };
    Some(Usage {
        input: i,
        output: o,
        estimated: false,
    })
}

/// An upper bound of a complete response's output tokens from its text: its bytes (a token is
/// at least one byte), for a provider that reports no usage.
pub fn estimate_output_of_body(body: &Value) -> u64 {
    fn bytes(v: &Value) -> u64 {
        match v {
            Value::String(s) => s.len() as u64,
            Value::Array(a) => a.iter().map(bytes).sum(),
            Value::Object(o) => o.values().map(bytes).sum(),
            _ => 0,
        }
    }
    ["choices", "output", "content"]
        .iter()
        .filter_map(|f| body.get(*f))
        .map(bytes)
        .sum()
}

/// What to do with one event of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Pass it on.
    Forward,
    /// Keep it from the client (the usage chunk it did not ask for).
    Drop,
}

/// Follows a stream's usage event by event.
#[derive(Debug, Clone)]
pub struct StreamMeter {
    format: Format,
    input_estimate: u64,
    input: Option<u64>,
    output_seen: u64,
    output: Option<u64>,
    client_wants_usage: bool,
    finished: bool,
}

impl StreamMeter {
    /// A meter for a stream whose prompt was estimated at `input_estimate` tokens.
    /// `client_wants_usage`: for Chat, whether the client itself asked for the usage chunk.
    pub fn new(format: Format, input_estimate: u64, client_wants_usage: bool) -> StreamMeter {
        StreamMeter {
            format,
            input_estimate,
            input: None,
            output_seen: 0,
            output: None,
            client_wants_usage,
            finished: false,
        }
    }

    /// Reads an event; says whether the client gets it.
    pub fn observe(&mut self, ev: &Event) -> Verdict {
        if self.format == Format::Chat && ev.data.trim() == "[DONE]" {
            self.finished = true;
            return Verdict::Forward;
        }
        let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
            return Verdict::Forward;
        };
        match self.format {
            Format::Chat => {
                if let (Some(i), Some(o)) = (
                    u(&v, &["usage", "prompt_tokens"]),
                    u(&v, &["usage", "completion_tokens"]),
                ) {
                    self.input = Some(i);
                    self.output = Some(o);
                    let only_usage = v
                        .get("choices")
                        .and_then(Value::as_array)
                        .is_some_and(|c| c.is_empty());
                    if only_usage && !self.client_wants_usage {
                        return Verdict::Drop;
                    }
                }
                if let Some(choices) = v.get("choices").and_then(Value::as_array) {
                    for c in choices {
                        let delta = &c["delta"];
                        let has_text = delta
                            .get("content")
                            .and_then(Value::as_str)
                            .is_some_and(|s| !s.is_empty())
                            || delta.get("tool_calls").is_some()
                            || delta.get("refusal").and_then(Value::as_str).is_some();
                        if has_text {
                            self.output_seen += 1;
                        }
                    }
                }
            }
            Format::Responses => {
                let kind = v
                    .get("type")
                    .and_then(Value::as_str)
                    .or(ev.event.as_deref())
                    .unwrap_or("");
                match kind {
                    "response.output_text.delta"
                    | "response.refusal.delta"
                    | "response.function_call_arguments.delta" => self.output_seen += 1,
                    "response.completed" | "response.incomplete" | "response.failed" => {
                        self.finished = true;
                        if let (Some(i), Some(o)) = (
                            u(&v, &["response", "usage", "input_tokens"]),
                            u(&v, &["response", "usage", "output_tokens"]),
                        ) {
                            self.input = Some(i);
                            self.output = Some(o);
                        }
                    }
                    _ => {}
                }
            }
            Format::Messages => {
                let kind = v
                    .get("type")
                    .and_then(Value::as_str)
                    .or(ev.event.as_deref())
                    .unwrap_or("");
                match kind {
                    "message_start" => {
                        if let Some(i) = u(&v, &["message", "usage", "input_tokens"]) {
                            self.input = Some(i);
                        }
                    }
                    "content_block_delta" => self.output_seen += 1,
                    "message_delta" => {
                        if let Some(o) = u(&v, &["usage", "output_tokens"]) {
                            self.output = Some(o);
                        }
                    }
                    "message_stop" => self.finished = true,
                    _ => {}
                }
            }
        }
        Verdict::Forward
    }

    /// What has been used so far: the provider's numbers where it gave them, estimates
    /// elsewhere.
    pub fn so_far(&self) -> Usage {
        Usage {
            input: self.input.unwrap_or(self.input_estimate),
            output: self.output.unwrap_or(0).max(self.output_seen),
            estimated: self.input.is_none() || self.output.is_none(),
        }
    }

    /// The final charge: the provider's numbers if it reported them, else the estimates.
    pub fn charge(&self) -> Usage {
        match (self.input, self.output) {
            (Some(i), Some(o)) => Usage {
                input: i,
                output: o,
                estimated: false,
            },
            _ => self.so_far(),
        }
    }

    /// Whether the stream's terminal event came.
    pub fn finished(&self) -> bool {
        self.finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(event: Option<&str>, data: Value) -> Event {
        Event {
            event: event.map(String::from),
            data: data.to_string(),
        }
    }

    #[test]
    fn chat_streams_count_deltas_then_take_the_usage_chunk() {
        let mut m = StreamMeter::new(Format::Chat, 10, false);
        for _ in 0..3 {
            let v = m.observe(&ev(
                None,
                json!({"choices":[{"index":0,"delta":{"content":"tok "}}]}),
            ));
            assert_eq!(v, Verdict::Forward);
        }
        assert_eq!(
            m.so_far(),
            Usage {
                input: 10,
                output: 3,
                estimated: true
            }
        );
        let usage_chunk = ev(
            None,
            json!({"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}),
        );
        assert_eq!(
            m.observe(&usage_chunk),
            Verdict::Drop,
            "the client did not ask"
        );
        let done = Event {
            event: None,
            data: "[DONE]".into(),
        };
        assert_eq!(m.observe(&done), Verdict::Forward);
        assert!(m.finished());
        assert_eq!(
            m.charge(),
            Usage {
                input: 12,
                output: 3,
                estimated: false
            }
        );
        let mut asked = StreamMeter::new(Format::Chat, 10, true);
        assert_eq!(asked.observe(&usage_chunk), Verdict::Forward);
    }

    #[test]
    fn responses_and_messages_take_their_terminal_usage() {
        let mut m = StreamMeter::new(Format::Responses, 5, false);
        m.observe(&ev(
            Some("response.output_text.delta"),
            json!({"type":"response.output_text.delta","delta":"a"}),
        ));
        m.observe(&ev(
            Some("response.completed"),
            json!({"type":"response.completed","response":{"usage":{"input_tokens":7,"output_tokens":1,"total_tokens":8}}}),
        ));
        assert!(m.finished());
        assert_eq!(
            m.charge(),
            Usage {
                input: 7,
                output: 1,
                estimated: false
            }
        );

        let mut m = StreamMeter::new(Format::Messages, 5, false);
        m.observe(&ev(
            Some("message_start"),
            json!({"type":"message_start","message":{"usage":{"input_tokens":9,"output_tokens":1}}}),
        ));
        assert_eq!(m.so_far().input, 9, "actual input known at the start");
        m.observe(&ev(
            Some("content_block_delta"),
            json!({"type":"content_block_delta","delta":{"type":"text_delta","text":"x"}}),
        ));
        m.observe(&ev(
            Some("message_delta"),
            json!({"type":"message_delta","usage":{"output_tokens":4}}),
        ));
        m.observe(&ev(Some("message_stop"), json!({"type":"message_stop"})));
        assert_eq!(
            m.charge(),
            Usage {
                input: 9,
                output: 4,
                estimated: false
            }
        );
    }

    #[test]
    fn silent_providers_are_estimated_and_marked() {
        let mut m = StreamMeter::new(Format::Chat, 6, false);
        m.observe(&ev(None, json!({"choices":[{"delta":{"content":"x"}}]})));
        assert_eq!(
            m.charge(),
            Usage {
                input: 6,
                output: 1,
                estimated: true
            }
        );
        let body = json!({"choices":[{"message":{"content":"abcdefgh"}}]});
        assert_eq!(usage_of_body(Format::Chat, &body), None);
        assert!(estimate_output_of_body(&body) >= 2);
        let req = json!({"messages":[{"role":"user","content":"hello world, how are you?"}]});
        assert!(estimate_input(Format::Chat, &req) >= 6);
        // Garbage in a stream is passed on, never a panic.
        let mut m = StreamMeter::new(Format::Messages, 1, false);
        assert_eq!(
            m.observe(&Event {
                event: None,
                data: "{not json".into()
            }),
            Verdict::Forward
        );
    }
}
