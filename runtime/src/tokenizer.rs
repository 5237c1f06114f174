//! Text to token ids and back: [`TextTokenizer`] wraps a Hugging Face `tokenizer.json`, and
//! [`StreamDecoder`] turns generated ids into text as they arrive, holding back bytes until they
//! form whole UTF-8 characters.
//!
//! The tokenizer does what its JSON configures and nothing more: special tokens written in the
//! text (`<|im_start|>`) become their ids, and `encode` adds only what the JSON's post-processor
//! adds. Truncation and padding are switched off because a prompt silently cut or padded would
//! be a different prompt.

use thiserror::Error;

/// What can go wrong turning text into ids or ids into text.
#[derive(Debug, Error)]
pub enum TokenizerError {
    #[error("tokenizer.json does not load: {0}")]
    Load(#[source] tokenizers::Error),
    #[error("cannot encode text: {0}")]
    Encode(#[source] tokenizers::Error),
    #[error("cannot decode token ids: {0}")]
    Decode(#[source] tokenizers::Error),
    #[error("stream decoding went out of step: text of earlier tokens changed after token {id}")]
    StreamOutOfStep { id: u32 },
}

/// A Hugging Face tokenizer, loaded from the text of a `tokenizer.json`.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl TextTokenizer {
    /// Loads a tokenizer from the contents of a `tokenizer.json`.
    pub fn from_json(json: &str) -> Result<Self, TokenizerError> {
        let mut inner: tokenizers::Tokenizer = json.parse().map_err(TokenizerError::Load)?;
        inner.with_truncation(None).map_err(TokenizerError::Load)?;
        inner.with_padding(None);
        Ok(Self { inner })
    }

    /// Token ids of `text`, with whatever the JSON's post-processor adds (a BOS, for some
    /// models).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode_with(text, true)
    }

    /// Token ids of `text` without the post-processor's additions: for text that already carries
    /// them, such as a rendered chat template that starts with the BOS token.
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode_with(text, false)
    }

    fn encode_with(&self, text: &str, post_process: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode_fast(text, post_process)
            .map_err(TokenizerError::Encode)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens included. Bytes that do not form UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, false)
            .map_err(TokenizerError::Decode)
    }

    /// Id of a token written exactly as in the vocabulary (`<|im_end|>`, `Ġthe`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of distinct ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// A decoder for one stream of generated ids.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self)
    }
}

/// Decodes generated ids one at a time into the text they complete.
///
/// Each push decodes a short window: the ids of the previous emitted chunk (so decoders that
/// look at neighbours, such as one dropping a leading space, see the same context as a full
/// decode) and the ids not yet emitted. Text is released only when it does not end in U+FFFD,
/// i.e. when the bytes so far form whole characters. Pushes followed by [`StreamDecoder::finish`]
/// concatenate to `decode` of all ids.
#[derive(Debug)]
pub struct StreamDecoder<'t> {
    tokenizer: &'t TextTokenizer,
    ids: Vec<u32>,
    /// Start of the window: the first id of the last emitted chunk.
    prefix_start: usize,
    /// End of what has been emitted.
    emitted_end: usize,
}

impl<'t> StreamDecoder<'t> {
    pub fn new(tokenizer: &'t TextTokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix_start: 0,
            emitted_end: 0,
        }
    }

    /// Adds one id; returns the text it completes, empty while a character is still partial.
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let (prefix, window) = self.decode_window()?;
        if window.len() <= prefix.len() || window.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(String::new());
        }
        let fresh = Self::fresh_text(&prefix, &window, id)?;
        self.prefix_start = self.emitted_end;
        self.emitted_end = self.ids.len();
        Ok(fresh)
    }

    /// Text still held back at the end of the stream (a character cut off by the last id comes
    /// out as U+FFFD, as in a full decode).
    pub fn finish(self) -> Result<String, TokenizerError> {
        let Some(&last) = self.ids.last() else {
            return Ok(String::new());
        };
        if self.emitted_end == self.ids.len() {
            return Ok(String::new());
        }
        let (prefix, window) = self.decode_window()?;
        Self::fresh_text(&prefix, &window, last)
    }

    /// Ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    fn decode_window(&self) -> Result<(String, String), TokenizerError> {
        let prefix = self
            .tokenizer
            .decode(&self.ids[self.prefix_start..self.emitted_end])?;
        let window = self.tokenizer.decode(&self.ids[self.prefix_start..])?;
        Ok((prefix, window))
    }

    fn fresh_text(prefix: &str, window: &str, id: u32) -> Result<String, TokenizerError> {
        window
            .strip_prefix(prefix)
            .map(str::to_owned)
            .ok_or(TokenizerError::StreamOutOfStep { id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The GPT-2 byte-level alphabet: printable bytes stand for themselves, the rest are moved
    /// to U+0100 and up in byte order.
    fn byte_char(byte: u8) -> char {
        let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        if printable(byte) {
            return char::from(byte);
        }
        let shifted = (0..byte).filter(|&b| !printable(b)).count() as u32;
        char::from_u32(256 + shifted).unwrap_or(char::REPLACEMENT_CHARACTER)
    }

    const HELLO: u32 = 259;
    const SPACE_W: u32 = 260;
    const EMOJI_HEAD: u32 = 261;
    const EMOJI_TAIL: u32 = 262;
    const IM_START: u32 = 263;
    const IM_END: u32 = 264;
    const BOS: u32 = 265;

    /// Byte tokens 0..=255 carry their byte value as id; a few merges make longer tokens, and
    /// the smiling-face emoji (F0 9F 98 80) ends up as two tokens of two bytes each, while "é"
    /// (C3 A9) stays two single-byte tokens.
    fn tiny_tokenizer_json(post_processor: serde_json::Value) -> String {
        let mut vocab = serde_json::Map::new();
        for byte in 0..=255u8 {
            vocab.insert(byte_char(byte).to_string(), json!(byte));
        }
        let merged = [
            ("h", "e", 256),
            ("l", "l", 257),
            ("he", "ll", 258),
            ("hell", "o", HELLO),
            ("Ġ", "w", SPACE_W),
            ("ð", "Ł", EMOJI_HEAD),
            ("ĺ", "Ģ", EMOJI_TAIL),
        ];
        let mut merges = Vec::new();
        for (left, right, id) in merged {
            vocab.insert(format!("{left}{right}"), json!(id));
            merges.push(format!("{left} {right}"));
        }
        let added = |id: u32, content: &str| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        };
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [added(IM_START, "<|im_start|>"), added(IM_END, "<|im_end|>"),
                             added(BOS, "<s>")],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false,
                              "trim_offsets": true, "use_regex": true},
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                        "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges}
        })
        .to_string()
    }

    fn tiny_tokenizer() -> TextTokenizer {
        TextTokenizer::from_json(&tiny_tokenizer_json(serde_json::Value::Null))
            .expect("test tokenizer loads")
    }

    fn bytes(text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    fn encode_cases() -> Vec<(&'static str, Vec<u32>)> {
        vec![
            ("hello", vec![HELLO]),
            (
                "hello world",
                [vec![HELLO, SPACE_W], bytes("orld")].concat(),
            ),
            ("é", vec![0xC3, 0xA9]),
            ("café", [bytes("caf"), vec![0xC3, 0xA9]].concat()),
            ("😀", vec![EMOJI_HEAD, EMOJI_TAIL]),
            ("<|im_start|>user\nhi<|im_end|>", {
                [vec![IM_START], bytes("user\nhi"), vec![IM_END]].concat()
            }),
            ("a<s>b", vec![u32::from(b'a'), BOS, u32::from(b'b')]),
        ]
    }

    #[test]
    fn encodes_bytes_merges_and_special_tokens() {
        let tokenizer = tiny_tokenizer();
        for (text, ids) in encode_cases() {
            assert_eq!(tokenizer.encode(text).unwrap(), ids, "encode {text:?}");
            assert_eq!(
                tokenizer.encode_raw(text).unwrap(),
                ids,
                "encode_raw {text:?}"
            );
            assert_eq!(tokenizer.decode(&ids).unwrap(), text, "decode {ids:?}");
        }
    }

    #[test]
    fn post_processor_additions_come_only_from_the_json() {
        let with_bos = json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS], "tokens": ["<s>"]}}
        });
        let tokenizer = TextTokenizer::from_json(&tiny_tokenizer_json(with_bos)).unwrap();
        assert_eq!(tokenizer.encode("hello").unwrap(), vec![BOS, HELLO]);
        assert_eq!(tokenizer.encode_raw("<s>hello").unwrap(), vec![BOS, HELLO]);
    }

    #[test]
    fn looks_up_tokens_and_counts_the_vocabulary() {
        let tokenizer = tiny_tokenizer();
        let cases = [
            ("<|im_start|>", Some(IM_START)),
            ("<|im_end|>", Some(IM_END)),
            ("hello", Some(HELLO)),
            ("Ġw", Some(SPACE_W)),
            ("a", Some(u32::from(b'a'))),
            ("<|missing|>", None),
        ];
        for (token, id) in cases {
            assert_eq!(tokenizer.token_id(token), id, "{token:?}");
        }
        assert_eq!(tokenizer.vocab_size(), 266);
    }

    #[test]
    fn rejects_malformed_json() {
        for json in ["", "{", "{\"model\": 3}"] {
            assert!(TextTokenizer::from_json(json).is_err(), "{json:?}");
        }
    }

    #[test]
    fn stream_holds_back_partial_characters() {
        let tokenizer = tiny_tokenizer();
        // (id pushed, text that push must return)
        let steps = [
            (HELLO, "hello"),
            (EMOJI_HEAD, ""),
            (EMOJI_TAIL, "😀"),
            (0xC3, ""),
            (0xA9, "é"),
            (SPACE_W, " w"),
            (IM_END, "<|im_end|>"),
        ];
        let mut stream = tokenizer.stream_decoder();
        for (id, expected) in steps {
            assert_eq!(stream.push(id).unwrap(), expected, "after id {id}");
        }
        assert_eq!(stream.finish().unwrap(), "");
    }

    #[test]
    fn stream_concatenation_equals_full_decode() {
        let tokenizer = tiny_tokenizer();
        let mut sequences: Vec<Vec<u32>> = encode_cases().into_iter().map(|(_, ids)| ids).collect();
        sequences.extend([
            vec![],
            vec![EMOJI_HEAD],
            vec![HELLO, 0xC3],
            vec![0xA9, HELLO],
            vec![EMOJI_HEAD, HELLO, EMOJI_TAIL],
            vec![0xC3, EMOJI_HEAD, EMOJI_TAIL, 0xA9, SPACE_W],
            encode_cases()
                .into_iter()
                .flat_map(|(_, ids)| ids)
                .collect(),
        ]);
        for ids in sequences {
            let mut stream = tokenizer.stream_decoder();
            let mut text = String::new();
            for &id in &ids {
                text.push_str(&stream.push(id).unwrap());
            }
            assert_eq!(stream.ids(), ids.as_slice());
            text.push_str(&stream.finish().unwrap());
            assert_eq!(text, tokenizer.decode(&ids).unwrap(), "ids {ids:?}");
        }
    }
}
