"""LoRA (Hu et al. 2021) in plain PyTorch: train a 1-3B student on one GPU by freezing its weights and learning a
low-rank update of some of its linear layers, y = x W^T + (alpha / r) (x A^T) B^T, B zero-initialised (so training
starts from the base model exactly), A as peft initialises it (Kaiming-uniform, a = sqrt(5)).

- `add_adapters(model, r, alpha, dropout, targets)`: the target linears (by their HF names, e.g. q_proj, v_proj, or
  OPT's fc1; by default every linear layer of the blocks: attention's q, k, v, o and the MLP's projections) become
  `LoRALinear`s in place; every other parameter is frozen.
- `merged_state(model)`: the model's weights with each adapter folded in (W + scale B A): what `best/` and `last/`
  hold, plain HF folders that transformers, evaluate.py and teacher.py load as they are.
- `save_adapter` / `load_adapter`: the adapter alone in peft's layout (`adapter_model.safetensors` +
  `adapter_config.json`), so peft users can load it onto the base model; train.py writes it to `<ckpt>/adapter/`
  (not beside config.json: transformers with peft installed would apply it to the already merged weights).
"""

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import cli
from checkpoint import check_model_folder, from_pretrained
from families import FAMILIES, hf_key
from fileio import InputError

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # what peft puts before the base model's own key


class LoRALinear(nn.Linear):
    """An nn.Linear (its weight and bias frozen, under their own names: the checkpoint keys stay the base's) plus
    a trainable low-rank update."""

    def __init__(self, base, r, alpha, dropout=0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.r, self.alpha, self.scale, self.dropout = r, alpha, alpha / r, dropout

    def forward(self, x):
        update = F.dropout(x, self.dropout, self.training) if self.dropout else x
        update = (update @ self.lora_A.to(x.dtype).T) @ self.lora_B.to(x.dtype).T
        return F.linear(x, self.weight, self.bias) + self.scale * update


def names(cfg):
    """{HF name: ours} of the linear layers a family names otherwise (OPT's fc1 is our mlp.up_proj)."""
    return {leaf(theirs): leaf(ours) for theirs, ours in FAMILIES[cfg.model_type].keys.items()}


def leaf(name):
    """A module's own name, the last part of its dotted path: "layers.3.mlp.up_proj" -> "up_proj"."""
    return name.rsplit(".", 1)[-1]


def block_linears(model):
    """{our name: module} of the linear layers inside the blocks (not the head, nor OPT-350m's projections)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("layers.")}


def add_adapters(model, r, alpha=None, dropout=0.0, targets=None):
    """Freeze every parameter of `model` and turn each block linear layer whose HF name is in `targets` (default:
    all of them) into a LoRALinear of rank r -> the names of the wrapped modules. A target that names no linear
    layer is an error naming the model's."""
    alpha = 2 * r if alpha is None else alpha
    rename = names(model.cfg)
    ours = None if targets is None else {rename.get(t, t) for t in targets}
    for p in model.parameters():
        p.requires_grad_(False)
    linears = block_linears(model)
    missing = set() if ours is None else ours - {leaf(n) for n in linears}
    if missing:
        theirs = {v: k for k, v in rename.items()}
        layers = sorted({theirs.get(leaf(n), leaf(n)) for n in linears})
        raise InputError(f"--lora-targets: {', '.join(sorted(theirs.get(m, m) for m in missing))} names no linear "
                         f"layer of this {model.cfg.model_type} model (its layers: {', '.join(layers)})")
    wrapped = [n for n, m in linears.items() if not isinstance(m, LoRALinear) and (ours is None or leaf(n) in ours)]
    for name in wrapped:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(linears[name], r, alpha, dropout))
    if model.train_blocks:  # compiled blocks were built over the old modules
        model.compile_blocks()
    return wrapped


def hold_base_in(model, dtype):
    """The frozen base's weights in `dtype` (bfloat16: half of fp32's memory, as peft users load a base); the
    adapters stay fp32, the optimizer's."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)


def adapters(model):
    """{module name: LoRALinear} of a model with adapters."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merged_state(model, state=None):
    """The model's state dict (or `state`, e.g. gathered from shards) with every adapter folded into its weight and
    the adapter tensors left out: a plain checkpoint of the fine-tuned model."""
    state = dict(model.state_dict() if state is None else state)
    for name, m in adapters(model).items():
        a, b = state.pop(f"{name}.lora_A"), state.pop(f"{name}.lora_B")
        w = state[f"{name}.weight"]
        state[f"{name}.weight"] = w + (m.scale * (b.to(w.device).float() @ a.to(w.device).float())).to(w.dtype)
    return state


def adapter_state(model, state=None):
    """Only the adapter tensors of `state` (default: the model's), keyed as in the state dict."""
    state = model.state_dict() if state is None else state
    return {k: v for k, v in state.items() if k.endswith((".lora_A", ".lora_B"))}


def save_adapter(model, folder, base, state=None):
    """`folder`/adapter_model.safetensors + adapter_config.json in peft's layout -> {file name: writer} for
    checkpoint.write_folder's `files` (a subfolder's files: "adapter/...")."""
    cfg, lora = model.cfg, next(iter(adapters(model).values()))
    tensors = {}
    for key, value in adapter_state(model, state).items():
        module, _, which = key.rpartition(".")
        tensors[peft_key(module, which, cfg)] = value.detach().float().contiguous().cpu()
    theirs = {v: k for k, v in names(cfg).items()}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.r, "lora_alpha": lora.alpha,
              "lora_dropout": lora.dropout,
              "target_modules": sorted({theirs.get(leaf(n), leaf(n)) for n in adapters(model)}),
              "base_model_name_or_path": str(base), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None}
    return {f"{folder}/{ADAPTER_WEIGHTS}": lambda path: save_file(tensors, str(path), metadata={"format": "pt"}),
            f"{folder}/{ADAPTER_CONFIG}": json.dumps(config, indent=2) + "\n"}


def peft_key(module, which, cfg):
    """The key peft saves adapter tensor `which` ("lora_A" or "lora_B") of our module `module` under."""
    return PEFT_PREFIX + hf_key(f"{module}.weight", cfg).removesuffix(".weight") + f".{which}.weight"


def is_adapter_folder(folder):
    """A peft adapter folder (adapter_config.json, no config.json of its own): --init trains it on, on its base."""
    return folder is not None and (Path(folder) / ADAPTER_CONFIG).is_file() \
        and not (Path(folder) / "config.json").exists()


def read_adapter_config(folder):
    path = Path(folder) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read the adapter's config ({e})") from None
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("use_rslora"):
        raise InputError(f"{path}: not a plain LoRA adapter (peft_type {config.get('peft_type')!r}; DoRA and rsLoRA "
                         "are not supported)")
    return config


def load_adapter(model, folder):
    """Add the adapter of a peft-layout folder to `model` (its base), ready to train on -> the adapter's config."""
    config = read_adapter_config(folder)
    add_adapters(model, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0),
                 tuple(config["target_modules"]))
    try:
        saved = load_file(str(Path(folder) / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise InputError(f"{Path(folder) / ADAPTER_WEIGHTS}: cannot read it ({e})") from None
    ours = {}
    for name in adapters(model):
        for which in ("lora_A", "lora_B"):
            key = peft_key(name, which, model.cfg)
            if key not in saved:
                raise InputError(f"{Path(folder) / ADAPTER_WEIGHTS}: missing tensor {key}")
            ours[f"{name}.{which}"] = saved[key]
    model.load_state_dict(ours, strict=False)
    return config


def load_student(run, init, device):
    """train.py --lora R, or an --init that is an adapter folder -> (the base folder, the base model with adapters):
    fresh ones, those of --init (peft's layout; its base_model_name_or_path is the model), or those of the resumed
    checkpoint's adapter/. With --dtype bfloat16 the frozen base is held in bf16, the adapters in fp32."""
    adapter = init if is_adapter_folder(init) else None
    if adapter is not None:  # --init: an adapter; its base is the model
        init = Path(check_model_folder(cli.Refuse(f"--init {adapter}"), "its base_model_name_or_path",
                                       read_adapter_config(adapter)["base_model_name_or_path"]))
    model = from_pretrained(init, device=device)
    adapter = run.resume / "adapter" if run.resume is not None else adapter
    if adapter is None:
        targets = tuple(t.strip() for t in run.lora_targets.split(",")) if run.lora_targets else None
        add_adapters(model, run.lora, run.lora_alpha, run.lora_dropout, targets)
    else:
        config = load_adapter(model, adapter)
        if run.lora and run.lora != config["r"]:
            raise InputError(f"--lora {run.lora}: {adapter} holds an adapter of rank {config['r']}")
    if run.dtype == "bfloat16":
        hold_base_in(model, torch.bfloat16)
    return init, model
