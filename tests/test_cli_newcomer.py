"""The newcomer path works out of the box: the README's Python example runs as written on the
demo model, the demo model chats (plain chat lines and OpenAI chat lines), and --help shows the
sampling defaults that will actually apply."""

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

import jaxpp
from jaxpp import cli
from jaxpp.cli import generate

README = Path(__file__).resolve().parents[1] / "README.md"


# Slow: .ci/run runs every README snippet as written in a fresh virtualenv (.ci/readme.py).
@pytest.mark.slow
def test_readme_example_runs_and_the_demo_model_chats(tmp_path, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert "jaxpp.DEMO_MODEL" in code
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), namespace)
    llm = namespace["llm"]
    assert isinstance(llm, jaxpp.LLM) and printed.getvalue().strip()
    assert llm.tokenizer.chat_template, "the demo model ships a chat template"

    # The same model through the CLI: a chat line and an OpenAI chat line, no flags needed.
    monkeypatch.setattr(generate, "load_llm", lambda args: llm)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "sort"}]
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        json.dumps({"id": "c", "messages": chat, "max_tokens": 2})
        + "\n"
        + json.dumps(
            {
                "custom_id": "o",
                "url": "/v1/chat/completions",
                "body": {"messages": chat[::-1], "max_tokens": 2},
            }
        )
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    assert cli.main(["generate", "-i", str(inp), "-o", str(out), "--quiet"]) == 0
    records = {r.get("custom_id", r.get("id")): r for r in map(json.loads, out.open())}
    assert records["c"]["prompt"] == "<|bos|># system: Be brief.\n# user: sort\n# assistant:\n"
    assert records["o"]["response"]["body"]["choices"][0]["message"]["role"] == "assistant"
    capsys.readouterr()
    assert cli.main(["generate", "--prompt", "sort", "--chat", "--max-tokens", "2", "-q"]) == 0
    assert capsys.readouterr().out.endswith("\n")  # the completion text, then a newline


def test_help_shows_the_defaults_that_apply(tmp_path, capsys):
    """Without --model: the demo model's generation_config.json; with one that has none: the
    built-in (vLLM) defaults."""
    assert cli.main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    recommended = json.loads((jaxpp.DEMO_MODEL / "generation_config.json").read_text())
    where = "from demo_model/generation_config.json"
    assert f"--max-tokens MAX_TOKENS default: {recommended['max_new_tokens']}, {where}" in text
    assert f"(default: {recommended['temperature']}, {where})" in text
    assert f"--top-p TOP_P default: {recommended['top_p']}, {where}" in text
    assert "--top-k TOP_K default: 0 (0 = off)" in text
    bare = tmp_path / "bare"
    bare.mkdir()
    assert cli.main(["generate", "--model", str(bare), "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--max-tokens MAX_TOKENS default: 16 " in text and "(default: 1.0)" in text
    assert "from bare/generation_config.json" not in text
