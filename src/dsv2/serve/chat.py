"""Chat templates: `messages` -> prompt text, the way transformers' `apply_chat_template` renders them.

The template is `chat_template` of the checkpoint folder's `tokenizer_config.json` (a string, or a
list of `{"name", "template"}` of which "default" is used), rendered by jinja2's
`ImmutableSandboxedEnvironment` (templates cannot touch Python objects or mutate their inputs) with
`trim_blocks` / `lstrip_blocks` and the `loopcontrols` extension, the variables `messages`,
`add_generation_prompt` (True: the prompt ends where the assistant's reply starts), `bos_token`,
`eos_token` (and the other special tokens of the config, as strings), and the helpers
`raise_exception(msg)` and `strftime_now(fmt)`, as transformers defines them.

Without a template the folder gets `DEFAULT_TEMPLATE`: each message as "Role: content" followed by a
blank line, then "Assistant:" when a generation prompt is asked for. The prompt text is then tokenized
without adding special tokens (the template writes any it wants, e.g. `{{ bos_token }}`).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class TemplateError(ValueError):
    """The template could not render these messages (raise_exception(), or a template bug)."""


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick(template: Any) -> str | None:
    if isinstance(template, list):  # named templates: transformers uses "default" for plain chat
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class ChatTemplate:
    """A compiled chat template plus the special-token strings it may refer to."""

    def __init__(self, source: str | None = None, special_tokens: dict[str, str] | None = None) -> None:
        from jinja2.exceptions import TemplateError as JinjaError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source = source or DEFAULT_TEMPLATE
        self.is_default = source is None
        self.special_tokens = dict(special_tokens or {})

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False, ensure_ascii=False: \
            json.dumps(x, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._jinja_error = JinjaError
        try:
            self.template = env.from_string(self.source)
        except JinjaError as e:
            raise TemplateError(f"chat_template does not compile: {e}") from e

    @classmethod
    def from_folder(cls, folder: str | Path) -> ChatTemplate:
        """The folder's tokenizer_config.json template (and special tokens), or the default template."""
        path = Path(folder) / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        special = {k: s for k in SPECIAL_KEYS if (s := _token_str(cfg.get(k))) is not None}
        return cls(_pick(cfg.get("chat_template")), special)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` (each a dict with at least role and content)."""
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        tools=None, documents=None, **self.special_tokens)
        except TemplateError:
            raise
        except (self._jinja_error, TypeError, ValueError, KeyError) as e:
            raise TemplateError(f"chat_template failed on these messages: {type(e).__name__}: {e}") from e
