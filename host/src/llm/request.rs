//! Reading an LLM request body: the model, whether it streams, its output cap, and the
//! estimate of the tokens it will use; and writing it again for one deployment.

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::tokens;
use crate::config::Tokenizer;

/// The LLM API a request path belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// OpenAI `POST /v1/chat/completions`.
    ChatCompletions,
    /// OpenAI `POST /v1/responses`.
    Responses,
    /// Anthropic `POST /v1/messages`.
    Messages,
}

/// A parsed LLM request.
#[derive(Debug, Clone)]
pub struct LlmRequest {
    pub api: Api,
    body: Map<String, Value>,
    pub model: String,
    pub stream: bool,
    /// The output cap the client set, if any.
    pub output_cap: Option<u64>,
    /// Answers asked for (`n`).
    pub choices: u64,
    /// The prompt's tokens, as counted by the route's tokenizer.
    prompt_tokens: u64,
    /// Whether a streaming client asked for the usage event itself.
    pub client_wants_usage: bool,
}

// === impl Api ===

impl Api {
    pub fn of_path(path: &str) -> Option<Api> {
        let path = path.trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            Some(Api::ChatCompletions)
        } else if path.ends_with("/responses") {
            Some(Api::Responses)
        } else if path.ends_with("/messages") {
            Some(Api::Messages)
        } else {
            None
        }
    }
}

// === impl LlmRequest ===

impl LlmRequest {
    /// Reads the body and counts its prompt; `None` when it is not a JSON object naming a
    /// model.
    pub fn parse(api: Api, bytes: &[u8], tokenizer: Tokenizer) -> Option<LlmRequest> {
        let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(bytes) else {
            return None;
        };
        let model = body.get("model")?.as_str()?.to_string();
        let output_cap = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
            .iter()
            .find_map(|field| body.get(*field)?.as_u64());
        Some(LlmRequest {
            api,
            model,
            stream: body.get("stream").and_then(Value::as_bool) == Some(true),
            output_cap,
            choices: body.get("n").and_then(Value::as_u64).unwrap_or(1).max(1),
            prompt_tokens: tokens::prompt_tokens(tokenizer, &body, bytes.len()),
            client_wants_usage: body
                .get("stream_options")
                .and_then(|options| options.get("include_usage"))
                .and_then(Value::as_bool)
                == Some(true),
            body,
        })
    }

    /// The prompt's tokens, as the route's tokenizer counted them.
    pub fn prompt_estimate(&self) -> u64 {
        self.prompt_tokens
    }

    /// Tokens the request may use: the prompt, plus the output cap for every answer.
    pub fn estimate(&self, default_cap: u64) -> u64 {
        // Saturating: a client may send any numbers, and a wrapped sum would slip past budgets.
        let output = self
            .choices
            .saturating_mul(self.output_cap.unwrap_or(default_cap));
        self.prompt_estimate().saturating_add(output)
    }

    /// Whether the gateway must ask for the usage event that the client did not ask for
    /// (only chat completion streams leave it out unless asked).
    pub fn needs_usage_event(&self) -> bool {
        self.api == Api::ChatCompletions && self.stream && !self.client_wants_usage
    }

    /// The body to send to a deployment: its model name, and the usage event asked for.
    pub fn body_for(&self, model: &str) -> Bytes {
        let mut body = self.body.clone();
        body.insert("model".into(), Value::String(model.into()));
        if self.needs_usage_event() {
            let options = body.entry("stream_options").or_insert_with(|| json!({}));
            if let Value::Object(options) = options {
                options.insert("include_usage".into(), Value::Bool(true));
            }
        }
        // NB: a map of JSON values always serializes.
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_model_stream_cap_and_choices() {
        let body = br#"{"model":"m","stream":true,"max_tokens":50,"n":2,"messages":[]}"#;
        let request =
            LlmRequest::parse(Api::ChatCompletions, body, Tokenizer::Bytes).expect("valid");
        assert_eq!(request.model, "m");
        assert!(request.stream && request.needs_usage_event());
        assert_eq!(
            request.estimate(1000),
            (body.len() as u64).div_ceil(4) + 100
        );
    }

    #[test]
    fn the_rewritten_body_names_the_deployment_model_and_asks_for_usage() {
        let body = br#"{"model":"public","stream":true,"messages":[]}"#;
        let request =
            LlmRequest::parse(Api::ChatCompletions, body, Tokenizer::Bytes).expect("valid");
        let sent: Value = serde_json::from_slice(&request.body_for("private")).expect("json");
        assert_eq!(sent["model"], "private");
        assert_eq!(sent["stream_options"]["include_usage"], true);
    }

    #[test]
    fn huge_caps_saturate_rather_than_wrap() {
        let body = br#"{"model":"m","max_tokens":4294967296,"n":4294967296}"#;
        let request =
            LlmRequest::parse(Api::ChatCompletions, body, Tokenizer::Bytes).expect("valid");
        assert_eq!(request.estimate(1), u64::MAX);
    }

    #[test]
    fn bodies_without_a_model_are_not_parsed() {
        assert!(LlmRequest::parse(Api::Messages, b"{\"messages\":[]}", Tokenizer::Bytes).is_none());
        assert!(LlmRequest::parse(Api::Messages, b"not json", Tokenizer::Bytes).is_none());
    }
}
