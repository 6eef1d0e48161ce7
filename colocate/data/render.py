"""A row's prompt text: `data.template` over the row's fields (or the row's `prompt_key`), the system prompt,
and the tokenizer's chat template where `data.chat` says so. The driver renders it, the policy and the
engines both get the same token ids."""

from __future__ import annotations

from typing import Any

from colocate.data.problem import DataError


def prompt_content(row: dict[str, Any], *, prompt_key: str, template: str | None, where: str) -> Any:
    """The user turn: `template.format(**row)`, else `row[prompt_key]` (a text, or a list of chat messages)."""
    if template is None:
        return row[prompt_key]
    try:
        return template.format(**row)
    except KeyError as e:
        raise DataError(f"data.template names the field {{{e.args[0]}}}, which {where} lacks (its fields: "
                        f"{sorted(row)})", subject="data.template") from None
    except (ValueError, IndexError) as e:
        raise DataError(f"data.template {template!r} is not a format string over the row's fields ({e}); write "
                        "literal braces as {{ and }}", subject="data.template") from None


def use_chat(mode: str, tokenizer: Any, *, from_file: bool) -> bool:
    """Whether prompts go through the chat template: `data.chat` auto | true | false."""
    mode = str(mode).lower()
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if mode == "true" and not has_template:
        raise DataError("data.chat=true, but the model's tokenizer has no chat template", subject="data.chat")
    if mode == "auto":
        # The arithmetic generator's prompts are completions in the tiny corpus's format: they stay raw.
        return from_file and has_template
    return mode == "true"


def render(content: Any, *, system_prompt: str | None, chat: bool, tokenizer: Any) -> str:
    if isinstance(content, list):
        if not chat:
            raise DataError("a prompt that is a list of chat messages needs the chat template (data.chat)",
                            subject="data.chat")
        messages = list(content)
    else:
        messages = [{"role": "user", "content": str(content)}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    if chat:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "\n".join(m["content"] for m in messages)
