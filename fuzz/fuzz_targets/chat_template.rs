//! The chat template rendering of user messages: arbitrary roles and contents (see
//! `fdc_fuzz::chat_messages`) through the SmolLM2 template and templates in the style of
//! Llama 3 and Qwen. Rendering must give text or an error, never a panic, and message contents
//! are data: template syntax inside them is never evaluated.

#![no_main]

use libfuzzer_sys::fuzz_target;
use runtime::chat::ChatTemplate;
use std::sync::OnceLock;

const TEMPLATES: [&str; 3] = [
    include_str!("../templates/smollm2.jinja"),
    include_str!("../templates/llama3_style.jinja"),
    include_str!("../templates/qwen_style.jinja"),
];

fn templates() -> &'static [ChatTemplate] {
    static COMPILED: OnceLock<Vec<ChatTemplate>> = OnceLock::new();
    COMPILED.get_or_init(|| {
        TEMPLATES
            .iter()
            .map(|source| {
                ChatTemplate::new(source, Some("<s>".into()), Some("</s>".into()))
                    .expect("the fuzzed templates compile")
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let template = &templates()[pick as usize % TEMPLATES.len()];
    let messages = fdc_fuzz::chat_messages(rest);
    let add_generation_prompt = pick & 0x80 != 0;
    if let Ok(text) = template.render(&messages, add_generation_prompt) {
        // `{{ 7*7 }}` in a message must come out as written, never as 49.
        for message in &messages {
            if message.content.contains("{{ 7*7 }}") {
                assert!(text.contains("{{ 7*7 }}") || !text.contains("49"));
            }
        }
    }
});
