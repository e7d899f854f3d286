//! Counting the tokens of a request's prompt before it is sent.
//!
//! The default estimate is a quarter of the body's bytes: it needs no vocabulary and runs
//! above the true count for text wrapped in JSON. Gateways built with the `exact-tokens`
//! feature can count with OpenAI's tokenizers instead, over the prompt's text: every string
//! under the body's prompt fields except those that carry images or files, plus the few
//! tokens the chat format adds to each message.

use serde_json::{Map, Value};

use crate::config::Tokenizer;

/// The tokens of the prompt in `body`, whose serialized form is `bytes` long.
pub fn prompt_tokens(tokenizer: Tokenizer, body: &Map<String, Value>, bytes: usize) -> u64 {
    match tokenizer {
        Tokenizer::Bytes => (bytes as u64).div_ceil(4),
        #[cfg(feature = "exact-tokens")]
        exact => exact::count(exact, body),
        #[cfg(not(feature = "exact-tokens"))]
        _ => {
            // NB: the config check refuses the other tokenizers in such a gateway.
            let _ = body;
            (bytes as u64).div_ceil(4)
        }
    }
}

/// Loads the tokenizer's vocabulary now, so that the first request does not wait for it.
pub fn load(tokenizer: Tokenizer) {
    #[cfg(feature = "exact-tokens")]
    if tokenizer != Tokenizer::Bytes {
        exact::bpe(tokenizer);
    }
    let _ = tokenizer;
}

#[cfg(feature = "exact-tokens")]
mod exact {
    use serde_json::{Map, Value};
    use tiktoken_rs::CoreBPE;

    use crate::config::Tokenizer;

    /// Fields of a request body that hold its prompt, across the APIs an LLM route serves.
    const PROMPT_FIELDS: &[&str] = &[
        "messages",
        "input",
        "system",
        "instructions",
        "prompt",
        "tools",
    ];

    /// Keys whose strings carry images or files (URLs or base64), not text.
    const NOT_TEXT: &[&str] = &["image_url", "url", "data", "file_data", "source"];

    /// Tokens the chat format adds around each message, and once to start the answer.
    const PER_MESSAGE: u64 = 3;
    const PRIMING: u64 = 3;

    /// The vocabulary, loaded once per process.
    pub fn bpe(tokenizer: Tokenizer) -> &'static CoreBPE {
        match tokenizer {
            Tokenizer::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
            Tokenizer::O200kBase | Tokenizer::Bytes => tiktoken_rs::o200k_base_singleton(),
        }
    }

    pub fn count(tokenizer: Tokenizer, body: &Map<String, Value>) -> u64 {
        let bpe = bpe(tokenizer);
        let mut tokens = PRIMING;
        for field in PROMPT_FIELDS {
            if let Some(value) = body.get(*field) {
                tokens = tokens.saturating_add(text_tokens(bpe, value));
            }
        }
        let messages = ["messages", "input"]
            .iter()
            .filter_map(|field| body.get(*field)?.as_array())
            .map(|messages| messages.len() as u64)
            .sum::<u64>();
        tokens.saturating_add(PER_MESSAGE.saturating_mul(messages))
    }

    fn text_tokens(bpe: &CoreBPE, value: &Value) -> u64 {
        match value {
            Value::String(text) => bpe.encode_ordinary(text).len() as u64,
            Value::Array(items) => items.iter().map(|item| text_tokens(bpe, item)).sum(),
            Value::Object(fields) => fields
                .iter()
                .filter(|(key, _)| !NOT_TEXT.contains(&key.as_str()))
                .map(|(_, value)| text_tokens(bpe, value))
                .sum(),
            Value::Null | Value::Bool(_) | Value::Number(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: &str) -> Map<String, Value> {
        serde_json::from_str(json).expect("a JSON object")
    }

    #[test]
    fn bytes_count_a_quarter_of_the_body() {
        let json = r#"{"model":"m","messages":[{"role":"user","content":"hello"}]}"#;
        let tokens = prompt_tokens(Tokenizer::Bytes, &body(json), json.len());
        assert_eq!(tokens, (json.len() as u64).div_ceil(4));
    }

    #[cfg(feature = "exact-tokens")]
    #[test]
    fn a_tokenizer_counts_the_prompts_text_and_the_chat_format() {
        let json = r#"{"model":"gpt-4o","max_tokens":5,
            "messages":[{"role":"system","content":"Be brief."},
                        {"role":"user","content":"hello world"}]}"#;
        let tokens = prompt_tokens(Tokenizer::O200kBase, &body(json), json.len());
        // "system" 1 + "Be brief." 3 + "user" 1 + "hello world" 2, 3 per message, 3 to prime.
        assert_eq!(tokens, 7 + 2 * 3 + 3);
        assert!(tokens < (json.len() as u64).div_ceil(4));
    }

    #[cfg(feature = "exact-tokens")]
    #[test]
    fn images_are_not_counted_as_text() {
        let image = "A".repeat(40_000);
        let json = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":[
                {{"type":"text","text":"what is this"}},
                {{"type":"image_url","image_url":{{"url":"data:image/png;base64,{image}"}}}}]}}]}}"#
        );
        let tokens = prompt_tokens(Tokenizer::Cl100kBase, &body(&json), json.len());
        assert!(tokens < 30, "{tokens}");
    }
}
