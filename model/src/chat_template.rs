//! `ChatTemplate`: a checkpoint's own Jinja `chat_template` (from `tokenizer_config.json` or
//! `chat_template.jinja`), rendered with minijinja exactly as transformers' `apply_chat_template`
//! renders it, so a base model sees prompts in the format it was tuned on.
//!
//! transformers renders in a Jinja2 sandbox with `trim_blocks` and `lstrip_blocks` on, the loop
//! controls extension, the special-token strings (`bos_token`, `eos_token`, `pad_token`,
//! `unk_token`) as variables and the globals `raise_exception(msg)` and `strftime_now(fmt)`;
//! templates also call Python string methods (`content.strip()`, `.startswith(...)`), which
//! minijinja-contrib's `pycompat` callback provides. We do the same. Rendering one conversation
//! (a system message and a user message) with `add_generation_prompt=True` is the prompt MedTVT
//! feeds the model; `model/tests/chatml_base.rs` checks it byte for byte against transformers.

use minijinja::value::Value;
use minijinja::{Environment, Error, ErrorKind};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The name the template is registered under inside its environment.
const NAME: &str = "chat_template";

/// Why a template could not be compiled or rendered; names the file it came from.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("{origin}: the chat template does not compile: {message}")]
    Compile { origin: PathBuf, message: String },
    #[error("{origin}: rendering the chat template failed: {message}")]
    Render { origin: PathBuf, message: String },
}

/// The special-token strings a template may print (`{{ bos_token }}`); unset ones are undefined
/// in the template, as in transformers when the tokenizer has none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplateTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
}

/// A compiled chat template and the file it came from.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    origin: PathBuf,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("origin", &self.origin).finish()
    }
}

impl ChatTemplate {
    /// Compiles `source` with transformers' Jinja settings; `origin` names it in errors.
    pub fn new(source: String, origin: &Path) -> Result<ChatTemplate, ChatTemplateError> {
        let mut env = Environment::new();
        let mut syntax = minijinja::syntax::SyntaxConfig::builder();
        syntax.trim_blocks(true).lstrip_blocks(true);
        let syntax = syntax.build().map_err(|e| compile_error(origin, &e))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.clone()).map_err(|e| compile_error(origin, &e))?;
        Ok(ChatTemplate { env, source, origin: origin.to_path_buf() })
    }

    /// The Jinja source, as written to `tokenizer_config.json`.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The file the template came from (or a description, for the built-in tiny template).
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// `apply_chat_template([{system}, {user}], add_generation_prompt=True, tokenize=False)`;
    /// an empty `system` leaves the system message out.
    pub fn render_prompt(
        &self,
        system: &str,
        user: &str,
        tokens: &TemplateTokens,
    ) -> Result<String, ChatTemplateError> {
        let message = |role: &str, content: &str| {
            Value::from(BTreeMap::from([("role", Value::from(role)), ("content", Value::from(content))]))
        };
        let mut messages = Vec::with_capacity(2);
        if !system.is_empty() {
            messages.push(message("system", system));
        }
        messages.push(message("user", user));
        let mut context: BTreeMap<&str, Value> =
            BTreeMap::from([("messages", Value::from(messages)), ("add_generation_prompt", Value::from(true))]);
        for (name, token) in [
            ("bos_token", &tokens.bos_token),
            ("eos_token", &tokens.eos_token),
            ("pad_token", &tokens.pad_token),
            ("unk_token", &tokens.unk_token),
        ] {
            if let Some(token) = token {
                context.insert(name, Value::from(token.as_str()));
            }
        }
        let render_error = |e: Error| ChatTemplateError::Render { origin: self.origin.clone(), message: describe(&e) };
        let template = self.env.get_template(NAME).map_err(render_error)?;
        template.render(Value::from(context)).map_err(render_error)
    }
}

fn compile_error(origin: &Path, e: &Error) -> ChatTemplateError {
    ChatTemplateError::Compile { origin: origin.to_path_buf(), message: describe(e) }
}

/// The error with its line, when minijinja knows it.
fn describe(e: &Error) -> String {
    match e.line() {
        Some(line) => format!("{e} (template line {line})"),
        None => e.to_string(),
    }
}

/// The template's own error (e.g. "Conversation roles must alternate"), raised as in Jinja.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Python's `datetime.now().strftime(format)` in UTC for the directives chat templates use
/// (Llama 3.x prints "Today Date: 02 Dec 2026"): %d %m %y %Y %b %B %a %A %H %M %S %j %%.
fn strftime_now(format: String) -> Result<String, Error> {
    let seconds = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    strftime(&format, seconds)
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
const WEEKDAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

/// `format` applied to the UTC time `seconds` after the Unix epoch.
fn strftime(format: &str, seconds: u64) -> Result<String, Error> {
    let days = (seconds / 86_400) as i64;
    let (year, month, day) = civil_from_days(days);
    let secs_of_day = seconds % 86_400;
    let weekday = ((days % 7 + 7 + 3) % 7) as usize; // 1970-01-01 was a Thursday (index 3)
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let month_name = MONTHS[(month - 1) as usize];
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('a') => out.push_str(&WEEKDAYS[weekday][..3]),
            Some('A') => out.push_str(WEEKDAYS[weekday]),
            Some('H') => out.push_str(&format!("{:02}", secs_of_day / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs_of_day / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs_of_day % 60)),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('%') => out.push('%'),
            other => {
                let directive = other.map(|c| format!("%{c}")).unwrap_or_else(|| "a trailing %".into());
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: {directive} is not supported"),
                ));
            }
        }
    }
    Ok(out)
}

/// (year, month, day) of the proleptic Gregorian calendar, `days` after 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days from 1970-01-01 to the given date (the inverse of [`civil_from_days`]).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate::new(source.to_string(), Path::new("test/tokenizer_config.json")).unwrap()
    }

    #[test]
    fn block_tags_on_their_own_lines_leave_no_whitespace_as_in_transformers() {
        // trim_blocks removes the newline after a block tag, lstrip_blocks the indentation
        // before one; a variable's own newline stays.
        let t = template("{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n");
        assert_eq!(t.render_prompt("sys", "hi", &TemplateTokens::default()).unwrap(), "[hi]\n");
    }

    #[test]
    fn python_string_methods_special_tokens_and_loop_controls_work() {
        let t = template(
            "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}\
{{ m['content'].strip().upper() }}{% if m.content.startswith(' ') %}!{% endif %}{% endfor %}\
{% if add_generation_prompt %}{{ eos_token }}{% endif %}{% if pad_token is defined %}P{% endif %}",
        );
        let tokens = TemplateTokens {
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            ..TemplateTokens::default()
        };
        assert_eq!(t.render_prompt("system", " ask ", &tokens).unwrap(), "<s>ASK!</s>");
    }

    #[test]
    fn errors_name_the_file_and_the_templates_own_message() {
        let err =
            ChatTemplate::new("{% for %}".into(), Path::new("base/tokenizer_config.json")).unwrap_err().to_string();
        assert!(err.starts_with("base/tokenizer_config.json: the chat template does not compile"), "{err}");
        let t = template(
            "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}",
        );
        let err = t.render_prompt("sys", "q", &TemplateTokens::default()).unwrap_err().to_string();
        assert!(err.contains("test/tokenizer_config.json") && err.contains("System role not supported"), "{err}");
        // Without a system prompt the same template renders.
        assert_eq!(t.render_prompt("", "q", &TemplateTokens::default()).unwrap(), "");
    }

    #[test]
    fn strftime_formats_dates_like_python() {
        // 2024-07-26 12:34:56 UTC, a Friday (Llama 3.1's default "Today Date").
        let t = 1_721_997_296;
        assert_eq!(strftime("%d %b %Y", t).unwrap(), "26 Jul 2024");
        assert_eq!(strftime("%A %B %d, %y %H:%M:%S %j %%", t).unwrap(), "Friday July 26, 24 12:34:56 208 %");
        assert_eq!(strftime("%Y-%m-%d %a", 0).unwrap(), "1970-01-01 Thu");
        assert_eq!(strftime("%Y-%m-%d", 951_782_400).unwrap(), "2000-02-29");
        assert!(strftime("%Q", t).unwrap_err().to_string().contains("%Q"));
        assert!(
            template("{{ strftime_now('%Y') }}").render_prompt("", "", &TemplateTokens::default()).unwrap().len() == 4
        );
    }
}
