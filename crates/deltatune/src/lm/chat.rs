//! Chat templates: the Jinja template a model file carries (GGUF `tokenizer.chat_template`, or
//! `chat_template` in tokenizer_config.json), rendered with minijinja the way transformers'
//! `apply_chat_template` renders it with Jinja2 (`trim_blocks`, `lstrip_blocks`, Python string
//! methods, `raise_exception`), with `messages`, `add_generation_prompt`, `bos_token` and
//! `eos_token` in the context.

use crate::error::{Error, Result};
use minijinja::{Environment, ErrorKind, Value};

/// The template used for Gemma files that carry none (the Gemma 3 GGUF does not): Gemma's turn
/// format, written here — a system message is put in front of the first user turn, `assistant`
/// is called `model`, and the generation prompt opens a model turn.
pub const GEMMA_TEMPLATE: &str = "{{ bos_token }}\
{%- if messages[0]['role'] == 'system' -%}\
{%- set first_prefix = messages[0]['content'] | trim ~ '\n\n' -%}{%- set turns = messages[1:] -%}\
{%- else -%}{%- set first_prefix = '' -%}{%- set turns = messages -%}{%- endif -%}\
{%- for message in turns -%}\
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\
{{ raise_exception('conversation roles must alternate user/assistant/user/assistant/...') }}\
{%- endif -%}\
<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n\
{{ (first_prefix if loop.first else '') ~ message['content'] | trim }}<end_of_turn>\n\
{% endfor -%}\
{%- if add_generation_prompt -%}<start_of_turn>model\n{% endif %}";

/// Renders `template` for `messages` (role, content).
pub fn render(
    template: &str,
    messages: &[(&str, &str)],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, minijinja::Error> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
    });
    let terr = |e: minijinja::Error| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        Error::arg("--chat", format!("the model's chat template cannot be rendered: {msg}"))
    };
    env.add_template("chat", template).map_err(terr)?;
    let msgs: Vec<Value> = messages
        .iter()
        .map(|(r, c)| Value::from_iter([("role", Value::from(*r)), ("content", Value::from(*c))]))
        .collect();
    let ctx = minijinja::context! {
        messages => msgs,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token.unwrap_or(""),
        eos_token => eos_token.unwrap_or(""),
    };
    env.get_template("chat").and_then(|t| t.render(ctx)).map_err(terr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma_template_renders_turns() {
        let s = render(GEMMA_TEMPLATE, &[("system", "Be brief."), ("user", "Hi "), ("assistant", "Hello"), ("user", "2+2?")], true, Some("<bos>"), None)
            .unwrap();
        assert_eq!(
            s,
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn failures_say_why() {
        let e = render(GEMMA_TEMPLATE, &[("assistant", "x")], true, None, None).unwrap_err().to_string();
        assert!(e.contains("roles must alternate"), "{e}");
        let e = render("{% for m in messages %}", &[("user", "x")], true, None, None).unwrap_err().to_string();
        assert!(e.contains("chat template cannot be rendered"), "{e}");
    }
}
