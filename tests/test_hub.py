"""Hub model ids: fetched into the Hugging Face cache (safetensors only), read offline, never pickles.

The Hub is never reached: the offline tests lay out an `HF_HOME` cache by hand (refs/<name> holds a
commit, snapshots/<commit>/ the files), and the fetch test runs huggingface_hub against a local
HTTP server that speaks the Hub's file protocol. Each case runs in a fresh process, so the
environment variables (HF_HOME, HF_HUB_OFFLINE, HF_ENDPOINT, HF_TOKEN) are read as a user sets them.
"""

from __future__ import annotations

import collections
import hashlib
import http.server
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import urllib.parse

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import ROOT, TINY_DATA, TINY_MODEL, make_hf_llama

from jsft import hf, models
from jsft.errors import JsftError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
TOKEN = "hf_jsftTestTokenNeverWritten"
IDS = np.random.default_rng(0).integers(0, 384, (2, 11))

# Runs in a fresh process: loads each (Hub id, revision), records every file opened with a pickle suffix.
LOAD_WORKER = """
import json, sys
import numpy as np
opened = []
sys.addaudithook(
    lambda event, args: event == "open" and isinstance(args[0], str)
    and args[0].endswith((".bin", ".pt", ".pth", ".pkl")) and opened.append(args[0])
)
import jax.numpy as jnp
import transformers
from jsft import hf, models
requests, ids = json.loads(sys.argv[1]), np.asarray(json.loads(sys.argv[2]), np.int32)
out = {"folders": [], "logits": [], "chat_ids": []}
for repo, revision in requests:
    folder = hf.resolve_model(repo, revision)
    model = models.load_pretrained(repo, dtype=jnp.float32, revision=revision)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    chat = [{"role": "user", "content": "reverse: abc"}, {"role": "assistant", "content": "cba"}]
    out["folders"].append(folder)
    out["logits"].append(np.asarray(model(ids)).tolist())
    out["chat_ids"].append(list(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False)))
out["opened"] = opened
print(json.dumps(out))
"""

# Runs in a fresh process: a LoRA run on a Hub id whose main then moves; its export merges into the
# commit the run read. Prints each exported tensor's distance to commit A's and to commit B's weights.
LORA_EXPORT_WORKER = """
import json, pathlib, sys
import numpy as np
from jsft import config, export, hf, train
out, data, moved_to = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = config.load([
    "train", "--config=configs/tiny.py", "--config.model.path=org/tiny", "--config.lora.rank=4",
    f"--config.output_dir={out}/run", f"--config.data.mixer=(('{data}', 64),)", "--config.data.eval_mixer=()",
    "--config.train.max_steps=2", "--config.checkpoint.every_steps=2", "--config.log.every_steps=1",
])
train.run(cfg)
pathlib.Path(hf.resolve_model("org/tiny")).parent.parent.joinpath("refs", "main").write_text(moved_to)
export.convert(f"{out}/run/checkpoints", f"{out}/export")
export.convert_adapter(f"{out}/run/checkpoints", f"{out}/adapter")
assert json.loads(pathlib.Path(out, "adapter", "adapter_config.json").read_text())["revision"] == "a" * 40
exported = dict(hf.iter_tensors(f"{out}/export"))
commits = [dict(hf.iter_tensors(folder)) for folder in sys.argv[4:]]
print(json.dumps({name: [float(np.abs(np.asarray(value, np.float32) - np.asarray(c[name], np.float32)).max())
                         for c in commits] for name, value in exported.items()}))
"""

# Runs in a fresh process: the one-line error of resolving each Hub id.
ERROR_WORKER = """
import json, sys
from jsft import hf
errors = []
for repo in json.loads(sys.argv[1]):
    try:
        hf.resolve_model(repo)
        errors.append(None)
    except hf.ModelFolderError as e:
        errors.append(str(e))
print(json.dumps(errors))
"""


def _python(code: str, env: dict[str, str], *args) -> object:
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _repo_files(folder: pathlib.Path, seed: int) -> np.ndarray:
    """A Hub repo's files in `folder` (sharded safetensors, pickle copies, tokenizer); torch's logits."""
    source = make_hf_llama(folder.parent / f"source-{seed}", seed=seed, vocab_size=384)
    folder.mkdir(parents=True)
    hf.save_tensors(dict(hf.iter_tensors(str(source))), str(folder), max_shard_bytes=64 * 1024)
    for name in ("config.json", "generation_config.json"):
        shutil.copy(source / name, folder / name)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TINY_MODEL / name, folder / name)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        source, attn_implementation="eager"
    ).eval()
    # The same weights as pickles and a duplicate safetensors, as real repos ship them: never to be read.
    torch.save(torch_model.state_dict(), folder / "pytorch_model.bin")
    (folder / "original").mkdir()
    torch.save(torch_model.state_dict(), folder / "original" / "consolidated.00.pth")
    shutil.copy(source / "model.safetensors", folder / "consolidated.safetensors")
    with torch.no_grad():
        return torch_model(torch.tensor(IDS)).logits.numpy()


def _cache_snapshot(hf_home: pathlib.Path, repo_id: str, commit: str, files: pathlib.Path, refs=()) -> None:
    """Puts `files` into the Hugging Face cache layout as `repo_id` at `commit`, pointed to by `refs`."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(files, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture(scope="module")
def hub_repos(tmp_path_factory) -> dict[str, tuple[pathlib.Path, np.ndarray]]:
    """Two commits of one repo with different weights: name -> (files, transformers' logits on IDS)."""
    root = tmp_path_factory.mktemp("hub_repos")
    return {name: (root / name, _repo_files(root / name, seed)) for name, seed in (("a", 0), ("b", 1))}


def _tiny_chat_ids() -> list[int]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_MODEL)
    chat = [{"role": "user", "content": "reverse: abc"}, {"role": "assistant", "content": "cba"}]
    return list(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False))


def test_offline_cache_serves_hub_ids_and_revisions_without_reading_pickles(tmp_path, hub_repos):
    (files_a, logits_a), (files_b, logits_b) = hub_repos["a"], hub_repos["b"]
    _cache_snapshot(tmp_path, "org/tiny", COMMIT_A, files_a, refs=("main",))
    _cache_snapshot(tmp_path, "org/tiny", COMMIT_B, files_b, refs=("v1",))
    requests = [["org/tiny", None], ["org/tiny", "v1"], ["org/tiny", COMMIT_B]]
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_TOKEN": ""}
    out = _python(LOAD_WORKER, env, json.dumps(requests), json.dumps(IDS.tolist()))
    snapshots = tmp_path / "hub" / "models--org--tiny" / "snapshots"
    assert out["folders"] == [str(snapshots / COMMIT_A), str(snapshots / COMMIT_B), str(snapshots / COMMIT_B)]
    for got, expected in zip(out["logits"], [logits_a, logits_b, logits_b], strict=True):
        np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)
    assert np.abs(logits_a - logits_b).max() > 0.1  # the revisions really differ
    assert out["chat_ids"] == [_tiny_chat_ids()] * 3
    assert out["opened"] == []  # pytorch_model.bin and original/*.pth sit in the snapshot, unread


def test_lora_export_merges_into_the_commit_training_read_after_main_moves(tmp_path, hub_repos):
    (files_a, _), (files_b, _) = hub_repos["a"], hub_repos["b"]
    hf_home = tmp_path / "hf"
    _cache_snapshot(hf_home, "org/tiny", COMMIT_A, files_a, refs=("main",))
    _cache_snapshot(hf_home, "org/tiny", COMMIT_B, files_b)
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_TOKEN": "", "JAX_PLATFORMS": "cpu"}
    data = TINY_DATA / "train.jsonl"
    distances = _python(
        LORA_EXPORT_WORKER, env, str(tmp_path), str(data), COMMIT_B, str(files_a), str(files_b)
    )
    untouched = {n: d for n, d in distances.items() if not n.endswith(("proj.weight",))}  # no LoRA factors
    assert untouched and all(to_a == 0.0 and to_b > 0.01 for to_a, to_b in untouched.values()), untouched
    # Commit A's base plus the trained update (2 steps: ~0.015 at most), not commit B's (0.1 away).
    merged = {n: d for n, d in distances.items() if n.endswith("proj.weight")}
    assert merged and all(to_a < to_b / 4 for to_a, to_b in merged.values()), merged


def test_offline_errors_name_the_model_in_one_line(tmp_path, hub_repos):
    pickles_only = tmp_path / "pickles"
    pickles_only.mkdir()
    for name in ("config.json", "pytorch_model.bin"):
        shutil.copy(hub_repos["a"][0] / name, pickles_only / name)
    _cache_snapshot(tmp_path, "org/pickles", COMMIT_A, pickles_only, refs=("main",))
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    errors = _python(ERROR_WORKER, env, json.dumps(["org/pickles", "org/absent"]))
    assert errors[0] == (
        "Hub model org/pickles has no safetensors weights in the Hugging Face cache (HF_HUB_OFFLINE is set) "
        "(missing model.safetensors); jsft never loads pickle weights (*.bin, *.pt)"
    )
    assert errors[1].startswith(
        "org/absent is no local folder, and fetching it from the Hub failed: Cannot find an appropriate"
    )
    assert "HF_HUB_OFFLINE=0" in errors[1]
    assert all("\n" not in e for e in errors)


def test_local_paths_stay_local_and_bad_ones_fail_before_any_fetch(hf_llama):
    assert hf.resolve_model(str(hf_llama)) == str(hf_llama)
    with pytest.raises(
        hf.ModelFolderError, match="model.revision='v1' is for Hub ids, but model.path .* is a local"
    ):
        hf.resolve_model(str(hf_llama), "v1")
    with pytest.raises(
        hf.ModelFolderError, match="model folder /no/such/model does not exist, and it is not a Hub"
    ):
        hf.resolve_model("/no/such/model")


class _FakeHub(http.server.ThreadingHTTPServer):
    """Serves repos {repo_id: (commit, folder)} over the Hub's HTTP file protocol; records every request."""

    def __init__(self, repos: dict[str, tuple[str, pathlib.Path]]):
        super().__init__(("127.0.0.1", 0), _FakeHubHandler)
        self.repos = repos
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Authorization header)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _FakeHubHandler(http.server.BaseHTTPRequestHandler):
    server: _FakeHub

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        self.server.requests.append((self.command, path, self.headers.get("Authorization", "")))
        for repo_id, (commit, folder) in self.server.repos.items():
            files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
            if path.startswith(f"/api/models/{repo_id}/revision/"):
                return self._send(json.dumps({"id": repo_id, "sha": commit}).encode(), body)
            if path.startswith(f"/api/models/{repo_id}/tree/{commit}"):
                tree = [
                    {"type": "file", "path": f, "size": (folder / f).stat().st_size, "oid": _sha(folder / f)}
                    for f in files
                ]
                return self._send(json.dumps(tree).encode(), body)
            prefix = f"/{repo_id}/resolve/{commit}/"
            if path.startswith(prefix) and path[len(prefix) :] in files:
                file = folder / path[len(prefix) :]
                headers = {"X-Repo-Commit": commit, "ETag": f'"{_sha(file)}"'}
                return self._send(file.read_bytes(), body, headers)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, data: bytes, body: bool, headers: dict[str, str] | None = None) -> None:
        self.send_response(200)
        for key, value in {"Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(data)


def _sha(file: pathlib.Path) -> str:
    return hashlib.sha1(file.read_bytes()).hexdigest()


def test_fetch_takes_only_safetensors_config_and_tokenizer_once_per_host(tmp_path, hub_repos):
    files, logits = hub_repos["a"]
    hub = _FakeHub({"org/tiny": (COMMIT_A, files), "org/pickles": (COMMIT_B, tmp_path / "pickles")})
    (tmp_path / "pickles").mkdir()
    for name in ("config.json", "pytorch_model.bin"):
        shutil.copy(files / name, tmp_path / "pickles" / name)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    hf_home = tmp_path / "hf_home"
    env = {"HF_HOME": str(hf_home), "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_XET": "1", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}  # fmt: skip
    args = [json.dumps([["org/tiny", None]]), json.dumps(IDS.tolist())]
    try:
        # Two processes of one host start together; the host lock lets one download, the other reuses.
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", LOAD_WORKER, *args],
                env={**os.environ, **env},
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        results = []
        for worker in workers:
            stdout, stderr = worker.communicate(timeout=600)
            assert worker.returncode == 0, stderr[-4000:]
            results.append(json.loads(stdout.strip().splitlines()[-1]))
        errors = _python(ERROR_WORKER, env, json.dumps(["org/pickles"]))
    finally:
        hub.shutdown()
    snapshot = hf_home / "hub" / "models--org--tiny" / "snapshots" / COMMIT_A
    for out in results:
        assert out["folders"] == [str(snapshot)]
        np.testing.assert_allclose(np.asarray(out["logits"][0]), logits, atol=1e-4, rtol=0)
        assert out["opened"] == []
    shards = sorted(json.loads((files / hf.SAFETENSORS_INDEX).read_text())["weight_map"].values())
    wanted = {"config.json", "generation_config.json", hf.SAFETENSORS_INDEX, "tokenizer.json",
              "tokenizer_config.json", "chat_template.jinja", *shards}  # fmt: skip
    assert len(set(shards)) > 1
    assert {str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()} == wanted
    downloads = collections.Counter(
        path.split(f"/resolve/{COMMIT_A}/", 1)[1]
        for method, path, _ in hub.requests
        if method == "GET" and "/org/tiny/resolve/" in path
    )
    assert downloads == collections.Counter(wanted)  # each file once, across both processes
    assert not [p for _, p, _ in hub.requests if p.endswith(PICKLE_SUFFIXES) or "consolidated" in p]
    # Every request for the repo carried the token, which came from the environment alone.
    assert {auth for _, path, auth in hub.requests if "org/" in path} == {f"Bearer {TOKEN}"}
    written = [p for p in hf_home.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert written == []
    assert errors == [
        "Hub model org/pickles has no safetensors weights in the Hub (missing model.safetensors); "
        "jsft never loads pickle weights (*.bin, *.pt)"
    ]


def test_load_pretrained_takes_dtype_names_and_dtypes(hf_llama):
    ids = IDS % 97
    reference = np.asarray(models.load_pretrained(str(hf_llama), dtype="float32")(ids))
    for dtype in (jnp.float32, np.float32, np.dtype("float32")):
        model = models.load_pretrained(str(hf_llama), dtype=dtype)
        assert model.embed.get_value().dtype == np.float32
        np.testing.assert_array_equal(np.asarray(model(ids)), reference)
    model = models.load_pretrained(str(hf_llama), dtype=jnp.bfloat16)
    assert model.embed.get_value().dtype == jnp.bfloat16
    assert 0 < np.abs(np.asarray(model(ids), np.float32) - reference).max() < 0.1


def test_dtype_of_normalises_names_and_dtypes_and_rejects_others():
    assert models.dtype_of("bfloat16") is jnp.bfloat16
    assert models.dtype_of(jnp.bfloat16) is jnp.bfloat16
    assert models.dtype_of(np.float32) is jnp.float32
    assert models.dtype_of(jnp.dtype("float32")) is jnp.float32
    for bad, shown in (("float16", "'float16'"), ("auto", "'auto'"), (np.float64, "<class 'numpy.float64'>")):
        with pytest.raises(JsftError) as err:
            models.dtype_of(bad)
        assert str(err.value) == f"dtype {shown} is not one of float32, bfloat16"
