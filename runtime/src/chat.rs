//! Chat templates: renders a conversation into the prompt text a model was trained on, from the
//! Jinja template shipped with the model (`tokenizer_config.json` or GGUF metadata).
//!
//! Rendering follows the conventions of Hugging Face `apply_chat_template`, so a prompt built
//! here matches one built there: `trim_blocks` and `lstrip_blocks` on, the globals `messages`,
//! `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception` and `strftime_now`,
//! Python string and dict methods (`.strip()`, `.startswith()`, `.items()`), and a `tojson`
//! that writes what Python's `json.dumps` writes.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Enumerator, Kwargs, Object, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};
use thiserror::Error;

const TEMPLATE_NAME: &str = "chat_template";

/// What can go wrong compiling or rendering a chat template.
#[derive(Debug, Error)]
pub enum ChatError {
    #[error("chat template does not compile{}: {detail}", at_line(*line))]
    Syntax { line: Option<usize>, detail: String },
    #[error("chat template raised an exception: {0}")]
    Raised(String),
    #[error("chat template failed to render{}: {detail}", at_line(*line))]
    Render { line: Option<usize>, detail: String },
}

fn at_line(line: Option<usize>) -> String {
    line.map(|line| format!(" at line {line}"))
        .unwrap_or_default()
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, or whatever else the template knows.
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A message as templates see it: a dict whose keys come in Python's order (`role`, then
/// `content`), which `tojson` keeps; minijinja's own maps would sort them.
#[derive(Debug)]
struct MessageObject(ChatMessage);

impl Object for MessageObject {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(Value::from(self.0.role.as_str())),
            "content" => Some(Value::from(self.0.content.as_str())),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

/// A compiled chat template and the special tokens it may refer to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
}

/// Carried as the source of the error `raise_exception` returns, so that rendering can tell a
/// deliberate refusal from a broken template.
#[derive(Debug, Error)]
#[error("{0}")]
struct RaisedException(String);

impl ChatTemplate {
    /// Compiles `source`. `bos_token` and `eos_token` are the texts of those tokens; a template
    /// that uses one that is `None` sees it undefined, which renders as nothing.
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", python_tojson);
        if let Some(bos) = bos_token {
            env.add_global("bos_token", bos);
        }
        if let Some(eos) = eos_token {
            env.add_global("eos_token", eos);
        }
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|err| ChatError::Syntax {
                line: err.line(),
                detail: describe(&err),
            })?;
        Ok(Self { env })
    }

    /// The prompt for `messages`; with `add_generation_prompt`, it ends with the header that
    /// opens the assistant's reply.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|err| render_error(&err))?;
        let context = minijinja::context! {
            messages => messages
                .iter()
                .map(|message| Value::from_object(MessageObject(message.clone())))
                .collect::<Vec<_>>(),
            add_generation_prompt => add_generation_prompt,
        };
        template.render(context).map_err(|err| render_error(&err))
    }
}

fn describe(err: &Error) -> String {
    match err.detail() {
        Some(detail) => format!("{}: {detail}", err.kind()),
        None => err.kind().to_string(),
    }
}

fn render_error(err: &Error) -> ChatError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(current) = cause {
        if let Some(RaisedException(message)) = current.downcast_ref::<RaisedException>() {
            return ChatError::Raised(message.clone());
        }
        cause = current.source();
    }
    ChatError::Render {
        line: err.line(),
        detail: describe(err),
    }
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone())
        .with_source(RaisedException(message)))
}

/// Today's date and time (UTC) in `format`, as Python's `datetime.now().strftime` writes it.
fn strftime_now(format: String) -> Result<String, Error> {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0);
    strftime_utc(&format, seconds)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// Formats `seconds` since the Unix epoch (UTC) with the common `strftime` specifiers.
fn strftime_utc(format: &str, seconds: u64) -> Result<String, Error> {
    let days = seconds / 86_400;
    let second_of_day = seconds % 86_400;
    let (hour, minute, second) = (
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60,
    );
    let (year, month, day) = civil_date(days);
    let weekday = WEEKDAYS[((days + 4) % 7) as usize]; // 1970-01-01 was a Thursday
    let month_name = MONTHS[(month - 1) as usize];
    let day_of_year = days - days_before_year(year) + 1;
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(spec) = chars.next() else {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "strftime_now format ends with a lone %",
            ));
        };
        let piece = match spec {
            'a' => weekday[..3].to_owned(),
            'A' => weekday.to_owned(),
            'b' | 'h' => month_name[..3].to_owned(),
            'B' => month_name.to_owned(),
            'd' => format!("{day:02}"),
            'e' => format!("{day:>2}"),
            'H' => format!("{hour:02}"),
            'I' => format!("{hour12:02}"),
            'j' => format!("{day_of_year:03}"),
            'm' => format!("{month:02}"),
            'M' => format!("{minute:02}"),
            'p' => (if hour < 12 { "AM" } else { "PM" }).to_owned(),
            'S' => format!("{second:02}"),
            'y' => format!("{:02}", year % 100),
            'Y' => year.to_string(),
            'F' => format!("{year}-{month:02}-{day:02}"),
            'T' => format!("{hour:02}:{minute:02}:{second:02}"),
            '%' => "%".to_owned(),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now does not support %{other}"),
                ))
            }
        };
        out.push_str(&piece);
    }
    Ok(out)
}

// `u64::is_multiple_of` is newer than the workspace's minimum Rust version.
#[allow(clippy::manual_is_multiple_of)]
fn is_leap(year: u64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_before_year(year: u64) -> u64 {
    (1970..year)
        .map(|y| if is_leap(y) { 366 } else { 365 })
        .sum()
}

/// (year, month 1-12, day 1-31) of the day `days` after 1970-01-01.
fn civil_date(mut days: u64) -> (u64, u64, u64) {
    let mut year = 1970;
    loop {
        let length = if is_leap(year) { 366 } else { 365 };
        if days < length {
            break;
        }
        days -= length;
        year += 1;
    }
    let february = if is_leap(year) { 29 } else { 28 };
    let lengths = [31, february, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let mut month = 1;
    for length in lengths {
        if days < length {
            break;
        }
        days -= length;
        month += 1;
    }
    (year, month, days + 1)
}

/// `tojson` as Hugging Face defines it: Python's `json.dumps` with `ensure_ascii=False` unless
/// asked, `", "` and `": "` separators, optional `indent` and `sort_keys`. minijinja's own
/// filter writes compact JSON and escapes HTML characters, which would change the prompt.
fn python_tojson(value: &Value, kwargs: Kwargs) -> Result<String, Error> {
    let options = JsonOptions {
        indent: kwargs.get::<Option<usize>>("indent")?,
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(value, &options, 0, &mut out)?;
    Ok(out)
}

struct JsonOptions {
    indent: Option<usize>,
    ensure_ascii: bool,
    sort_keys: bool,
}

fn write_json(
    value: &Value,
    options: &JsonOptions,
    depth: usize,
    out: &mut String,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            let number = serde_json::to_string(value).map_err(|err| {
                Error::new(ErrorKind::BadSerialization, "number is not JSON").with_source(err)
            })?;
            out.push_str(&number);
        }
        ValueKind::String => write_json_string(value.as_str().unwrap_or_default(), options, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(('[', ']'), items.len(), options, depth, out, |i, out| {
                write_json(&items[i], options, depth + 1, out)
            })?;
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if options.sort_keys {
                keys.sort();
            }
            write_container(('{', '}'), keys.len(), options, depth, out, |i, out| {
                let key = &keys[i];
                match key.as_str() {
                    Some(text) => write_json_string(text, options, out),
                    None => write_json_string(&key.to_string(), options, out),
                }
                out.push_str(": ");
                write_json(&value.get_item(key)?, options, depth + 1, out)
            })?;
        }
        _ => {
            return Err(Error::new(
                ErrorKind::BadSerialization,
                format!("cannot write a {} as JSON", value.kind()),
            ))
        }
    }
    Ok(())
}

fn write_container(
    (open, close): (char, char),
    len: usize,
    options: &JsonOptions,
    depth: usize,
    out: &mut String,
    mut write_item: impl FnMut(usize, &mut String) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if len == 0 {
        out.push(close);
        return Ok(());
    }
    for i in 0..len {
        match options.indent {
            Some(indent) => {
                if i > 0 {
                    out.push(',');
                }
                out.push('\n');
                out.push_str(&" ".repeat(indent * (depth + 1)));
            }
            None if i > 0 => out.push_str(", "),
            None => {}
        }
        write_item(i, out)?;
    }
    if let Some(indent) = options.indent {
        out.push('\n');
        out.push_str(&" ".repeat(indent * depth));
    }
    out.push(close);
    Ok(())
}

fn write_json_string(text: &str, options: &JsonOptions, out: &mut String) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (options.ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2's template, as shipped in its GGUF metadata.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// In the style of Llama 3: BOS from the global, headers per turn, and a refusal of roles it
    /// does not know.
    const LLAMA3_STYLE: &str = r#"{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}"#;

    /// In the style of Qwen: Python string methods, a namespace, and JSON of the messages.
    const QWEN_STYLE: &str = r#"{% set ns = namespace(system=false) %}
{% for message in messages %}
    {% if message.role == 'system' %}{% set ns.system = true %}{% endif %}
{% endfor %}
{% if not ns.system %}
<|im_start|>system
You are Qwen.<|im_end|>
{% endif %}
{% for message in messages %}
{% if message.content.startswith('/json') %}
<|im_start|>{{ message.role }}
{{ messages | tojson }}<|im_end|>
{% else %}
<|im_start|>{{ message.role }}
{{ message.content.strip() }}<|im_end|>
{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"#;

    /// Messages used as Python dicts, as some templates do.
    const DICT_METHODS: &str = "{% for m in messages %}{% for key, value in m.items() %}{{ key }}={{ value }};{% endfor %}{{ m.get('name', 'anon') }}{% if 'content' in m and 'name' not in m %}!{% endif %}{% endfor %}";

    fn conversation(turns: &[(&str, &str)]) -> Vec<ChatMessage> {
        turns
            .iter()
            .map(|&(role, content)| ChatMessage::new(role, content))
            .collect()
    }

    fn render(
        source: &str,
        turns: &[(&str, &str)],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let template = ChatTemplate::new(
            source,
            Some("<|begin_of_text|>".to_owned()),
            Some("<|eot_id|>".to_owned()),
        )?;
        template.render(&conversation(turns), add_generation_prompt)
    }

    /// (name, template, turns, add_generation_prompt, expected prompt)
    type RenderCase = (
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
        bool,
        &'static str,
    );

    /// Message contents are data: template syntax in them, including an attempt to include a
    /// file, comes out as written (the environment has no loader, so no template can read files).
    #[test]
    fn template_syntax_in_messages_is_never_evaluated() {
        let hostile = "{{ 7*7 }} {% include '/etc/passwd' %} {{ raise_exception('x') }}";
        for (label, source) in [("smollm2", SMOLLM2), ("llama3 style", LLAMA3_STYLE)] {
            let text = render(source, &[("user", hostile)], true).expect("renders");
            assert!(text.contains(hostile), "{label}: {text}");
            assert!(
                !text.contains("49") && !text.contains("root:"),
                "{label}: {text}"
            );
        }
        let including = "{% include '/etc/passwd' %}";
        assert!(render(including, &[], false).is_err());
    }

    #[test]
    fn renders_templates_as_hugging_face_does() {
        let cases: [RenderCase; 8] = [
            (
                "smollm2 adds its default system prompt",
                SMOLLM2,
                &[("user", "What is the capital of France?")],
                true,
                "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
            ),
            (
                "smollm2 keeps a given system prompt",
                SMOLLM2,
                &[("system", "Be brief."), ("user", "Hi")],
                false,
                "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
            ),
            (
                "llama3 style starts with bos and trims content",
                LLAMA3_STYLE,
                &[("system", "Be brief. "), ("user", " Hi\n")],
                true,
                "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            ),
            (
                "llama3 style without generation prompt",
                LLAMA3_STYLE,
                &[("user", "Hi")],
                false,
                "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
            ),
            (
                "qwen style strips and adds a system prompt",
                QWEN_STYLE,
                &[("user", "  Hello there \n")],
                true,
                "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n",
            ),
            (
                "qwen style keeps a given system prompt",
                QWEN_STYLE,
                &[("system", "S"), ("user", "U")],
                false,
                "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n",
            ),
            (
                "qwen style writes json as python does",
                QWEN_STYLE,
                &[("system", "S"), ("user", "/json <é> \"q\"")],
                false,
                "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n[{\"role\": \"system\", \"content\": \"S\"}, {\"role\": \"user\", \"content\": \"/json <é> \\\"q\\\"\"}]<|im_end|>\n",
            ),
            (
                "messages behave as python dicts with keys in order",
                DICT_METHODS,
                &[("user", "hi"), ("assistant", "yo")],
                false,
                "role=user;content=hi;anon!role=assistant;content=yo;anon!",
            ),
        ];
        for (name, source, turns, add_generation_prompt, expected) in cases {
            let rendered = render(source, turns, add_generation_prompt)
                .unwrap_or_else(|err| panic!("{name}: {err}"));
            assert_eq!(rendered, expected, "{name}");
        }
    }

    #[test]
    fn raise_exception_becomes_a_raised_error() {
        let err = render(LLAMA3_STYLE, &[("tool", "x")], true).unwrap_err();
        match err {
            ChatError::Raised(message) => assert_eq!(message, "Unknown role: tool"),
            other => panic!("expected a raised exception, got {other:?}"),
        }
    }

    #[test]
    fn missing_special_tokens_render_as_nothing() {
        let template = ChatTemplate::new("[{{ bos_token }}|{{ eos_token }}]", None, None).unwrap();
        assert_eq!(template.render(&[], false).unwrap(), "[|]");
    }

    #[test]
    fn compile_errors_name_the_line() {
        let cases = [
            ("{% for m in messages %}\n{{ m.content }}\n{% endif %}", 3),
            ("ok\n\n{{ messages[0 }}", 3),
            ("{% if x %}", 1),
        ];
        for (source, line) in cases {
            match ChatTemplate::new(source, None, None) {
                Err(ChatError::Syntax { line: got, detail }) => {
                    assert_eq!(got, Some(line), "{source:?}: {detail}");
                    assert!(!detail.is_empty());
                }
                other => panic!("{source:?}: expected a syntax error, got {other:?}"),
            }
        }
    }

    #[test]
    fn render_errors_are_not_raised_exceptions() {
        let err = render("line one\n{{ messages | no_such_filter }}", &[], false).unwrap_err();
        assert!(
            matches!(err, ChatError::Render { line: Some(2), .. }),
            "{err:?}"
        );
    }

    #[test]
    fn tojson_follows_python_json_dumps() {
        let cases = [
            (
                "{{ {'a': [1, 2.5, none, true]} | tojson }}",
                r#"{"a": [1, 2.5, null, true]}"#,
            ),
            ("{{ [] | tojson }}{{ {} | tojson(indent=2) }}", "[]{}"),
            (
                "{{ {'b': 1, 'a': [1]} | tojson(indent=2, sort_keys=true) }}",
                "{\n  \"a\": [\n    1\n  ],\n  \"b\": 1\n}",
            ),
            ("{{ 'é\t<&>' | tojson }}", "\"é\\t<&>\""),
            (
                "{{ 'é😀' | tojson(ensure_ascii=true) }}",
                r#""\u00e9\ud83d\ude00""#,
            ),
        ];
        for (source, expected) in cases {
            let template = ChatTemplate::new(source, None, None).unwrap();
            assert_eq!(template.render(&[], false).unwrap(), expected, "{source}");
        }
    }

    #[test]
    fn strftime_formats_utc_dates() {
        // (seconds since the epoch, format, expected)
        let cases = [
            (0, "%d %b %Y", "01 Jan 1970"),
            (0, "%A %a %j", "Thursday Thu 001"),
            (951_782_400, "%Y-%m-%d %B", "2000-02-29 February"),
            (1_709_251_199, "%F %T %I%p", "2024-02-29 23:59:59 11PM"),
            (1_735_689_599, "%d %B %Y %j %y", "31 December 2024 366 24"),
            (1_735_732_800, "%e %h %H:%M 100%%", " 1 Jan 12:00 100%"),
        ];
        for (seconds, format, expected) in cases {
            assert_eq!(strftime_utc(format, seconds).unwrap(), expected, "{format}");
        }
        for format in ["%Q", "50%"] {
            assert!(strftime_utc(format, 0).is_err(), "{format}");
        }
    }

    #[test]
    fn strftime_now_is_usable_from_templates() {
        let template = ChatTemplate::new("{{ strftime_now('%Y') }}", None, None).unwrap();
        let year: u32 = template.render(&[], false).unwrap().parse().unwrap();
        assert!(year >= 2024, "{year}");
    }
}
