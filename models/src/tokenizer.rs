//! Tokenizers as `TokenizerSpec`: a complete HF `tokenizer.json` plus chat template and bos/eos
//! strings. From an HF directory the files are read as they are; from GGUF metadata a byte-level
//! BPE `tokenizer.json` is built (vocab, merges, special tokens, and the pre-tokenizer named by
//! `tokenizer.ggml.pre`).

use std::collections::HashSet;
use std::path::Path;

use serde::{Serialize, Serializer};
use serde_json::{json, Map, Value};

use crate::checkpoint::SourceFile;
use crate::error::ModelError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizerSpec {
    /// A complete HF tokenizer.json that `tokenizers::Tokenizer::from_str` loads.
    pub tokenizer_json: String,
    /// Jinja source of the chat template.
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

/// What an HF directory has to say about its tokenizer.
pub(crate) struct HfTokenizer {
    pub spec: Option<TokenizerSpec>,
    pub note: Option<String>,
    pub sources: Vec<SourceFile>,
}

/// Reads tokenizer.json, tokenizer_config.json and chat_template.jinja from an HF directory.
/// Missing files are fine (the tiny test checkpoints have none); unreadable ones are errors.
pub(crate) fn read_hf_tokenizer(dir: &Path) -> Result<HfTokenizer, ModelError> {
    let mut sources = Vec::new();
    let mut read_optional = |name: &str| -> Result<Option<String>, ModelError> {
        let path = dir.join(name);
        if !path.is_file() {
            return Ok(None);
        }
        let bytes = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
        sources.push(SourceFile::of_bytes(&path, &bytes));
        String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| ModelError::InvalidTokenizer {
                file: path.clone(),
                reason: "not UTF-8 text".to_string(),
            })
    };

    let tokenizer_json = read_optional("tokenizer.json")?;
    let tokenizer_config = read_optional("tokenizer_config.json")?;
    let template_file = read_optional("chat_template.jinja")?;

    if let Some(text) = &tokenizer_json {
        let path = dir.join("tokenizer.json");
        let value: Value = serde_json::from_str(text).map_err(|source| ModelError::Json {
            file: path.clone(),
            source,
        })?;
        if !value.is_object() {
            return Err(ModelError::InvalidTokenizer {
                file: path,
                reason: "expected a JSON object".to_string(),
            });
        }
    }

    let mut chat_template = None;
    let mut bos_token = None;
    let mut eos_token = None;
    if let Some(text) = &tokenizer_config {
        let path = dir.join("tokenizer_config.json");
        let value: Value = serde_json::from_str(text).map_err(|source| ModelError::Json {
            file: path.clone(),
            source,
        })?;
        chat_template = template_from_config(&value, &path)?;
        bos_token = token_string(value.get("bos_token"));
        eos_token = token_string(value.get("eos_token"));
    }
    // transformers writes the template to its own file since 4.50 and prefers it when present.
    if template_file.is_some() {
        chat_template = template_file;
    }

    let (spec, note) = match tokenizer_json {
        Some(tokenizer_json) => (
            Some(TokenizerSpec { tokenizer_json, chat_template, bos_token, eos_token }),
            None,
        ),
        None if dir.join("tokenizer.model").is_file() => (
            None,
            Some(
                "only tokenizer.model (SentencePiece) is present; SentencePiece tokenizers are not supported yet"
                    .to_string(),
            ),
        ),
        None => (None, None),
    };
    Ok(HfTokenizer {
        spec,
        note,
        sources,
    })
}

/// `chat_template` in tokenizer_config.json: a string, or a list of {name, template} of which
/// the one named "default" is the chat template.
fn template_from_config(config: &Value, path: &Path) -> Result<Option<String>, ModelError> {
    let invalid = |reason: &str| ModelError::InvalidTokenizer {
        file: path.to_path_buf(),
        reason: format!("chat_template: {reason}"),
    };
    match config.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(items)) => {
            for item in items {
                let name = item.get("name").and_then(Value::as_str);
                let template = item.get("template").and_then(Value::as_str);
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(Some(t.to_string())),
                    (Some(_), Some(_)) => {}
                    _ => return Err(invalid("list entries must be {name, template} strings")),
                }
            }
            Ok(None)
        }
        Some(_) => Err(invalid("expected a string or a list of {name, template}")),
    }
}

/// A special token in tokenizer_config.json: a string or an AddedToken object {content, ...}.
fn token_string(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// llama.cpp's token_type values (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The byte-level BPE vocabulary as GGUF metadata gives it.
pub(crate) struct GgufBpeVocab<'a> {
    pub tokens: Vec<&'a str>,
    /// One per token when present.
    pub token_types: Option<Vec<i64>>,
    /// "left right", split at the first space after the first character, as llama.cpp does.
    pub merges: Vec<&'a str>,
    /// `tokenizer.ggml.pre`; "default" when absent.
    pub pre: &'a str,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token` / `add_eos_token`, when present.
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
}

/// tokenizer.json as this crate writes it. The vocabulary and merges are serialized straight from
/// the borrowed metadata strings; a `serde_json::Value` tree would copy each of them.
#[derive(Serialize)]
struct TokenizerJson<'a> {
    version: &'static str,
    truncation: Option<()>,
    padding: Option<()>,
    added_tokens: Vec<Value>,
    normalizer: Value,
    pre_tokenizer: Value,
    post_processor: Value,
    decoder: Value,
    model: BpeModelJson<'a>,
}

#[derive(Serialize)]
struct BpeModelJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    dropout: Option<f64>,
    unk_token: Option<&'a str>,
    continuing_subword_prefix: Option<&'a str>,
    end_of_word_suffix: Option<&'a str>,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
    vocab: VocabJson<'a>,
    /// Pairs, which tokenizers reads without re-splitting (tokens may contain spaces).
    merges: Vec<(&'a str, &'a str)>,
}

/// token -> id as a JSON object.
struct VocabJson<'a>(Vec<(&'a str, usize)>);

impl Serialize for VocabJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(token, id)| (token, id)))
    }
}

/// The pre-tokenizers this crate reproduces, by llama.cpp's `tokenizer.ggml.pre` name.
pub const SUPPORTED_BPE_PRE: &str =
    "default, gpt2, gpt-2, smollm, starcoder, refact, llama-bpe, llama3, qwen2";

/// Llama 3's split regex (also in its tokenizer.json); digits go in runs of up to three.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex: Llama 3's with single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Normalizer, pre-tokenizer and whether merges are skipped for whole-vocab words, per pre type.
fn pre_tokenizer_for(pre: &str) -> Result<(Value, Value, bool), ModelError> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    Ok(match pre {
        // GPT-2's own regex is ByteLevel's built-in one.
        "default" | "gpt2" | "gpt-2" => (Value::Null, byte_level(true), false),
        // Every digit its own word, then GPT-2's regex (SmolLM and the StarCoder family).
        "smollm" | "starcoder" | "refact" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]}),
            false,
        ),
        // llama.cpp sets ignore_merges for Llama 3, as its tokenizer.json does: a word that is
        // already a vocabulary entry is taken whole.
        "llama-bpe" | "llama3" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}),
            true,
        ),
        // Qwen2's tokenizer.json normalizes to NFC before splitting.
        "qwen2" => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}),
            false,
        ),
        other => {
            return Err(ModelError::UnsupportedPreTokenizer {
                pre: other.to_string(),
                supported: SUPPORTED_BPE_PRE.to_string(),
            })
        }
    })
}

/// Builds a tokenizer.json for a GGUF byte-level BPE vocabulary; `file` names the GGUF in errors.
pub(crate) fn byte_level_bpe_json(
    vocab: &GgufBpeVocab<'_>,
    file: &Path,
) -> Result<String, ModelError> {
    let invalid = |reason: String| ModelError::InvalidTokenizer {
        file: file.to_path_buf(),
        reason,
    };
    let (normalizer, pre_tokenizer, ignore_merges) = pre_tokenizer_for(vocab.pre)?;

    if let Some(types) = &vocab.token_types {
        if types.len() != vocab.tokens.len() {
            return Err(invalid(format!(
                "{} token types for {} tokens",
                types.len(),
                vocab.tokens.len()
            )));
        }
    }
    let token = |id: Option<u32>, what: &str| -> Result<Option<&str>, ModelError> {
        match id {
            None => Ok(None),
            Some(id) => vocab
                .tokens
                .get(id as usize)
                .copied()
                .map(Some)
                .ok_or_else(|| {
                    invalid(format!(
                        "{what} id {id} is outside the vocabulary of {}",
                        vocab.tokens.len()
                    ))
                }),
        }
    };
    let bos = token(vocab.bos_id, "bos")?;
    let eos = token(vocab.eos_id, "eos")?;

    // A repeated token string keeps its first id, as a JSON map can hold only one.
    let mut known = HashSet::with_capacity(vocab.tokens.len());
    let mut entries = Vec::with_capacity(vocab.tokens.len());
    for (id, tok) in vocab.tokens.iter().enumerate() {
        if known.insert(*tok) {
            entries.push((*tok, id));
        }
    }

    let mut merges = Vec::with_capacity(vocab.merges.len());
    for merge in &vocab.merges {
        // The left part is never empty, so the separator is the first space after byte 0.
        let split = merge
            .char_indices()
            .skip(1)
            .find(|&(_, c)| c == ' ')
            .map(|(i, _)| (&merge[..i], &merge[i + 1..]));
        let Some((left, right)) = split else {
            return Err(invalid(format!(
                "merge {merge:?} has no space separating its two parts"
            )));
        };
        for part in [left, right] {
            if !known.contains(part) {
                return Err(invalid(format!(
                    "merge {merge:?} uses {part:?}, which is not in the vocabulary"
                )));
            }
        }
        merges.push((left, right));
    }

    let mut added_tokens = Vec::new();
    if let Some(types) = &vocab.token_types {
        for (id, (tok, ty)) in vocab.tokens.iter().zip(types).enumerate() {
            if *ty == TOKEN_TYPE_CONTROL || *ty == TOKEN_TYPE_USER_DEFINED {
                // Matched in the raw text before normalization, as llama.cpp does.
                added_tokens.push(json!({
                    "id": id,
                    "content": tok,
                    "single_word": false,
                    "lstrip": false,
                    "rstrip": false,
                    "normalized": false,
                    "special": *ty == TOKEN_TYPE_CONTROL,
                }));
            }
        }
    }

    // llama.cpp adds BOS by default only for the Llama 3 pre type; the metadata flag overrides.
    let add_bos = vocab
        .add_bos
        .unwrap_or(matches!(vocab.pre, "llama-bpe" | "llama3"))
        && bos.is_some();
    let add_eos = vocab.add_eos.unwrap_or(false) && eos.is_some();
    let byte_level_post = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true});
    let post_processor = if add_bos || add_eos {
        let mut single = Vec::new();
        let mut pair = Vec::new();
        let mut special_tokens = Map::new();
        let special =
            |content: &str, id: u32, type_id: u32, special_tokens: &mut Map<String, Value>| {
                special_tokens.insert(
                    content.to_string(),
                    json!({"id": content, "ids": [id], "tokens": [content]}),
                );
                json!({"SpecialToken": {"id": content, "type_id": type_id}})
            };
        for (sequence, type_id) in [("A", 0), ("B", 1)] {
            let part = if sequence == "A" {
                &mut single
            } else {
                &mut pair
            };
            if let (true, Some(b), Some(id)) = (add_bos, bos, vocab.bos_id) {
                part.push(special(b, id, type_id, &mut special_tokens));
            }
            part.push(json!({"Sequence": {"id": sequence, "type_id": type_id}}));
            if let (true, Some(e), Some(id)) = (add_eos, eos, vocab.eos_id) {
                part.push(special(e, id, type_id, &mut special_tokens));
            }
        }
        let pair: Vec<Value> = single.iter().cloned().chain(pair).collect();
        json!({"type": "Sequence", "processors": [
            byte_level_post,
            {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens},
        ]})
    } else {
        byte_level_post
    };

    let tokenizer = TokenizerJson {
        version: "1.0",
        truncation: None,
        padding: None,
        added_tokens,
        normalizer,
        pre_tokenizer,
        post_processor,
        decoder: json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
        model: BpeModelJson {
            kind: "BPE",
            dropout: None,
            unk_token: None,
            continuing_subword_prefix: None,
            end_of_word_suffix: None,
            fuse_unk: false,
            byte_fallback: false,
            ignore_merges,
            vocab: VocabJson(entries),
            merges,
        },
    };
    serde_json::to_string(&tokenizer)
        .map_err(|e| invalid(format!("cannot serialize tokenizer.json: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::ScratchDir;
    use std::str::FromStr;
    use tokenizers::Tokenizer;

    /// GPT-2's byte-to-character map: printable bytes map to themselves, the rest to U+0100 on.
    fn byte_chars() -> Vec<char> {
        let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
            .chain(0xA1..=0xAC)
            .chain(0xAE..=0xFF)
            .collect();
        let mut chars = vec!['\0'; 256];
        let mut next = 256u32;
        for b in 0..256u32 {
            if !printable.contains(&b) {
                printable.push(b);
                chars[b as usize] = char::from_u32(next).unwrap();
                next += 1;
            } else {
                chars[b as usize] = char::from_u32(b).unwrap();
            }
        }
        chars
    }

    /// A small vocabulary: two special tokens, the 256 byte characters, and a few merges.
    fn small_vocab() -> (Vec<String>, Vec<i64>, Vec<String>) {
        let mut tokens = vec!["<s>".to_string(), "<|end|>".to_string()];
        tokens.extend(byte_chars().into_iter().map(|c| c.to_string()));
        let merges = [
            "h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o", "r l", "Ġwo rl", "Ġworl d", "1 2",
            "12 3",
        ];
        let mut merge_strings = Vec::new();
        for m in merges {
            let (a, b) = m.split_once(' ').unwrap();
            tokens.push(format!("{a}{b}"));
            merge_strings.push(m.to_string());
        }
        let mut types = vec![1; tokens.len()];
        types[0] = TOKEN_TYPE_CONTROL;
        types[1] = TOKEN_TYPE_CONTROL;
        (tokens, types, merge_strings)
    }

    fn build(pre: &str, add_bos: Option<bool>) -> Result<Tokenizer, ModelError> {
        let (tokens, types, merges) = small_vocab();
        let vocab = GgufBpeVocab {
            tokens: tokens.iter().map(String::as_str).collect(),
            token_types: Some(types),
            merges: merges.iter().map(String::as_str).collect(),
            pre,
            bos_id: Some(0),
            eos_id: Some(1),
            add_bos,
            add_eos: None,
        };
        let json = byte_level_bpe_json(&vocab, Path::new("test.gguf"))?;
        Ok(Tokenizer::from_str(&json).unwrap())
    }

    fn id(token: &str) -> u32 {
        let (tokens, _, _) = small_vocab();
        tokens.iter().position(|t| t == token).unwrap() as u32
    }

    #[test]
    fn each_pre_type_splits_words_and_digits_as_named() {
        // "123" is one word for GPT-2 and Llama 3 (digits in runs of up to three), three words for
        // SmolLM and Qwen2 (one digit each): the merge "12 3" only fires in the first case.
        let cases = [
            ("gpt2", vec![id("hello"), id("Ġworld"), id("Ġ"), id("123")]),
            (
                "default",
                vec![id("hello"), id("Ġworld"), id("Ġ"), id("123")],
            ),
            (
                "smollm",
                vec![
                    id("hello"),
                    id("Ġworld"),
                    id("Ġ"),
                    id("1"),
                    id("2"),
                    id("3"),
                ],
            ),
            (
                "llama-bpe",
                vec![0, id("hello"), id("Ġworld"), id("Ġ"), id("123")],
            ),
            (
                "qwen2",
                vec![
                    id("hello"),
                    id("Ġworld"),
                    id("Ġ"),
                    id("1"),
                    id("2"),
                    id("3"),
                ],
            ),
        ];
        for (pre, expected) in cases {
            let tok = build(pre, None).unwrap();
            let enc = tok.encode("hello world 123", true).unwrap();
            assert_eq!(enc.get_ids(), expected.as_slice(), "{pre}");
            let decoded = tok.decode(enc.get_ids(), true).unwrap();
            assert_eq!(decoded, "hello world 123", "{pre}");
        }
    }

    #[test]
    fn special_tokens_are_matched_whole_and_bos_follows_the_flag() {
        let tok = build("smollm", Some(true)).unwrap();
        let enc = tok.encode("hello<|end|>", true).unwrap();
        assert_eq!(enc.get_ids(), &[0, id("hello"), 1]);
        let tok = build("llama-bpe", Some(false)).unwrap();
        assert_eq!(
            tok.encode("<s>hello", true).unwrap().get_ids(),
            &[0, id("hello")]
        );
    }

    #[test]
    fn unknown_pre_type_and_bad_vocab_are_errors() {
        let err = build("deepseek-llm", None).unwrap_err();
        assert!(
            matches!(&err, ModelError::UnsupportedPreTokenizer { pre, .. } if pre == "deepseek-llm"),
            "{err}"
        );
        let tokens = ["a", "b"];
        let bad_merges: [(&[&str], &str); 2] = [(&["ab"], "no space"), (&["a c"], "\"c\"")];
        for (merges, expected) in bad_merges {
            let vocab = GgufBpeVocab {
                tokens: tokens.to_vec(),
                token_types: None,
                merges: merges.to_vec(),
                pre: "gpt2",
                bos_id: None,
                eos_id: None,
                add_bos: None,
                add_eos: None,
            };
            let err = byte_level_bpe_json(&vocab, Path::new("t.gguf")).unwrap_err();
            assert!(err.to_string().contains(expected), "{err}");
        }
        let vocab = GgufBpeVocab {
            tokens: tokens.to_vec(),
            token_types: Some(vec![1]),
            merges: vec![],
            pre: "gpt2",
            bos_id: Some(7),
            eos_id: None,
            add_bos: None,
            add_eos: None,
        };
        let err = byte_level_bpe_json(&vocab, Path::new("t.gguf")).unwrap_err();
        assert!(
            err.to_string().contains("1 token types for 2 tokens"),
            "{err}"
        );
    }

    #[test]
    fn hf_directory_files_are_read_with_template_and_special_tokens() {
        let scratch = ScratchDir::new("hf-tokenizer");
        let dir = scratch.path();
        let tokenizer_json = build("gpt2", None).unwrap().to_string(false).unwrap();
        std::fs::write(dir.join("tokenizer.json"), &tokenizer_json).unwrap();

        let configs = [
            (
                r#"{"chat_template": "{{ messages }}", "bos_token": "<s>", "eos_token": {"content": "<|end|>", "lstrip": false}}"#,
                None,
                Some("{{ messages }}"),
                Some("<s>"),
                Some("<|end|>"),
            ),
            (
                r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}], "eos_token": null}"#,
                None,
                Some("D"),
                None,
                None,
            ),
            (
                r#"{"bos_token": "<s>"}"#,
                Some("from file"),
                Some("from file"),
                Some("<s>"),
                None,
            ),
        ];
        for (config, jinja, template, bos, eos) in configs {
            std::fs::write(dir.join("tokenizer_config.json"), config).unwrap();
            let jinja_path = dir.join("chat_template.jinja");
            match jinja {
                Some(t) => std::fs::write(&jinja_path, t).unwrap(),
                None => {
                    let _ = std::fs::remove_file(&jinja_path);
                }
            }
            let read = read_hf_tokenizer(dir).unwrap();
            let spec = read.spec.unwrap();
            assert_eq!(spec.tokenizer_json, tokenizer_json);
            assert_eq!(spec.chat_template.as_deref(), template, "{config}");
            assert_eq!(spec.bos_token.as_deref(), bos, "{config}");
            assert_eq!(spec.eos_token.as_deref(), eos, "{config}");
            let names: Vec<&str> = read.sources.iter().map(|s| s.name.as_str()).collect();
            let mut expected = vec!["tokenizer.json", "tokenizer_config.json"];
            if jinja.is_some() {
                expected.push("chat_template.jinja");
            }
            assert_eq!(names, expected);
        }

        std::fs::write(dir.join("tokenizer_config.json"), r#"{"chat_template": 5}"#).unwrap();
        let err = read_hf_tokenizer(dir).map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
        std::fs::write(dir.join("tokenizer_config.json"), "{").unwrap();
        let err = read_hf_tokenizer(dir).map(|_| ()).unwrap_err();
        assert!(matches!(err, ModelError::Json { .. }), "{err}");
    }

    #[test]
    fn sentencepiece_only_directory_has_a_note() {
        let scratch = ScratchDir::new("hf-spm");
        std::fs::write(scratch.path().join("tokenizer.model"), b"\x0a\x00").unwrap();
        let read = read_hf_tokenizer(scratch.path()).unwrap();
        assert!(read.spec.is_none());
        assert!(read.note.unwrap().contains("SentencePiece"));
        let empty = ScratchDir::new("hf-none");
        let read = read_hf_tokenizer(empty.path()).unwrap();
        assert!(read.spec.is_none() && read.note.is_none() && read.sources.is_empty());
    }
}
