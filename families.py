"""Model families as data: an HF `config.json` read into one `Config` of per-layer knobs, and the checkpoint's key
names. model.py's one decoder serves every family; what differs between OPT, Llama, Qwen2/3, Mistral, SmolLM3 and
Gemma 3 is here, as a table (in the spirit of gpt-fast's `transformer_configs` and litgpt's `Config`):

    family       knobs that differ from Llama's
    llama        -- (RMSNorm, RoPE with its scaling kind, SwiGLU, grouped-query attention)
    mistral      a sliding window on every layer (`sliding_window`)
    qwen2        q/k/v biases; sliding windows where `layer_types` (or use_sliding_window) say
    qwen3        per-head RMSNorm of q and k before RoPE; head_dim of its own
    smollm3      layers without RoPE (`no_rope_layers`)
    gemma3_text  RMSNorm x (1 + w), norms before and after attention and MLP, q/k norm, GELU-tanh, embeddings
                 scaled by sqrt(hidden), sliding layers with a RoPE base of their own, query_pre_attn_scalar
    opt          LayerNorm, learned positions, ReLU MLP (fc1, fc2), biases, pre- or post-LN

Adding a family: one entry in FAMILIES (its constants, where its windows and RoPEs come from, its key names),
plus its tests (tests/test_families.py). A field scotd does not implement is refused naming it (`UNSUPPORTED`).
"""

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass(frozen=True)
class Rope:
    """One rotary embedding: its base and scaling kind (HF's rope_type: default, linear, llama3, yarn)."""
    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_positions: int = 0  # llama3, yarn: the pre-training context
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn: cos and sin scaled by it (None: from factor)
    truncate: bool = True  # yarn


@dataclass
class Config:
    """The decoder's knobs, model-wide and per layer (`ropes`, `windows`), read from an HF config.json by
    from_dict; `hf` keeps that dict, which save_pretrained writes back unchanged."""
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    num_key_value_heads: int = 0  # 0 -> same as num_attention_heads (no grouping)
    head_dim: int = 0  # 0 -> hidden_size // num_attention_heads
    hidden_act: str = "silu"
    tie_word_embeddings: bool = True
    bias: bool = False  # every linear layer of the blocks has a bias (OPT)
    qkv_bias: bool = False  # q/k/v only (Qwen2)
    norm: str = "rms"  # "rms"; "rms1p": x * (1 + w) (Gemma); "layer": LayerNorm (OPT)
    rms_norm_eps: float = 1e-6
    norm_place: str = "pre"  # "pre"; "post" (OPT-350m); "sandwich": also after attention and MLP (Gemma 3)
    mlp: str = "gated"  # "gated": down(act(gate(x)) * up(x)); "plain": down(act(up(x))) (OPT's fc1, fc2)
    qk_norm: bool = False  # a norm over each head of q and k, before RoPE (Qwen3, Gemma 3)
    embed_scale: float = 1.0  # embeddings times this (Gemma: sqrt(hidden))
    attn_scale: float = 0.0  # 0 -> head_dim ** -0.5 (Gemma 3: query_pre_attn_scalar ** -0.5)
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap) (final_logit_softcapping)
    learned_positions: bool = False  # OPT: a learned position table (offset 2) instead of RoPE
    word_embed_proj_dim: int = 0  # OPT-350m: 0 -> hidden_size; else project_in/project_out exist
    final_norm: bool = True  # OPT: False with _remove_final_layer_norm, or post-LN
    ropes: tuple = ()  # per layer: a Rope, or None (no rotary embedding on that layer)
    windows: tuple = ()  # per layer: a sliding window (a query sees the keys less than it positions back), or None
    hf: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        self.word_embed_proj_dim = self.word_embed_proj_dim or self.hidden_size
        self.ropes = tuple(self.ropes) or (None if self.learned_positions else Rope(),) * self.num_hidden_layers
        self.windows = tuple(self.windows) or (None,) * self.num_hidden_layers
        assert self.num_attention_heads % self.num_key_value_heads == 0

    @property
    def eos_token_id(self):
        eos = self.hf.get("eos_token_id")
        return eos[0] if isinstance(eos, list) else eos

    @property
    def pad_token_id(self):
        """The checkpoint's pad id; else EOS; else 0 (padding is masked, so any id serves)."""
        for pad in (self.hf.get("pad_token_id"), self.eos_token_id, 0):
            if pad is not None:
                return pad

    @classmethod
    def from_hf_json(cls, path):
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        return cls.from_dict(hf, path)

    @classmethod
    def from_dict(cls, hf, path="config"):
        """An HF config dict -> Config (FAMILIES says how); an unknown family or field is a ValueError naming it."""
        return read_config(cls, hf, path)


@dataclass(frozen=True)
class Family:
    knobs: dict = field(default_factory=dict)  # Config fields that are constants of the family
    names: dict = field(default_factory=dict)  # Config field -> the family's config.json key, where they differ
    windows: str = "layer_types"  # "layer_types": where they say sliding_attention; "all": every layer (Mistral)
    local_rope: bool = False  # sliding layers have a default RoPE of their own base (Gemma 3: rope_local_base_freq)
    nope: bool = False  # no_rope_layers[i] == 0: layer i has no RoPE (SmolLM3)
    prefix: str = "model."  # the key prefix of the decoder's tensors in HF checkpoints
    keys: dict = field(default_factory=dict)  # HF module -> ours, where they differ ("layers.{}.": any layer)


OPT_KEYS = {"layers.{}.self_attn_layer_norm": "layers.{}.input_layernorm",
            "layers.{}.final_layer_norm": "layers.{}.post_attention_layernorm",
            "layers.{}.self_attn.out_proj": "layers.{}.self_attn.o_proj",
            "layers.{}.fc1": "layers.{}.mlp.up_proj", "layers.{}.fc2": "layers.{}.mlp.down_proj",
            "final_layer_norm": "norm"}
GEMMA = dict(norm="rms1p", norm_place="sandwich", qk_norm=True, hidden_act="gelu_pytorch_tanh",
             tie_word_embeddings=True)

FAMILIES = {
    "llama": Family(knobs=dict(tie_word_embeddings=False)),
    "mistral": Family(knobs=dict(tie_word_embeddings=False), windows="all"),
    "qwen2": Family(knobs=dict(tie_word_embeddings=False, qkv_bias=True)),
    "qwen3": Family(knobs=dict(tie_word_embeddings=False, qk_norm=True)),
    "smollm3": Family(knobs=dict(tie_word_embeddings=True), nope=True),
    "gemma3_text": Family(knobs=GEMMA, names=dict(hidden_act="hidden_activation"), local_rope=True),
    "opt": Family(knobs=dict(norm="layer", mlp="plain", learned_positions=True, hidden_act="relu", bias=True),
                  names=dict(intermediate_size="ffn_dim", hidden_act="activation_function", bias="enable_bias"),
                  windows="none", prefix="model.decoder.", keys=OPT_KEYS),
}
ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu")
ROPE_KINDS = ("default", "linear", "llama3", "yarn")
# fields scotd does not implement: refused (naming the field) unless they hold the value that means "off"
UNSUPPORTED = {"attn_logit_softcapping": None, "use_bidirectional_attention": False, "partial_rotary_factor": 1.0,
               "pretraining_tp": 1}
DEFAULT_WINDOW_PATTERN = 6  # Gemma 3 configs without layer_types: every 6th layer global


def read_config(cls, hf, path):
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise ValueError(f"{path}: unsupported model_type {kind!r}: scotd supports {', '.join(FAMILIES)}")
    family = FAMILIES[kind]
    check_fields(hf, family, path)
    for key, off in UNSUPPORTED.items():
        if hf.get(key, off) not in (off, None):
            raise ValueError(f"{path}: {key} {hf[key]!r} is not supported (scotd implements {off!r} only)")
    if kind != "opt" and hf.get("attention_bias", False) != hf.get("mlp_bias", hf.get("attention_bias", False)):
        raise ValueError(f"{path}: attention_bias != mlp_bias is not supported")
    get = lambda name: hf.get(family.names.get(name, name))  # noqa: E731
    knobs = dict(family.knobs)
    if kind != "opt":
        knobs.update(bias=hf.get("attention_bias", False), rms_norm_eps=hf.get("rms_norm_eps", 1e-6))
    for name in ("hidden_act", "tie_word_embeddings", *family.names):  # what the config says, over the defaults
        if get(name) is not None and name != "intermediate_size":
            knobs[name] = get(name)
    if get("intermediate_size") is None:
        raise KeyError(family.names.get("intermediate_size", "intermediate_size"))
    cfg = cls(model_type=kind, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
              num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=hf["num_attention_heads"],
              intermediate_size=get("intermediate_size"), max_position_embeddings=hf["max_position_embeddings"],
              num_key_value_heads=hf.get("num_key_value_heads") or 0, head_dim=hf.get("head_dim") or 0, **knobs, hf=hf)
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(f"{path}: {family.names.get('hidden_act', 'hidden_act')} {cfg.hidden_act!r} is not supported "
                         f"({', '.join(ACTIVATIONS)})")
    if kind == "opt":
        before = hf.get("do_layer_norm_before", True)
        return replace(cfg, word_embed_proj_dim=hf.get("word_embed_proj_dim", hf["hidden_size"]),
                       norm_place="pre" if before else "post",
                       final_norm=before and not hf.get("_remove_final_layer_norm", False))
    types = layer_types(hf, family, cfg.num_hidden_layers)
    if kind == "gemma3_text":
        cfg = replace(cfg, embed_scale=cfg.hidden_size ** 0.5, attn_scale=hf.get("query_pre_attn_scalar", 256) ** -0.5)
    return replace(cfg, windows=windows(hf, family, types), ropes=ropes(hf, family, types, path),
                   logit_softcap=hf.get("final_logit_softcapping"))


# -----------------------------------------------------------------------------
# What each field the table reads must hold: checked once, wherever a config is read (a student, a teacher, --init,
# a hub id), so that a config transformers refuses is refused here too, naming the field, not trained on.


def _int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x):
    return (_int(x) or isinstance(x, float)) and math.isfinite(x)


KINDS = {  # what a field must hold -> the test
    "a positive integer": lambda x: _int(x) and x > 0,
    "a positive integer or null": lambda x: x is None or _int(x) and x > 0,
    "an integer >= 0": lambda x: _int(x) and x >= 0,
    "a positive number": lambda x: _number(x) and x > 0,
    "a positive number or null": lambda x: x is None or _number(x) and x > 0,
    "true or false": lambda x: isinstance(x, bool),
    "a string": lambda x: isinstance(x, str),
    "a token id (an integer >= 0), a list of them, or null": lambda x: x is None or (_int(x) and x >= 0) or (
        isinstance(x, list) and all(_int(i) and i >= 0 for i in x)),
}
FIELDS = {  # every model-wide field the table reads (under any family's name for it) -> what it must hold
    **dict.fromkeys(("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "ffn_dim", "max_position_embeddings"), "a positive integer"),
    **dict.fromkeys(("num_key_value_heads", "head_dim", "sliding_window", "word_embed_proj_dim",
                     "original_max_position_embeddings"), "a positive integer or null"),
    **dict.fromkeys(("sliding_window_pattern", "_sliding_window_pattern"), "a positive integer"),
    "max_window_layers": "an integer >= 0",
    **dict.fromkeys(("rms_norm_eps", "rope_theta", "rope_local_base_freq", "query_pre_attn_scalar"),
                    "a positive number"),
    "final_logit_softcapping": "a positive number or null",
    **dict.fromkeys(("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "do_layer_norm_before",
                     "_remove_final_layer_norm", "enable_bias"), "true or false"),
    **dict.fromkeys(("hidden_act", "hidden_activation", "activation_function"), "a string"),
    **dict.fromkeys(("eos_token_id", "pad_token_id"), "a token id (an integer >= 0), a list of them, or null"),
}
ROPE_FIELDS = {  # a rope_parameters / rope_scaling dict's fields -> what they must hold
    **dict.fromkeys(("rope_type", "type"), "a string"),
    **dict.fromkeys(("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"),
                    "a positive number or null"),
    "rope_theta": "a positive number", "attention_factor": "a positive number or null",
    "original_max_position_embeddings": "a positive integer", "truncate": "true or false",
}
LAYER_TYPES = ("full_attention", "sliding_attention")


def _shown(x):
    text = json.dumps(x)
    return text if len(text) <= 60 else text[:57] + "..."


def _check(path, name, x, must):
    if not KINDS[must](x):
        raise ValueError(f"{path}: {name} holds {_shown(x)}; it must hold {must}")


def _check_per_layer(path, name, x, n, values):
    """A per-layer list: one entry a layer (num_hidden_layers), each one of `values`."""
    if not isinstance(x, list) or len(x) != n:
        held = f"{len(x)} entries" if isinstance(x, list) else _shown(x)
        raise ValueError(f"{path}: {name} holds {held}; it must hold a list of one entry a layer "
                         f"(num_hidden_layers = {n})")
    for i, v in enumerate(x):
        if not any(v == w and type(v) in (type(w), bool) for w in values):  # 1.0 is no layer flag; True is
            raise ValueError(f"{path}: {name}[{i}] holds {_shown(v)}; it must hold one of "
                             f"{', '.join(map(_shown, values))}")


def check_fields(hf, family, path):
    """Every field of `hf` that read_config reads: its type and range; each per-layer list (layer_types,
    no_rope_layers) one entry a layer, each a value the family knows; rope_parameters (or rope_scaling) a dict, or
    one dict a layer type. A ValueError names the field, the file, what it holds and what it must hold."""
    for name, must in FIELDS.items():
        if name in hf:
            _check(path, name, hf[name], must)
    n = hf.get("num_hidden_layers")
    if "num_key_value_heads" in hf and hf["num_key_value_heads"] and "num_attention_heads" in hf \
            and hf["num_attention_heads"] % hf["num_key_value_heads"]:
        raise ValueError(f"{path}: num_key_value_heads holds {hf['num_key_value_heads']}; it must divide "
                         f"num_attention_heads ({hf['num_attention_heads']})")
    if family.windows == "none" or n is None:  # OPT reads no per-layer field
        return
    if hf.get("layer_types") is not None:
        _check_per_layer(path, "layer_types", hf["layer_types"], n, LAYER_TYPES)
    if family.nope and hf.get("no_rope_layers") is not None:
        _check_per_layer(path, "no_rope_layers", hf["no_rope_layers"], n, (0, 1))
    key = next((k for k in ("rope_parameters", "rope_scaling") if hf.get(k) not in (None, {})), None)
    if key is not None:  # read_config reads rope_parameters, else rope_scaling
        _check_rope_fields(path, key, hf[key])


def _check_rope_fields(path, key, params):
    """rope_parameters (or rope_scaling): an object, or one object a layer type, each field of a known type."""
    if not isinstance(params, dict):
        raise ValueError(f"{path}: {key} holds {_shown(params)}; it must hold an object (or one a layer type)")
    nested = any(t in params for t in LAYER_TYPES)
    for where, p in ([(f"{key}.{t}", v) for t, v in params.items()] if nested else [(key, params)]):
        if nested and where.split(".")[-1] not in LAYER_TYPES:
            raise ValueError(f"{path}: {where} is not a layer type; {key} must hold one object a layer type "
                             f"({', '.join(LAYER_TYPES)})")
        if not isinstance(p, dict):
            raise ValueError(f"{path}: {where} holds {_shown(p)}; it must hold an object")
        for name, must in ROPE_FIELDS.items():
            if name in p:
                _check(path, f"{where}.{name}", p[name], must)


def layer_types(hf, family, n):
    """Each layer's "full_attention" or "sliding_attention", as the config says or its family's default implies."""
    types = hf.get("layer_types")
    if types is None and family.local_rope:  # Gemma 3 configs from before layer_types: a pattern
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", DEFAULT_WINDOW_PATTERN))
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if types is None and hf.get("use_sliding_window"):  # Qwen2/3 configs from before layer_types
        types = ["sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention" for i in range(n)]
    return list(types or ["full_attention"] * n)


def windows(hf, family, types):
    window = hf.get("sliding_window")
    if not window or family.windows == "none" or hf.get("use_sliding_window", True) is False:
        return (None,) * len(types)
    return tuple(window if family.windows == "all" or t == "sliding_attention" else None for t in types)


def ropes(hf, family, types, path):
    """Each layer's Rope (None: no RoPE), from rope_parameters (what transformers 5 writes; possibly one dict per
    layer type) or rope_scaling (what downloaded config.json files say) and rope_theta."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    nested = any(t in params for t in ("full_attention", "sliding_attention"))
    made = {}
    for t in set(types):
        p = dict((params.get(t) or {}) if nested else params)
        if family.local_rope and not nested:  # Gemma 3's downloaded configs: rope_scaling is the global layers'
            p = p if t == "full_attention" else {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
        default = 1e6 if family.local_rope and t == "full_attention" else 10000.0  # Gemma 3's global layers: 1e6
        theta = p.get("rope_theta", hf.get("rope_theta", default))
        made[t] = rope(p, float(theta), hf, path)
    nope = hf.get("no_rope_layers") if family.nope else None
    return tuple(None if nope is not None and not nope[i] else made[t] for i, t in enumerate(types))


def rope(p, theta, hf, path):
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in ROPE_KINDS:
        raise ValueError(f"{path}: rope_type {kind!r} is not supported (scotd implements {', '.join(ROPE_KINDS)})")
    original = p.get("original_max_position_embeddings", hf.get("original_max_position_embeddings",
                                                                  hf["max_position_embeddings"]))
    factor = p.get("factor")
    if factor is None:
        factor = hf["max_position_embeddings"] / original if kind == "yarn" else 1.0
    return Rope(theta=theta, kind=kind, factor=float(factor), low_freq_factor=p.get("low_freq_factor", 1.0),
                high_freq_factor=p.get("high_freq_factor", 4.0), original_max_positions=original,
                beta_fast=p.get("beta_fast") or 32.0, beta_slow=p.get("beta_slow") or 1.0,
                attention_factor=p.get("attention_factor"), truncate=p.get("truncate", True))


def yarn_attention_factor(r):
    """YaRN's scale of cos and sin: given, else 0.1 ln(factor) + 1 (1 for factor <= 1)."""
    if r.attention_factor is not None:
        return r.attention_factor
    return 1.0 if r.factor <= 1 else 0.1 * math.log(r.factor) + 1.0


# -----------------------------------------------------------------------------
# Checkpoint keys


def module_key(key, cfg):
    """HF checkpoint key -> our module name: drop the family's prefix (OPT keys come with or without `model.`) and
    rename what the family names otherwise (FAMILIES[...].keys)."""
    if key.startswith("lm_head."):
        return key
    for prefix in (FAMILIES[cfg.model_type].prefix, "decoder.", "model."):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    return _rename(key, FAMILIES[cfg.model_type].keys)


def hf_key(key, cfg):
    """Our module name -> the HF checkpoint key (module_key's inverse for this family)."""
    if key == "lm_head.weight":
        return key
    family = FAMILIES[cfg.model_type]
    return family.prefix + _rename(key, {ours: theirs for theirs, ours in family.keys.items()})


def _rename(key, table):
    module, _, param = key.rpartition(".")
    parts = module.split(".")
    if len(parts) > 1 and parts[0] == "layers" and parts[1].isdigit():
        template = ".".join(["layers", "{}", *parts[2:]])
        if template in table:
            return f"{table[template].format(parts[1])}.{param}"
    return f"{table[module]}.{param}" if module in table else key
