"""Environment failures stop data preparation with their cause; only faults of a row are counted drops."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import transformers
from conftest import ROOT, TINY_MODEL

from jsft.data import encode_mixture, preprocess
from jsft.errors import JsftError, SetupError


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(TINY_MODEL)


def write_rows(path, n: int) -> str:
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path.write_text("".join(json.dumps(row) + "\n" for _ in range(n)))
    return str(path)


def encode(tok, path: str, **kwargs):
    args = dict(max_seq_length=64, chat_template=None, seed=0, max_bad_fraction=1.0, num_proc=1)
    return encode_mixture(((path, 1.0),), tok, **{**args, **kwargs})


def write_config(tmp_path, rows: str, model: str = str(TINY_MODEL)) -> str:
    path = tmp_path / "cfg.py"
    path.write_text(
        "from jsft.config import default_config\n"
        "def get_config():\n"
        "    c = default_config()\n"
        f"    c.model.path = {model!r}\n"
        f"    c.data.mixer = (({rows!r}, 1.0),)\n"
        f"    c.data.cache_dir = {str(tmp_path / 'cache')!r}\n"
        "    c.data.max_seq_length = 64\n"
        "    return c\n"
    )
    return str(path)


def test_missing_jinja2_stops_at_once_with_the_cause(tmp_path):
    """As on a fresh install without jinja2: not 'N of N rows are bad'."""
    config_file = write_config(tmp_path, write_rows(tmp_path / "a.jsonl", 200))
    code = (
        "import sys; sys.modules['jinja2'] = None\n"  # what `import jinja2` sees when it is not installed
        f"from jsft.cli import prepare; prepare.main(['--config={config_file}'])"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("jsft: error: rendering the chat template failed: ImportError") and "jinja2" in last
    )
    assert "rows are bad" not in done.stderr


def test_a_template_failing_on_every_row_is_a_setup_error(tmp_path, tok):
    path = write_rows(tmp_path / "a.jsonl", preprocess.SETUP_CHECK_ROWS + 10)
    failing = "{{ raise_exception('this template renders nothing') }}"
    expected = (
        r"the first 64 rows of .*a.jsonl .* all fail with template_error.*"
        r"a.jsonl line 1: template_error: TemplateError: this template renders nothing"
    )
    with pytest.raises(SetupError, match=expected):
        encode(tok, path, chat_template=failing)
    # the same template failing only on some rows' content: those rows are counted, the rest trained
    picky = (
        "{% for m in messages %}{% if m.content == 'no' %}{{ raise_exception('no') }}{% endif %}"
        "{{ m.role + ': ' + m.content + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": a}]}
        for a in ["yes", "no"] * 40
    ]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    encoded = encode(tok, str(tmp_path / "b.jsonl"), chat_template=picky)
    assert len(encoded) == 40 and encoded.drops == {"template_error": 40}


def test_first_rows_failing_for_one_reason_is_a_setup_error_but_mixed_reasons_are_rows(tmp_path, tok):
    tiny = write_rows(tmp_path / "a.jsonl", 100)
    with pytest.raises(SetupError, match=r"first 64 rows .* all fail with over_length"):
        encode(tok, tiny, max_seq_length=4)
    assert len(encode(tok, tiny)) == 100


def test_an_unreadable_tokenizer_or_template_file_is_one_line(tmp_path, tok):
    model = tmp_path / "model"
    shutil.copytree(TINY_MODEL, model)
    (model / "tokenizer.json").write_text('{"version": "1.0", "truncated')
    config_file = write_config(tmp_path, write_rows(tmp_path / "a.jsonl", 10), str(model))
    code = f"from jsft.cli import prepare; prepare.main(['--config={config_file}'])"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert (
        done.stderr.strip().splitlines()[-1].startswith(f"jsft: error: cannot load the tokenizer of {model}")
    )
    template = tmp_path / "template.jinja"
    template.write_bytes(b"{{ '\xff' }}")
    with pytest.raises(
        SetupError, match=r"chat template file .*template.jinja: cannot read it: UnicodeDecodeError"
    ):
        encode(tok, str(tmp_path / "a.jsonl"), chat_template=str(template))


def test_a_worker_that_cannot_start_is_one_error_not_a_respawn_loop(tmp_path, tok):
    rows = write_rows(tmp_path / "a.jsonl", 2 * preprocess.MIN_ROWS_PER_PROCESS + 100)
    with pytest.raises(JsftError, match=r"data.train_on must be one of all_assistant_turns"):
        encode(tok, rows, train_on="every_turn", num_proc=2)
    # The pool itself: workers whose start fails report it on their first task.
    code = (
        "import transformers\n"
        "from jsft.data import preprocess, sources\n"
        f"tok = transformers.AutoTokenizer.from_pretrained({str(TINY_MODEL)!r})\n"
        f"drawn = sources.mix((({rows!r}, 1.0),), 0)[0]\n"
        "tasks = preprocess._row_tasks(drawn, 65)\n"
        "initargs = (tok, None, 'every_turn', 'drop_row')\n"
        "try:\n"
        "    list(preprocess._chunk_results(tasks, 2, initargs))\n"
        "except preprocess.SetupError as e:\n"
        "    print(e)\n"
    )
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == (
        "a tokenization worker could not start: data.train_on must be one of all_assistant_turns, "
        "last_assistant_turn, got 'every_turn'"
    ), done.stderr[-2000:]
    assert time.perf_counter() - started < 200
