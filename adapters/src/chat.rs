//! Conversations as prompts: the turns of a chat rendered in the layout the
//! model was instruction-tuned with.
//!
//! A model's chat template is a Jinja program (`tokenizer.chat_template` in
//! a GGUF, `chat_template` in `tokenizer_config.json`); fedtune carries no
//! Jinja engine, so it recognizes the layouts today's small models use
//! and renders them natively: ChatML (`<|im_start|>role … <|im_end|>`:
//! SmolLM2, Qwen2.5), Llama 3 (`<|start_header_id|>role<|end_header_id|>
//! … <|eot_id|>`) and Gemma (`<start_of_turn>user … <end_of_turn>`, the
//! assistant called `model`, a system prompt folded into the first user
//! turn). A model with none of them (Mistral's `[INST]` among them, or no
//! template, as fedtune's tiny test models) gets a plain `User:` /
//! `Assistant:` transcript. A default
//! system prompt written literally in a ChatML template (SmolLM2's "You are
//! a helpful AI assistant named SmolLM…") is used when the caller gives
//! none, as the template itself would.

use crate::tokenizer::TextTokenizer;

/// Who said a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Instructions to the assistant, before the conversation.
    System,
    /// The person.
    User,
    /// The model.
    Assistant,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// Its speaker.
    pub role: Role,
    /// What was said.
    pub content: String,
}

impl Turn {
    /// A turn of `role` saying `content`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// How a model expects a conversation laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatLayout {
    /// `<|im_start|>{role}\n{content}<|im_end|>\n`, with the template's
    /// literal default system prompt, if it has one.
    ChatMl {
        /// The system prompt the template adds when the conversation has none.
        default_system: Option<String>,
    },
    /// `<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>`
    /// after `<|begin_of_text|>` (which the tokenizer may add itself).
    Llama3,
    /// `<start_of_turn>{user|model}\n{content}<end_of_turn>\n`; a system
    /// turn is put before the first user turn's content.
    Gemma,
    /// `User: …` / `Assistant: …` lines: for models without a known template.
    Plain,
}

const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";
const HEADER_START: &str = "<|start_header_id|>";
const HEADER_END: &str = "<|end_header_id|>";
const EOT: &str = "<|eot_id|>";
const TURN_START: &str = "<start_of_turn>";
const TURN_END: &str = "<end_of_turn>";

impl ChatLayout {
    /// The layout of `tok`'s model, from its chat template.
    pub fn of(tok: &TextTokenizer) -> Self {
        Self::from_template(tok.chat_template.as_deref())
    }

    /// The layout a chat template's text describes (`None`: no template).
    pub fn from_template(template: Option<&str>) -> Self {
        let Some(t) = template else {
            return ChatLayout::Plain;
        };
        if t.contains(IM_START) && t.contains(IM_END) {
            ChatLayout::ChatMl {
                default_system: literal_system(t),
            }
        } else if t.contains(HEADER_START) && t.contains(EOT) {
            ChatLayout::Llama3
        } else if t.contains(TURN_START) && t.contains(TURN_END) {
            ChatLayout::Gemma
        } else {
            ChatLayout::Plain
        }
    }

    /// A name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            ChatLayout::ChatMl { .. } => "ChatML",
            ChatLayout::Llama3 => "Llama 3",
            ChatLayout::Gemma => "Gemma",
            ChatLayout::Plain => "plain User:/Assistant:",
        }
    }

    /// `turns` as a prompt that ends where the assistant's next reply begins.
    pub fn render(&self, turns: &[Turn]) -> String {
        let mut out = String::new();
        match self {
            ChatLayout::ChatMl { default_system } => {
                let has_system = turns.first().is_some_and(|t| t.role == Role::System);
                if let (false, Some(system)) = (has_system, default_system) {
                    out.push_str(&format!("{IM_START}system\n{system}{IM_END}\n"));
                }
                for t in turns {
                    out.push_str(&format!(
                        "{IM_START}{}\n{}{IM_END}\n",
                        t.role.name(),
                        t.content
                    ));
                }
                out.push_str(&format!("{IM_START}assistant\n"));
            }
            ChatLayout::Llama3 => {
                for t in turns {
                    out.push_str(&format!(
                        "{HEADER_START}{}{HEADER_END}\n\n{}{EOT}",
                        t.role.name(),
                        t.content.trim()
                    ));
                }
                out.push_str(&format!("{HEADER_START}assistant{HEADER_END}\n\n"));
            }
            ChatLayout::Gemma => {
                let mut system = None;
                for t in turns {
                    let (who, text) = match t.role {
                        Role::System => {
                            system = Some(t.content.trim().to_string());
                            continue;
                        }
                        Role::User => match system.take() {
                            Some(s) => ("user", format!("{s}\n\n{}", t.content.trim())),
                            None => ("user", t.content.trim().to_string()),
                        },
                        Role::Assistant => ("model", t.content.trim().to_string()),
                    };
                    out.push_str(&format!("{TURN_START}{who}\n{text}{TURN_END}\n"));
                }
                out.push_str(&format!("{TURN_START}model\n"));
            }
            ChatLayout::Plain => {
                for t in turns {
                    let who = match t.role {
                        Role::System => "System",
                        Role::User => "User",
                        Role::Assistant => "Assistant",
                    };
                    out.push_str(&format!("{who}: {}\n", t.content));
                }
                out.push_str("Assistant:");
            }
        }
        out
    }

    /// Where a reply ends, besides the end-of-sequence token.
    pub fn stops(&self) -> Vec<String> {
        match self {
            ChatLayout::ChatMl { .. } => vec![IM_END.into(), IM_START.into()],
            ChatLayout::Llama3 => vec![EOT.into(), HEADER_START.into()],
            ChatLayout::Gemma => vec![TURN_END.into(), TURN_START.into()],
            ChatLayout::Plain => vec!["\nUser:".into()],
        }
    }
}

/// The system prompt a ChatML template writes out literally
/// (`'<|im_start|>system\n…<|im_end|>'` with no template code inside).
fn literal_system(template: &str) -> Option<String> {
    // The newline is a `\n` escape inside a Jinja string, or a real one.
    let start = [
        format!("{IM_START}system\\n"),
        format!("{IM_START}system\n"),
    ]
    .iter()
    .find_map(|open| template.find(open.as_str()).map(|at| at + open.len()))?;
    let rest = &template[start..];
    let text = &rest[..rest.find(IM_END)?];
    let literal = !text.contains(['{', '}', '\'', '"', '+']) && !text.trim().is_empty();
    literal.then(|| text.replace("\\n", "\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's template, as its GGUF holds it.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn chatml_renders_as_smollm2s_template_does() {
        let layout = ChatLayout::from_template(Some(SMOLLM2));
        let system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
        assert_eq!(
            layout,
            ChatLayout::ChatMl {
                default_system: Some(system.into())
            }
        );
        let turns = [
            Turn::new(Role::User, "Hi"),
            Turn::new(Role::Assistant, "Hello!"),
            Turn::new(Role::User, "2+2?"),
        ];
        assert_eq!(
            layout.render(&turns),
            format!(
                "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
                 <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n\
                 <|im_start|>assistant\n"
            )
        );
        // A system turn of the caller's replaces the default.
        let own = [
            Turn::new(Role::System, "Be brief."),
            Turn::new(Role::User, "Hi"),
        ];
        assert_eq!(
            layout.render(&own),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(layout.stops()[0], "<|im_end|>");
    }

    #[test]
    fn other_templates_are_recognized_or_fall_back_to_plain() {
        // Qwen2.5's default system prompt sits inside template code: not literal.
        let qwen = "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}";
        assert_eq!(
            ChatLayout::from_template(Some(qwen)),
            ChatLayout::ChatMl {
                default_system: None
            }
        );
        let llama3 = "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}";
        let layout = ChatLayout::from_template(Some(llama3));
        assert_eq!(layout, ChatLayout::Llama3);
        assert_eq!(
            layout.render(&[Turn::new(Role::User, " Hi ")]),
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        // Gemma's: no system role (it is folded into the first user turn),
        // the assistant is `model`.
        let gemma =
            "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}";
        let layout = ChatLayout::from_template(Some(gemma));
        assert_eq!(layout, ChatLayout::Gemma);
        assert_eq!(
            layout.render(&[
                Turn::new(Role::System, "Be brief."),
                Turn::new(Role::User, "Hi"),
                Turn::new(Role::Assistant, "Hello."),
                Turn::new(Role::User, "2+2?"),
            ]),
            "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n\
             <start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n"
        );
        assert_eq!(layout.stops()[0], "<end_of_turn>");
        assert_eq!(ChatLayout::from_template(None), ChatLayout::Plain);
        assert_eq!(
            ChatLayout::from_template(Some("{{ messages }}"))
                .render(&[Turn::new(Role::User, "Hi")]),
            "User: Hi\nAssistant:"
        );
    }
}
