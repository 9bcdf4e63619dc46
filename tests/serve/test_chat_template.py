"""Chat templates: rendered as transformers renders them (bos/eos strings or dicts, named templates,
add_generation_prompt), the documented default when the folder has none, and a sandbox that refuses
to reach into Python objects."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("jinja2")

from dsv2.serve.chat import DEFAULT_TEMPLATE, ChatTemplate, TemplateError  # noqa: E402

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m['content'] | trim }}{{ eos_token }}"
            "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")


def test_default_template_when_the_folder_has_none(tmp_path) -> None:
    t = ChatTemplate.from_folder(tmp_path)
    assert t.is_default and t.source == DEFAULT_TEMPLATE
    assert t.render(MSGS) == "System: Be brief.\n\nUser: Hi\n\nAssistant:"
    assert t.render(MSGS, add_generation_prompt=False) == "System: Be brief.\n\nUser: Hi\n\n"


def test_folder_template_with_dict_special_tokens_and_named_templates(tmp_path) -> None:
    cfg = {"bos_token": {"content": "<s>"}, "eos_token": "</s>",
           "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": TEMPLATE}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = ChatTemplate.from_folder(tmp_path)
    assert t.render(MSGS) == "<s>[system] Be brief.</s>[user] Hi</s>[assistant]"


def test_matches_transformers_apply_chat_template(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from dsv2.train.data import save_tokenizer, train_tokenizer

    save_tokenizer(train_tokenizer(["hello world, be brief " * 50], 300), tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for gen in (True, False):
        assert ChatTemplate.from_folder(tmp_path).render(MSGS, gen) == hf.apply_chat_template(
            MSGS, add_generation_prompt=gen, tokenize=False)


def test_raise_exception_and_sandbox_are_template_errors() -> None:
    t = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}")
    with pytest.raises(TemplateError, match="first must be user"):
        t.render(MSGS)
    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TemplateError):
        evil.render(MSGS)
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate("{% for %}")
