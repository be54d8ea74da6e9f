//! How many tokens a call will use, before it is made: the flow limiter reserves this much of
//! the upstream's tokens-per-minute, and settles to the real usage after the call.
//!
//! OpenAI-family models (those tiktoken knows by name: `gpt-4o`, `gpt-4.1`, `o3`, `gpt-3.5`, ...)
//! are counted with their real tokenizer where a tokens-per-minute limit is configured (the only
//! place the exact count matters before the call; loading a tokenizer costs ~50 MiB). Any other model gets a heuristic, one token per 3 bytes
//! of UTF-8: above the 4 characters per token of English text on most tokenizers, so an unknown
//! model is over-reserved (and refunded) rather than under-reserved. Both add OpenAI's chat
//! framing: 3 tokens per message and 3 to prime the reply.

use agentq_common::task::Message;
use tiktoken_rs::tokenizer::{get_tokenizer, Tokenizer};
use tiktoken_rs::CoreBPE;

const PER_MESSAGE: u64 = 3;
const REPLY_PRIMING: u64 = 3;

fn bpe_for(model: &str) -> Option<&'static CoreBPE> {
    match get_tokenizer(model)? {
        Tokenizer::O200kBase | Tokenizer::O200kHarmony => Some(tiktoken_rs::o200k_base_singleton()),
        Tokenizer::Cl100kBase => Some(tiktoken_rs::cl100k_base_singleton()),
        // older encodings (davinci era): the heuristic is close enough and loads nothing
        _ => None,
    }
}

/// Whether `model` has a real tokenizer here.
pub fn has_tokenizer(model: &str) -> bool {
    bpe_for_name(model)
}

fn bpe_for_name(model: &str) -> bool {
    matches!(
        get_tokenizer(model),
        Some(Tokenizer::O200kBase | Tokenizer::O200kHarmony | Tokenizer::Cl100kBase)
    )
}

/// Loads the tokenizer `model` needs, off the async threads, so the first call does not pay for
/// it (building o200k takes about a quarter of a second and some 50 MiB).
pub fn warm_up(model: &str) {
    let _ = bpe_for(model);
}

fn heuristic(text: &str) -> u64 {
    (text.len() as u64).div_ceil(3)
}

/// Estimated prompt tokens of `messages` for `model`. `exact`: use the model's real tokenizer
/// when it has one (worth it only where a tokens-per-minute limit is configured; elsewhere the
/// estimate is only a reservation settled after the call, and the heuristic costs nothing).
pub fn prompt_tokens(model: &str, messages: &[Message], exact: bool) -> u64 {
    let bpe = if exact { bpe_for(model) } else { None };
    let body: u64 = messages
        .iter()
        .map(|m| {
            let text = m.text_content();
            let content = match bpe {
                Some(b) => b.encode_ordinary(&text).len() as u64,
                None => heuristic(&text),
            };
            // tool call names, arguments and ids: counted by the heuristic, whatever the model
            content + (m.extra_len() as u64).div_ceil(3) + PER_MESSAGE + 1
        })
        .sum();
    body + REPLY_PRIMING
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> Message {
        Message::user(s)
    }

    #[test]
    fn openai_models_use_their_tokenizer() {
        // "hello world" is 2 tokens in o200k_base and cl100k_base
        assert_eq!(
            prompt_tokens("gpt-4o-mini", &[user("hello world")], true),
            2 + 4 + 3
        );
        assert_eq!(
            prompt_tokens("gpt-3.5-turbo", &[user("hello world")], true),
            2 + 4 + 3
        );
        assert!(has_tokenizer("gpt-4o") && !has_tokenizer("llama-3"));
    }

    #[test]
    fn other_models_are_over_rather_than_under_counted() {
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(20);
        let real = prompt_tokens("gpt-4o", &[user(&text)], true);
        let guess = prompt_tokens("gpt-4o", &[user(&text)], false);
        assert_eq!(guess, prompt_tokens("llama-3.1-8b", &[user(&text)], true));
        assert!(guess >= real, "heuristic {guess} below tiktoken's {real}");
        assert!(guess <= real * 2, "heuristic {guess} far above {real}");
    }
}
